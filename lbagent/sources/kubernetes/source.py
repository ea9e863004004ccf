"""The Kubernetes API as a source, beside the file: the file gives the node's own settings (BGP, data plane, pools,
its own services and listeners), the API gives Services of lbagent's class, their EndpointSlices and the Nodes.

- Nothing is known until the first full lists of all three kinds are in: `start()` waits for them, and the agent
  programs nothing before.
- The API's objects are kept as the last lists and watches left them; an outage changes nothing (`status()` says
  the source is stale, and since when), and what changed meanwhile is applied when the API is back.
- One LB node at a time (the Lease holder) allocates addresses and writes status and Events (writer.py); every LB
  node programs what the Services' status says, so all of them serve the same addresses.
- A Service of the API that clashes with the file (same address, protocol and port) is not served; the file is the
  operator's own word. The clash is logged on every node and an Event on the Service names both.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lbagent import model
from lbagent.files import prepare_runtime_dir, private_dir, write_private
from lbagent.logfmt import event
from lbagent.sources import Problem, SourceError
from lbagent.sources.file import config
from lbagent.sources.kubernetes import translate
from lbagent.sources.kubernetes.allocator import Allocator, Pool, Request
from lbagent.sources.kubernetes.gateway import (
    GatewayBuilt,
    GatewayInputs,
    address_request,
    build_gateways,
    our_gateways,
)
from lbagent.sources.kubernetes.ingress import TLS_SECRET_TYPE, IngressBuilt, Inputs, build_ingresses
from lbagent.sources.kubernetes.reflector import Reflector
from lbagent.sources.kubernetes.writer import (
    GATEWAY_GROUP,
    Lease,
    Recorder,
    apply_custom_status,
    apply_ingress_status,
    apply_status,
    holds_status,
    ip_mode,
    problem_message,
    with_transitions,
    without_transitions,
)

log = logging.getLogger("lbagent.kubernetes")

WRITER_DEBOUNCE = 0.05  # changes coming together (a list, a burst of events) are written once
WRITE_CONCURRENCY = 16  # status writes in flight at once (10,000 one after the other take a minute)
Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """The stores as they were at one moment on the loop (shallow copies: objects are never mutated). Ingresses,
    IngressClasses and TLS Secrets are watched only with `kubernetes.ingress` configured."""

    services: dict[str, Obj]
    slices: dict[str, Obj]
    nodes: dict[str, Obj]
    ingresses: dict[str, Obj] = field(default_factory=dict)
    classes: dict[str, Obj] = field(default_factory=dict)
    secrets: dict[str, Obj] = field(default_factory=dict)
    gateway_classes: dict[str, Obj] = field(default_factory=dict)
    gateways: dict[str, Obj] = field(default_factory=dict)
    httproutes: dict[str, Obj] = field(default_factory=dict)
    grants: dict[str, Obj] = field(default_factory=dict)


@dataclass
class Built:
    """The API's part of the model, and what is wrong with its objects (object key -> problems)."""

    services: list[model.Service] = field(default_factory=list)
    nodes: list[model.Node] = field(default_factory=list)
    problems: dict[str, list[Problem]] = field(default_factory=lambda: defaultdict(list))
    http: IngressBuilt | None = None  # the Ingresses' and Gateways' listeners, routes and backends
    gateway: GatewayBuilt | None = None  # the Gateway API objects' status


def settings_of(m: model.Model) -> translate.Settings:
    assert m.kubernetes is not None
    k = m.kubernetes
    return translate.Settings(load_balancer_class=k.load_balancer_class, node_address_type=k.node_address_type,
                              health_check=k.health_check, forwarding_mode=k.forwarding_mode)


# A Service's translation, by what it was translated from: its resourceVersion and those of its EndpointSlices.
TranslationCache = dict[str, tuple[tuple[str, ...], model.Service | None, list[Problem]]]

# Where a service port is served: (address family, address as an integer, protocol, port). Integers and strings hash
# in C; an address object hashes in slow Python, and the clash check hashes every port of every Service per build.
Claim = tuple[int, int, str, int]


def _claims(vips: tuple[model.IPAddress, ...], ports: tuple[model.ServicePort, ...]) -> tuple[Claim, ...]:
    return tuple((vip.version, int(vip), p.protocol.value, p.port) for vip in vips for p in ports)


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or id(obj))


@dataclass
class BuildCache:
    """What `build` worked out from each API object, kept by the object's identity (a store replaces an object that
    changed, it never changes one): a build reads again only the objects that are new since the last. At 10,000
    Services, reading every object's nested fields again took 150-300 ms per EndpointSlice change (mostly cache
    misses); now the build is a pass over these records. Used by one build at a time."""

    settings: str = ""
    translated: TranslationCache = field(default_factory=dict)
    # EndpointSlice store key -> (the object, its Service's key or None, its resourceVersion)
    slices: dict[str, tuple[Obj, str | None, str]] = field(default_factory=dict)
    # Service store key -> (the object, whether it is lbagent's, its place (creationTimestamp, key), resourceVersion)
    services: dict[str, tuple[Obj, bool, tuple[str, str], str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # lbagent's Services' store keys, in their place's order
    claims: dict[str, tuple[model.Service, tuple[Claim, ...]]] = field(default_factory=dict)
    last: _Pass | None = None


@dataclass
class _Pass:
    """The last whole pass over lbagent's Services: what a build that only some Services' EndpointSlices changed
    starts from (their claims the same, so no other Service's clash can change)."""

    base: model.Model
    services: list[model.Service]
    problems: dict[str, list[Problem]]  # by "Service <key>"
    # each Service's store key and outcome: ("served", its index in `services`), ("none", None: not translated) or
    # ("clashed", its clash problem)
    outcome: dict[str, tuple[str, str, Any]]


def build(base: model.Model, snap: Snapshot, cache: BuildCache | None = None) -> Built:
    """The API's services and nodes, translated and checked against the file's. Pure, but for `cache` (a fresh one
    when None): a Service whose object and EndpointSlices have not changed since the last build is not translated
    again, and an object that is the same as in the last build is not read again."""
    settings = settings_of(base)
    if cache is None:
        cache = BuildCache()
    if cache.settings != repr(settings):  # what was read under other settings says nothing now
        vars(cache).update(vars(BuildCache(settings=repr(settings))))
    built = Built()
    for key, obj in sorted(snap.nodes.items()):
        node, problems = translate.translate_node(obj, settings)
        if problems:
            built.problems[f"Node {key}"] += problems
        if node is not None:
            built.nodes.append(node)
    file_nodes = {n.name for n in base.nodes}
    for node in list(built.nodes):
        if node.name in file_nodes:
            built.nodes.remove(node)
            built.problems[f"Node {node.name}"].append(Problem(
                f"Node {node.name}", node.name, "a node of the same name is in the file's `nodes`: the file's is used"))
    taken: dict[Claim, str] = {}
    for k, s in enumerate(base.services):
        for claim in _claims(s.vips, s.ports):
            taken[claim] = f"the file's services[{k}] ({s.key})"
    for k, lst in enumerate(base.listeners):
        for vip in lst.vips:
            claim = (vip.version, int(vip), model.Protocol.TCP.value, lst.port)
            taken[claim] = f"the file's listeners[{k}] ({lst.name})"
    slices, slice_versions, touched = _slices_of(snap.slices, cache)
    order, resorted = _ours_in_order(snap.services, settings, cache)
    last = cache.last if not resorted and cache.last is not None and cache.last.base is base else None
    redone = _redo(last, touched, slices, slice_versions, settings, cache) if last is not None else None
    if redone is None:
        redone = _pass(base, order, slices, slice_versions, settings, cache, taken)
    cache.last = redone
    built.services = list(redone.services)
    for key, problems in redone.problems.items():
        built.problems[key] += problems
    kube = base.kubernetes
    if kube is not None and (kube.ingress is not None or kube.gateway is not None):
        known = {s.key: s for s in (*base.services, *built.services)}
        built.http = IngressBuilt()
        if kube.ingress is not None:
            inputs = Inputs(snap.ingresses, snap.classes, snap.services, slices, snap.secrets)
            built.http = build_ingresses(inputs, kube, known, certificate_dir(base))
        if kube.gateway is not None:
            gateway_inputs = GatewayInputs(snap.gateway_classes, snap.gateways, snap.httproutes, snap.grants,
                                           snap.services, slices, snap.secrets)
            built.gateway = build_gateways(gateway_inputs, kube, known, certificate_dir(base), built.http)
            built.http.listeners += built.gateway.listeners
            built.http.routes += built.gateway.routes
            for key, problems in built.gateway.problems.items():
                built.http.problems.setdefault(key, []).extend(problems)
        for key, problems in built.http.problems.items():
            built.problems[key] += problems
    return built


def _translated(key: str, store_key: str, slices: Mapping[str, list[Obj]], slice_versions: Mapping[str, list[str]],
                settings: translate.Settings, cache: BuildCache) -> tuple[model.Service | None, list[Problem]]:
    """A Service's translation: from the cache while its object and EndpointSlices are the ones it was made from."""
    obj, _, _, version = cache.services[store_key]
    versions = (version, *sorted(slice_versions.get(key, ())))
    cached = cache.translated.get(key)
    if cached is not None and cached[0] == versions:
        return cached[1], cached[2]
    service, problems = translate.translate_service(obj, slices.get(key, []), settings)
    cache.translated[key] = (versions, service, problems)
    return service, problems


def _claimed(key: str, service: model.Service, cache: BuildCache) -> tuple[Claim, ...]:
    claimed = cache.claims.get(key)
    if claimed is None or claimed[0] is not service:
        claimed = cache.claims[key] = (service, _claims(service.vips, service.ports))
    return claimed[1]


def _pass(base: model.Model, order: list[str], slices: Mapping[str, list[Obj]],
          slice_versions: Mapping[str, list[str]], settings: translate.Settings, cache: BuildCache,
          taken: dict[Claim, str]) -> _Pass:
    """Every one of lbagent's Services, oldest first: translated (or from the cache), and served unless an address
    and port it asks for is taken by the file or an older Service."""
    out = _Pass(base, [], defaultdict(list), {})
    for store_key in order:
        key = cache.services[store_key][2][1]
        service, problems = _translated(key, store_key, slices, slice_versions, settings, cache)
        if problems:
            out.problems[f"Service {key}"] += problems
        if service is None:
            out.outcome[key] = (store_key, "none", None)
            continue
        claims = _claimed(key, service, cache)
        clash = next((i for i, c in enumerate(claims) if c in taken), None)
        if clash is not None:  # the claims are in the order of its (VIP, port) pairs
            vip, port = [(vip, p) for vip in service.vips for p in service.ports][clash]
            problem = Problem(f"Service {key}: status.loadBalancer.ingress", f"{vip} {port.protocol.value} {port.port}",
                              f"also served by {taken[claims[clash]]}: not served")
            out.problems[f"Service {key}"].append(problem)
            out.outcome[key] = (store_key, "clashed", problem)
            continue
        for claim in claims:
            taken[claim] = f"Service {key}"
        out.outcome[key] = (store_key, "served", len(out.services))
        out.services.append(service)
    out.problems = dict(out.problems)
    for key in cache.translated.keys() - out.outcome.keys():
        del cache.translated[key]  # a Service that is gone, or no longer lbagent's
        cache.claims.pop(key, None)
    return out


def _redo(last: _Pass, touched: set[str], slices: Mapping[str, list[Obj]], slice_versions: Mapping[str, list[str]],
          settings: translate.Settings, cache: BuildCache) -> _Pass | None:
    """The last pass with the Services whose EndpointSlices changed (`touched`) translated again, when no Service
    object changed: at a cost that grows with those Services only. None when one of them would change more than
    itself (translated or not where it was the other way, another address or port): then only a whole pass will do."""
    services, problems = last.services, last.problems
    for key in touched:
        was = last.outcome.get(key)
        if was is None:
            continue  # not one of lbagent's Services
        store_key, kind, what = was
        before = cache.claims.get(key)
        service, translation_problems = _translated(key, store_key, slices, slice_versions, settings, cache)
        if (service is None) != (kind == "none"):
            return None
        if service is not None and (before is None or _claimed(key, service, cache) != before[1]):
            return None
        if services is last.services:
            services, problems = list(services), dict(problems)
        if kind == "served":
            assert service is not None
            services[what] = service
        listed = translation_problems + ([what] if kind == "clashed" else [])
        if listed:
            problems[f"Service {key}"] = listed
        else:
            problems.pop(f"Service {key}", None)
    return _Pass(last.base, services, problems, last.outcome)


def _slices_of(slices: Mapping[str, Obj], cache: BuildCache
               ) -> tuple[dict[str, list[Obj]], dict[str, list[str]], set[str]]:
    """Each Service's EndpointSlices (by the Service-name label), their resourceVersions, and the Services whose
    EndpointSlices are not the last build's (new, changed, gone or moved to another Service), reading only new
    objects."""
    by_service: dict[str, list[Obj]] = defaultdict(list)
    versions: dict[str, list[str]] = defaultdict(list)
    known, seen, touched = cache.slices, {}, set()
    for store_key, eps in slices.items():
        record = known.get(store_key)
        if record is None or record[0] is not eps:
            if record is not None and record[1] is not None:
                touched.add(record[1])
            meta = eps.get("metadata") or {}
            name = (meta.get("labels") or {}).get(translate.SERVICE_NAME_LABEL)
            record = (eps, f"{meta.get('namespace')}/{name}" if name else None, _version(eps))
            if record[1] is not None:
                touched.add(record[1])
        seen[store_key] = record
        if record[1] is not None:
            by_service[record[1]].append(eps)
            versions[record[1]].append(record[2])
    for gone in known.keys() - slices.keys():
        if (owner := known[gone][1]) is not None:
            touched.add(owner)
    cache.slices = seen
    return by_service, versions, touched


def _ours_in_order(services: Mapping[str, Obj], settings: translate.Settings, cache: BuildCache
                   ) -> tuple[list[str], bool]:
    """The store keys of lbagent's Services, oldest first (creationTimestamp, then key: the first one keeps an
    address and port both ask for), reading only new objects; the order is sorted again only when one changed
    (then True)."""
    known, seen, changed = cache.services, {}, len(services) != len(cache.services)
    for store_key, obj in services.items():
        record = known.get(store_key)
        if record is None or record[0] is not obj:
            changed = True
            record = (obj, translate.is_ours(obj, settings),
                      (str((obj.get("metadata") or {}).get("creationTimestamp") or ""), translate.key_of(obj)),
                      _version(obj))
        seen[store_key] = record
    cache.services = seen
    if changed:
        cache.order = sorted((k for k, r in seen.items() if r[1]), key=lambda k: seen[k][2])
    return cache.order, changed


def _conditions_of(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(status.get("conditions") or [])


def _stamped(wanted: Mapping[str, Any], have: Mapping[str, Any]) -> dict[str, Any]:
    """`wanted` with each conditions list given lastTransitionTime from what the object has (status, listeners by
    name, parents by parentRef)."""
    out: dict[str, Any] = dict(wanted)
    if "conditions" in wanted:
        out["conditions"] = with_transitions(list(wanted["conditions"]), _conditions_of(have))
    if "listeners" in wanted:
        before = {entry.get("name"): entry for entry in have.get("listeners") or []}
        out["listeners"] = [{**entry, "conditions": with_transitions(
            list(entry["conditions"]), _conditions_of(before.get(entry["name"]) or {}))}
            for entry in wanted["listeners"]]
    if "parents" in wanted:
        before_parents = {json.dumps(p.get("parentRef"), sort_keys=True): p for p in have.get("parents") or []}
        out["parents"] = [{**entry, "conditions": with_transitions(list(entry.get("conditions") or []), _conditions_of(
            before_parents.get(json.dumps(entry.get("parentRef"), sort_keys=True)) or {}))}
            for entry in wanted["parents"]]
    return out


def certificate_dir(m: model.Model) -> Path:
    """Where the TLS Secrets of Ingresses are written for HAProxy (0600 files in a 0700 directory)."""
    return Path(m.agent.runtime_dir) / "kubernetes" / "certs"


def merged(base: model.Model, built: Built) -> model.Model:
    m = replace(base, services=base.services + tuple(built.services), nodes=base.nodes + tuple(built.nodes))
    if built.http is not None:
        m = replace(m, services=m.services + tuple(built.http.services),
                    listeners=m.listeners + tuple(built.http.listeners), routes=m.routes + tuple(built.http.routes),
                    backends=m.backends + tuple(built.http.backends))
    return m


def write_certificates(m: model.Model, certificates: Mapping[str, bytes]) -> None:
    """The Secrets' certificates as files, each rewritten only when it changed (HAProxy is given a replaced one
    without a reload); files no Ingress uses any more are removed."""
    directory = certificate_dir(m)
    private_dir(directory, base=prepare_runtime_dir(m.agent.runtime_dir))
    for path, pem in certificates.items():
        try:
            if Path(path).read_bytes() == pem:
                continue
        except OSError:
            pass
        write_private(path, pem.decode())
    for stale in directory.glob("*.pem"):
        if str(stale) not in certificates:
            stale.unlink(missing_ok=True)


class KubernetesSource:
    """The file and the Kubernetes API together (the module says how)."""

    def __init__(self, path: str | Path, identity: str) -> None:
        self.path = Path(path)
        self.identity = identity
        self._file: model.Model | None = None
        self._file_dirty = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task[None]] = []
        self._api: Any = None
        self.services: Reflector | None = None
        self.slices: Reflector | None = None
        self.nodes: Reflector | None = None
        self.ingresses: Reflector | None = None
        self.classes: Reflector | None = None
        self.secrets: Reflector | None = None
        self.gateway_classes: Reflector | None = None
        self.gateways: Reflector | None = None
        self.httproutes: Reflector | None = None
        self.grants: Reflector | None = None
        self._networking: Any = None
        self._custom: Any = None
        self.lease: Lease | None = None
        self._recorder: Recorder | None = None
        self._core: Any = None
        self._write_pending = False
        self._problems_logged: dict[str, str] = {}  # what every node logs: what it cannot serve
        self._allocation_logged: dict[str, str] = {}  # what the writer logs: what it cannot give an address
        self.writes = 0
        self._write_lock = asyncio.Lock()
        self._written: dict[str, tuple[tuple[str, ...], str]] = {}  # key -> (addresses, the version written over)
        self._custom_written: dict[str, tuple[str, str]] = {}  # Gateway API objects: (status, the version)
        self._built = BuildCache()  # load()'s, in the worker thread (one load at a time)

    @property
    def name(self) -> str:
        return f"{self.path} + kubernetes"

    # ---- the Source protocol --------------------------------------------------------------------------------

    def file_model(self) -> model.Model:
        if self._file is None or self._file_dirty:
            m = config.load(self.path)
            if m.kubernetes is None:
                raise SourceError(str(self.path), [Problem("kubernetes", "absent",
                                                           "the running agent reads the Kubernetes API: this file "
                                                           "no longer configures it (a restart is needed to stop)")])
            self._file, self._file_dirty = m, False
        return self._file

    def load(self) -> model.Model:
        """The file's model with the API's services and nodes; in a worker thread (the snapshot is taken on the
        loop)."""
        base = self.file_model()
        snap = self._snapshot_from_thread()
        built = build(base, snap, self._built)
        self._log_problems(built.problems, self._problems_logged)
        if built.http is not None:
            write_certificates(base, built.http.certificates)
        return merged(base, built)

    def watch(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        loop = asyncio.get_running_loop()

        def hup() -> None:
            self._file_dirty = True
            changed()
            self._schedule_write()

        loop.add_signal_handler(signal.SIGHUP, hup)

    # ---- start, stop, status -----------------------------------------------------------------------------------

    async def start(self, api_client: Any = None) -> None:
        """Connect, and wait for the first full lists of Services, EndpointSlices and Nodes."""
        # kubernetes_asyncio takes 0.3-0.5 s to import: only an agent that uses the API pays for it
        from kubernetes_asyncio import client  # noqa: PLC0415
        from kubernetes_asyncio import config as kube_config  # noqa: PLC0415

        self._loop = asyncio.get_running_loop()
        base = self.file_model()
        assert base.kubernetes is not None
        if api_client is None:
            configuration = client.Configuration()
            if base.kubernetes.kubeconfig:
                await kube_config.load_kube_config(config_file=base.kubernetes.kubeconfig,
                                                   client_configuration=configuration)
            else:
                kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            api_client = client.ApiClient(configuration)
        self._api = api_client
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self.services = Reflector("Service", core.list_service_for_all_namespaces, self._services_changed)
        self.slices = Reflector("EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces, self._api_changed,
                                label_selector=translate.SERVICE_NAME_LABEL)
        self.nodes = Reflector("Node", core.list_node, self._api_changed)
        if base.kubernetes.ingress is not None:
            networking = client.NetworkingV1Api(api_client)
            self._networking = networking
            self.ingresses = Reflector("Ingress", networking.list_ingress_for_all_namespaces, self._services_changed)
            self.classes = Reflector("IngressClass", networking.list_ingress_class, self._services_changed)
            # only TLS Secrets: the others are none of lbagent's business
        if base.kubernetes.ingress is not None or base.kubernetes.gateway is not None:
            self.secrets = Reflector("Secret", core.list_secret_for_all_namespaces, self._api_changed,
                                     field_selector=f"type={TLS_SECRET_TYPE}")
        if base.kubernetes.gateway is not None:
            custom = client.CustomObjectsApi(api_client)
            self._custom = custom

            def kind(plural: str, version: str = "v1") -> Any:
                return functools.partial(custom.list_cluster_custom_object, GATEWAY_GROUP, version, plural)

            # optional: a cluster without the Gateway API's CRDs has none of these, which is no error
            self.gateway_classes = Reflector("GatewayClass", kind("gatewayclasses"), self._services_changed,
                                             optional=True)
            self.gateways = Reflector("Gateway", kind("gateways"), self._services_changed, optional=True)
            self.httproutes = Reflector("HTTPRoute", kind("httproutes"), self._services_changed, optional=True)
            self.grants = Reflector("ReferenceGrant", kind("referencegrants", "v1beta1"), self._services_changed,
                                    optional=True)
        self._recorder = Recorder(core, self.identity)
        self._core = core
        self.lease = Lease(client.CoordinationV1Api(api_client), base.kubernetes.lease_namespace,
                           base.kubernetes.lease_name, self.identity, base.kubernetes.lease_seconds,
                           lambda leading: self._schedule_write() if leading else None)
        reflectors = self._reflectors()
        for reflector in reflectors:
            self._tasks.append(asyncio.create_task(reflector.run(), name=f"kubernetes-{reflector.kind}"))
        started = time.monotonic()
        while True:
            waiting = [r.kind for r in reflectors if not r.synced.is_set()]
            if not waiting:
                break
            try:
                await asyncio.wait_for(asyncio.gather(*(r.synced.wait() for r in reflectors)), timeout=10)
            except TimeoutError:
                errors = {r.kind: r.last_error for r in reflectors if r.last_error}
                event(log, logging.WARNING, "kubernetes_waiting", waiting=",".join(waiting),
                      seconds=round(time.monotonic() - started), errors=errors or "-")
        event(log, logging.INFO, "kubernetes_synced", **{r.kind.lower() + "s": len(r.store) for r in reflectors},
              seconds=round(time.monotonic() - started, 2))
        self._tasks.append(asyncio.create_task(self.lease.run(), name="kubernetes-lease"))

    async def close(self) -> None:
        # the renewals stop first: one in flight would cross the release and make it a conflict
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.lease is not None:
            await self.lease.release()
        if self._api is not None:
            await self._api.close()

    async def _write_gateway_api(self, built: GatewayBuilt, snap: Snapshot) -> None:
        """The status of lbagent's GatewayClasses, Gateways and of the HTTPRoutes attached to them, each written
        when it differs from what the object shows (lastTransitionTime aside)."""
        jobs = []
        for name, wanted in built.class_status.items():
            obj = snap.gateway_classes.get(name)
            if obj is not None:
                jobs.append(self._put_custom(obj, "GatewayClass", "gatewayclasses", None, wanted))
        for key, wanted in built.gateway_status.items():
            obj = snap.gateways.get(key)
            if obj is not None:
                jobs.append(self._put_custom(obj, "Gateway", "gateways", key.split("/", 1)[0], wanted))
        for key, parents in built.route_status.items():
            obj = snap.httproutes.get(key)
            if obj is None:
                continue
            theirs = [p for p in (obj.get("status") or {}).get("parents") or []
                      if p.get("controllerName") != built.controller]
            jobs.append(self._put_custom(obj, "HTTPRoute", "httproutes", key.split("/", 1)[0],
                                         {"parents": [*theirs, *parents]}))
        await asyncio.gather(*jobs)

    async def _put_custom(self, obj: Obj, kind: str, plural: str, namespace: str | None,
                          wanted: Mapping[str, Any]) -> None:
        have = obj.get("status") or {}
        meta = obj.get("metadata") or {}
        if without_transitions(have) == without_transitions(wanted):
            return
        key = f"{kind} {translate.key_of(obj)}"
        done = (json.dumps(without_transitions(wanted), sort_keys=True), str(meta.get("resourceVersion") or ""))
        if self._custom_written.get(key) == done:
            return
        status = _stamped(wanted, have)
        error = await apply_custom_status(self._custom, kind, plural, namespace, str(meta.get("name")), status)
        if error is not None:
            event(log, logging.WARNING, "kubernetes_status_failed", object=key, error=error)
            return
        self.writes += 1
        self._custom_written[key] = done
        event(log, logging.INFO, "kubernetes_status_written", object=key)

    async def _write_ingress(self, obj: Obj, addresses: tuple[str, ...]) -> None:
        """An Ingress lbagent serves gets the addresses it is served on in its status, once."""
        have = tuple(translate.status_ips(obj))
        if have == addresses:
            return
        meta = obj.get("metadata") or {}
        key = f"Ingress {translate.key_of(obj)}"
        done = (addresses, str(meta.get("resourceVersion") or ""))
        if self._written.get(key) == done:
            return
        error = await apply_ingress_status(self._networking, str(meta.get("namespace")), str(meta.get("name")),
                                           addresses)
        if error is not None:
            event(log, logging.WARNING, "kubernetes_status_failed", ingress=translate.key_of(obj), error=error)
            return
        self.writes += 1
        self._written[key] = done
        event(log, logging.INFO, "kubernetes_status_written", ingress=translate.key_of(obj),
              addresses=",".join(addresses), previous=",".join(have) or "-")

    def _reflectors(self) -> list[Reflector]:
        return [r for r in (self.services, self.slices, self.nodes, self.ingresses, self.classes, self.secrets,
                            self.gateway_classes, self.gateways, self.httproutes, self.grants) if r is not None]

    def status(self) -> dict[str, Any]:
        reflectors = self._reflectors()
        stale = [r.stale_since for r in reflectors if r.stale_since is not None]
        errors: dict[str, str | None] = {r.kind: r.last_error for r in reflectors if r.last_error}
        if self.lease is not None and self.lease.failing_since is not None:
            stale.append(self.lease.failing_since)
            errors["Lease"] = self.lease.last_error
        return {
            "kind": "file+kubernetes", "path": str(self.path),
            "synced": bool(reflectors) and all(r.synced.is_set() for r in reflectors),
            "staleSince": min(stale) if stale else None,
            "errors": errors,
            "objects": {r.kind: len(r.store) for r in reflectors},
            "writer": self.lease.leading if self.lease else False,
            "writerIdentity": self.lease.holder if self.lease else None,
            "statusWrites": self.writes,
        }

    # ---- changes -------------------------------------------------------------------------------------------

    def _api_changed(self, keys: set[str]) -> None:
        self._changed()

    def _services_changed(self, keys: set[str]) -> None:
        self._changed()
        self._schedule_write()

    def _snapshot(self) -> Snapshot:
        assert self.services and self.slices and self.nodes

        def store(r: Reflector | None) -> dict[str, Obj]:
            return dict(r.store) if r is not None else {}

        return Snapshot(dict(self.services.store), dict(self.slices.store), dict(self.nodes.store),
                        store(self.ingresses), store(self.classes), store(self.secrets), store(self.gateway_classes),
                        store(self.gateways), store(self.httproutes), store(self.grants))

    def _snapshot_from_thread(self) -> Snapshot:
        if self._loop is None:
            raise SourceError(self.name, [Problem("kubernetes", "not started", "the API source was not started")])
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return self._snapshot()

        async def take() -> Snapshot:
            return self._snapshot()

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(timeout=30)

    def _log_problems(self, problems: Mapping[str, list[Problem]], logged: dict[str, str]) -> None:
        """Each object's problems once while they last (`logged`: what was logged last time, updated)."""
        seen = {}
        for key, found in problems.items():
            text = problem_message(found)
            seen[key] = text
            if logged.get(key) != text:
                for p in found:
                    event(log, logging.WARNING, "kubernetes_object_problem", object=key,
                          field=p.path.split(": ", 1)[-1], value=p.value, error=p.message)
        logged.clear()
        logged.update(seen)

    # ---- the writer (the Lease holder only) ---------------------------------------------------------------------

    def _schedule_write(self) -> None:
        if self._write_pending or self.lease is None or not self.lease.leading:
            return
        self._write_pending = True
        self._tasks.append(asyncio.create_task(self._write_soon(), name="kubernetes-write"))

    async def _write_soon(self) -> None:
        await asyncio.sleep(WRITER_DEBOUNCE)
        self._write_pending = False
        try:
            await self.write()
        except Exception as exc:
            event(log, logging.ERROR, "kubernetes_write_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._tasks = [t for t in self._tasks if not t.done()]

    async def write(self) -> None:
        """Allocate and write every Service's status that differs; Events for what cannot be served. One pass at a
        time: two passes over the same snapshot would write the same status twice."""
        async with self._write_lock:
            await self._write()

    async def _write(self) -> None:
        assert self._recorder is not None
        if self.lease is None or not self.lease.leading:
            return
        base = self.file_model()
        assert base.kubernetes is not None
        snap = self._snapshot()
        settings = settings_of(base)
        ours = {translate.key_of(o): o for o in snap.services.values() if translate.is_ours(o, settings)}
        pools = [Pool.parse(p.name, p.addresses, p.auto_assign) for p in base.kubernetes.pools]
        reserved = {vip: f"the file's service {s.key}" for s in base.services for vip in s.vips}
        reserved |= {vip: f"the file's listener {lst.name}" for lst in base.listeners for vip in lst.vips}
        requests: list[Request] = []
        refused: dict[str, list[Problem]] = {}
        for key, obj in ours.items():
            request, problems = Request.of(obj)
            if request is None:
                refused[f"Service {key}"] = problems
                await self._recorder.record(obj, "Service", "Warning", "InvalidLoadBalancerRequest",
                                            problem_message(problems))
                continue
            requests.append(request)
        gateways: dict[str, Obj] = {}
        if base.kubernetes.gateway is not None:
            for gateway in our_gateways(GatewayInputs(snap.gateway_classes, snap.gateways, {}, {}, {}, {}, {}),
                                        base.kubernetes.gateway.controller_name):
                request, problems = address_request(gateway)
                if request is None:
                    refused[f"Gateway {translate.key_of(gateway)}"] = problems
                    continue
                gateways[request.key] = gateway
                requests.append(request)
        result = await asyncio.to_thread(Allocator(pools).allocate, requests, reserved)
        refused |= {key if key in gateways else f"Service {key}": problems for key, problems in result.problems.items()}
        self._log_problems(refused, self._allocation_logged)
        for reason, outcome in (("AllocationFailed", result.problems), ("AddressOutsidePools", result.warnings)):
            for key, problems in outcome.items():
                obj, kind = (gateways[key], "Gateway") if key in gateways else (ours[key], "Service")
                await self._recorder.record(obj, kind, "Warning", reason, problem_message(problems))
        if gateways:  # the Gateways as they will be once their addresses are written: build() works out the rest
            snap = replace(snap, gateways={**snap.gateways, **{
                translate.key_of(g): {**g, "status": {**(g.get("status") or {}), "addresses": [
                    {"type": "IPAddress", "value": str(a)} for a in result.addresses.get(key, ())]}}
                for key, g in gateways.items()}})
        limit = asyncio.Semaphore(WRITE_CONCURRENCY)
        mode = ip_mode(base.kubernetes.forwarding_mode)

        async def put(key: str, obj: Obj, wanted: tuple[str, ...] | None) -> bool:
            """Apply the status (None: give back what lbagent holds); whether it was written now."""
            meta = obj.get("metadata") or {}
            done = (wanted or (), str(meta.get("resourceVersion") or ""))
            if self._written.get(key) == done:
                return False  # written from this very version already: the watch has not brought our write back yet
            async with limit:
                error = await apply_status(self._core, str(meta.get("namespace")), str(meta.get("name")), wanted,
                                           mode)
            if error is not None:
                event(log, logging.WARNING, "kubernetes_status_failed", service=key, error=error)
                return False
            self.writes += 1
            self._written[key] = done
            return True

        async def write_one(key: str, addresses: tuple[model.IPAddress, ...]) -> None:
            obj = ours[key]
            wanted = tuple(str(a) for a in addresses)
            have = tuple(translate.status_ips(obj))
            modes = [e.get("ipMode") for e in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")
                     or []]
            if wanted == have and all(m == mode for m in modes):
                return
            if not await put(key, obj, wanted):
                return
            event(log, logging.INFO, "kubernetes_status_written", service=key,
                  addresses=",".join(wanted) or "-", previous=",".join(have) or "-")
            if wanted and self._recorder is not None:
                await self._recorder.record(obj, "Service", "Normal", "IPAllocated",
                                            f"lbagent gave {', '.join(wanted)}")

        async def release_one(obj: Obj) -> None:
            """A Service lbagent gave an address that is no longer a LoadBalancer (its type changed, which drops
            its class too): the address leaves its status, as the service controller clears what a cloud LB
            wrote. Only the type says so: a LoadBalancer of another class that lbagent's manager wrote belongs to
            another lbagent installation (another class, the same manager name) and is left to it."""
            key = translate.key_of(obj)
            if await put(key, obj, None):
                event(log, logging.INFO, "kubernetes_status_released", service=key,
                      previous=",".join(translate.status_ips(obj)) or "-")

        released = [o for o in snap.services.values()
                    if (o.get("spec") or {}).get("type") != "LoadBalancer"
                    and not (o.get("metadata") or {}).get("deletionTimestamp") and holds_status(o)]
        await asyncio.gather(*(write_one(key, addresses) for key, addresses in result.addresses.items()
                               if key not in gateways),
                             *(release_one(o) for o in released))
        built = await asyncio.to_thread(build, base, snap)
        if built.http is not None and base.kubernetes.ingress is not None:
            addresses = tuple(str(a) for a in base.kubernetes.ingress.addresses)
            await asyncio.gather(*(self._write_ingress(snap.ingresses[key], addresses)
                                   for key in built.http.served if key in snap.ingresses))
        if built.gateway is not None:
            await self._write_gateway_api(built.gateway, snap)
        stores = {"Service": snap.services, "Node": snap.nodes, "Ingress": snap.ingresses,
                  "HTTPRoute": snap.httproutes}
        for key, problems in built.problems.items():
            kind, name = key.split(" ", 1)
            found = stores.get(kind, {}).get(name)
            if found is not None:
                served = kind == "Ingress" and built.http is not None and name in built.http.served
                reason = "NotUsed" if kind == "Node" else "PartlyServed" if served else "NotServed"
                await self._recorder.record(found, kind, "Warning", reason, problem_message(problems))
