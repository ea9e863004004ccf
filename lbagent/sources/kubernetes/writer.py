"""The one writer: exactly one LB node at a time holds a Lease and allocates addresses, writes Services' status and
Events; every LB node reads and programs.

The Lease is lbagent's own small elector rather than kubernetes_asyncio's leaderelection helper, which writes local
time marked as UTC, cannot release the Lease on a clean stop (the next writer would wait a whole lease), returns for
good once it loses the lease, and logs with tracebacks instead of events. The algorithm is client-go's: the holder
renews every `retry` seconds; a candidate takes the Lease over when its record has not changed for a whole
`leaseDurationSeconds` by the candidate's own monotonic clock (clocks of different nodes are never compared); every
write carries the resourceVersion read, so two candidates cannot both win; a holder that has not renewed within the
renew deadline stops writing before anyone else may start.

Status is written by server-side apply on the status subresource with lbagent's field manager, so it never fights
another writer over resourceVersion and removes only what lbagent wrote. `ipMode: Proxy`: lbagent delivers to the
nodes' nodePorts with the destination rewritten (DNAT), which is what Proxy means; with `VIP` kube-proxy would take
the address itself on every node and in-cluster clients would bypass the LB, its source ranges and its policy.
With forwardingMode dsr the packet reaches the node still addressed to the VIP, and only kube-proxy's rules for the
address take it: that is `ipMode: VIP`, written then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from lbagent import model
from lbagent.logfmt import event
from lbagent.sources import Problem

log = logging.getLogger("lbagent.kubernetes")

FIELD_MANAGER = "lbagent"
# involvedObject.apiVersion of the kinds lbagent records Events about (list items carry no apiVersion of their own)
GATEWAY_GROUP = "gateway.networking.k8s.io"
API_VERSIONS = {"Service": "v1", "Node": "v1", "Ingress": "networking.k8s.io/v1",
                "Gateway": f"{GATEWAY_GROUP}/v1", "HTTPRoute": f"{GATEWAY_GROUP}/v1",
                "GatewayClass": f"{GATEWAY_GROUP}/v1"}
COMPONENT = "lbagent"


def now_micro() -> str:
    """A MicroTime as the API writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _json(response: Any) -> tuple[int, dict[str, Any]]:
    try:
        text = await response.text()
    finally:
        response.release()
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {"message": text[:300]}
    return response.status, body


class Lease:
    """Lease-based election of the writer. `leading` is True only while this node may write."""

    def __init__(self, coordination: Any, namespace: str, name: str, identity: str, duration: float,
                 on_change: Callable[[bool], None]) -> None:
        self._api = coordination  # kubernetes_asyncio CoordinationV1Api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = max(2, round(duration))
        self.retry = max(0.5, duration / 7.5)  # client-go's 2 s at 15 s
        self.renew_deadline = duration * 2 / 3  # client-go's 10 s at 15 s
        self._on_change = on_change
        self.leading = False
        self.holder: str | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._record: dict[str, Any] | None = None
        self.failing_since: float | None = None  # wall clock of the first failed round since the last answer
        self.last_error: str | None = None

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = now_micro()
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                "acquireTime": acquired or now, "renewTime": now, "leaseTransitions": transitions}

    async def _try(self) -> bool:
        """One round: read the Lease, then create, renew or take it over when allowed. True while we hold it."""
        status, lease = await _json(await self._api.read_namespaced_lease(
            self.name, self.namespace, _preload_content=False, _request_timeout=(5, 10)))
        if status == 404:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(0, None)}
            status, created = await _json(await self._api.create_namespaced_lease(
                self.namespace, body, _preload_content=False, _request_timeout=(5, 10)))
            if status >= 300:
                return False
            self._record = created
            self.holder = self.identity
            return True
        if status >= 300:
            raise RuntimeError(f"reading Lease {self.namespace}/{self.name}: HTTP {status}: {lease.get('message')}")
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        observed = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, time.monotonic()
        self.holder = holder
        expired = time.monotonic() - self._observed_at > float(spec.get("leaseDurationSeconds") or self.duration)
        if holder not in (None, self.identity) and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        acquired = spec.get("acquireTime") if holder == self.identity else None
        lease["spec"] = self._spec(transitions, acquired)
        status, replaced = await _json(await self._api.replace_namespaced_lease(
            self.name, self.namespace, lease, _preload_content=False, _request_timeout=(5, 10)))
        if status >= 300:  # 409: somebody else wrote it first; we will see who next round
            return False
        self._record = replaced
        self.holder = self.identity
        return True

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            event(log, logging.INFO, "kubernetes_writer", leading=leading, lease=f"{self.namespace}/{self.name}",
                  identity=self.identity, holder=self.holder or "-")
            self._on_change(leading)

    async def run(self) -> None:
        while True:
            try:
                held = await self._try()
                self.failing_since, self.last_error = None, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # every round asks the API: its failing is the quickest sign that the API is away (a watch on a
                # hung connection only notices after its read timeout)
                held = False
                self.failing_since = self.failing_since or time.time()
                self.last_error = f"{type(exc).__name__}: {exc}"
                event(log, logging.DEBUG, "kubernetes_lease_error", lease=f"{self.namespace}/{self.name}",
                      error=self.last_error)
            now = time.monotonic()
            if held:
                self._renewed_at = now
                self._set(True)
            elif not self.leading or now - self._renewed_at > self.renew_deadline:
                # a holder that cannot renew stops writing before its lease can have expired for the others
                self._set(False)
            await asyncio.sleep(self.retry)

    async def release(self) -> None:
        """On a clean stop (after the renewals stopped): give the Lease up so another node takes over at once instead
        of after a lease. A conflict (a renewal crossed it) is answered by reading the Lease again, once."""
        if not self.leading or self._record is None:
            return
        self._set(False)
        lease = self._record
        for attempt in (1, 2):
            lease["spec"] = {**(lease.get("spec") or {}), "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": now_micro()}
            try:
                status, answer = await _json(await self._api.replace_namespaced_lease(
                    self.name, self.namespace, lease, _preload_content=False, _request_timeout=(5, 5)))
                if status == 409 and attempt == 1:
                    status, lease = await _json(await self._api.read_namespaced_lease(
                        self.name, self.namespace, _preload_content=False, _request_timeout=(5, 5)))
                    if status < 300 and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                        continue
                    return  # somebody else holds it now: nothing to give up
                if status >= 300:
                    raise RuntimeError(f"HTTP {status}: {answer.get('message')}")
                return
            except Exception as exc:
                event(log, logging.WARNING, "kubernetes_lease_release_failed", error=f"{type(exc).__name__}: {exc}")
                return


def ip_mode(mode: model.ForwardingMode) -> str:
    """The Service status's ipMode for lbagent's forwarding mode (the module says why)."""
    return "VIP" if mode is model.ForwardingMode.DSR else "Proxy"


def status_body(namespace: str, name: str, addresses: tuple[str, ...], mode: str = "Proxy") -> dict[str, Any]:
    """The server-side apply of a Service's status: lbagent's addresses with their ipMode."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "status": {"loadBalancer": {"ingress": [{"ip": a, "ipMode": mode} for a in addresses]}}}


class Recorder:
    """Events on objects, as `kubectl describe` shows them. The same reason and message on the same object is
    recorded once (and counted again at most once a minute), so a problem that persists does not flood the API."""

    REPEAT_AFTER = 60.0

    def __init__(self, core: Any, instance: str) -> None:
        self._api = core  # kubernetes_asyncio CoreV1Api
        self.instance = instance
        self._sent: dict[tuple[str, str, str], tuple[str, int, float]] = {}  # (uid, reason, message) -> name

    async def record(self, obj: Mapping[str, Any], kind: str, event_type: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        key = (uid, reason, message)
        previous = self._sent.get(key)
        now = time.monotonic()
        if previous is not None and now - previous[2] < self.REPEAT_AFTER:
            return
        namespace = meta.get("namespace") or "default"
        stamp = now_seconds()
        if previous is not None:
            name, count = previous[0], previous[1] + 1
            patch = {"count": count, "lastTimestamp": stamp}
            status, _ = await _json(await self._api.patch_namespaced_event(
                name, namespace, patch, _preload_content=False, _request_timeout=(5, 10)))
            if status < 300:
                self._sent[key] = (name, count, now)
                return
        name = f"{meta.get('name')}.{time.time_ns():x}"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {"apiVersion": API_VERSIONS.get(kind, "v1"), "kind": kind, "name": meta.get("name"),
                               "namespace": namespace,
                               "uid": uid, "resourceVersion": meta.get("resourceVersion")},
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT, "host": self.instance},
            "reportingComponent": f"{COMPONENT}.io/{COMPONENT}", "reportingInstance": self.instance,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        status, answer = await _json(await self._api.create_namespaced_event(
            namespace, body, _preload_content=False, _request_timeout=(5, 10)))
        if status >= 300:
            event(log, logging.WARNING, "kubernetes_event_failed", object=f"{namespace}/{meta.get('name')}",
                  reason=reason, status=status, error=answer.get("message"))
            return
        self._sent[key] = (name, 1, now)

    def forget(self, uid: str) -> None:
        for key in [k for k in self._sent if k[0] == uid]:
            del self._sent[key]


async def apply_status(core: Any, namespace: str, name: str, addresses: tuple[str, ...] | None,
                       mode: str = "Proxy") -> str | None:
    """Server-side apply of the Service's status; an error's text, or None. `addresses` None: give up every status
    field lbagent holds (the Service is no longer lbagent's), so the API server removes them."""
    body = status_body(namespace, name, addresses, mode) if addresses is not None else \
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}}
    status, answer = await _json(await core.patch_namespaced_service_status(
        name, namespace, body, field_manager=FIELD_MANAGER, force=True,
        _content_type="application/apply-patch+yaml", _preload_content=False, _request_timeout=(5, 10)))
    return None if status < 300 else f"HTTP {status}: {answer.get('message')}"


async def apply_ingress_status(networking: Any, namespace: str, name: str, addresses: tuple[str, ...]) -> str | None:
    """Server-side apply of an Ingress's status.loadBalancer (the addresses it is served on); an error, or None."""
    body = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace},
            "status": {"loadBalancer": {"ingress": [{"ip": a} for a in addresses]}}}
    status, answer = await _json(await networking.patch_namespaced_ingress_status(
        name, namespace, body, field_manager=FIELD_MANAGER, force=True,
        _content_type="application/apply-patch+yaml", _preload_content=False, _request_timeout=(5, 10)))
    return None if status < 300 else f"HTTP {status}: {answer.get('message')}"


async def apply_custom_status(custom: Any, kind: str, plural: str, namespace: str | None, name: str,
                              status: Mapping[str, Any], version: str = "v1") -> str | None:
    """Server-side apply of a Gateway API object's status (GatewayClass: cluster-scoped, `namespace` None)."""
    body = {"apiVersion": f"{GATEWAY_GROUP}/{version}", "kind": kind,
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})}, "status": status}
    common: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True,
                              "_content_type": "application/apply-patch+yaml", "_preload_content": False,
                              "_request_timeout": (5, 10)}
    if namespace is None:
        response = await custom.patch_cluster_custom_object_status(GATEWAY_GROUP, version, plural, name, body,
                                                                   **common)
    else:
        response = await custom.patch_namespaced_custom_object_status(GATEWAY_GROUP, version, namespace, plural,
                                                                      name, body, **common)
    status_code, answer = await _json(response)
    return None if status_code < 300 else f"HTTP {status_code}: {answer.get('message')}"


def with_transitions(wanted: list[dict[str, Any]], have: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Conditions with lastTransitionTime: kept from the object's own where the type's status did not change."""
    before = {c.get("type"): c for c in have}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for c in wanted:
        old = before.get(c["type"])
        stamp = old.get("lastTransitionTime") if old and old.get("status") == c["status"] else None
        out.append({**c, "lastTransitionTime": stamp or now})
    return out


def without_transitions(status: Any) -> Any:
    """A status with every lastTransitionTime left out (to compare what lbagent wants with what is there)."""
    if isinstance(status, Mapping):
        return {k: without_transitions(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [without_transitions(v) for v in status]
    return status


def holds_status(service: Mapping[str, Any]) -> bool:
    """Whether lbagent's field manager holds fields of the Service's status.loadBalancer (it wrote them)."""
    for entry in (service.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("subresource") == "status":
            fields = entry.get("fieldsV1") or {}
            if "f:loadBalancer" in (fields.get("f:status") or {}):
                return True
    return False


def problem_message(problems: list[Problem]) -> str:
    return "; ".join(f"{p.path.split(': ', 1)[-1]}: {p.message} (got {p.value})" for p in problems)


Writer = Callable[[], Awaitable[None]]
