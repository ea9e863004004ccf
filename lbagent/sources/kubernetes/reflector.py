"""List and watch one kind of Kubernetes object into a local store, as client-go's reflector does.

- The first full list (paged) marks the store synced; nothing before it is used (an agent that programmed a
  half-listed cluster would withdraw the rest).
- Then a watch from the list's resourceVersion, with bookmarks (the server moves the version on while nothing we
  watch changes, so a reconnect does not fall behind the etcd compaction window), a server-side timeout (a random
  4-8 minutes, as client-go) and a client-side read timeout: a watch whose connection hangs without closing (a
  control plane upgraded under it) is noticed within READ_TIMEOUT and started again, instead of blocking forever.
- 410 Gone (the version was compacted away) lists again; the store is replaced by the new list and every key that
  changed meanwhile is reported, so a change made while the API server was away is applied when it is back.
- Errors back off (0.5 s doubling to 30 s, with jitter) and keep the store as it was: an API outage changes
  nothing in the data plane. `stale_since` says since when the store may be behind.
Objects stay the API's JSON (dicts): the translation reads a few fields, and typed models would cost a
deserialisation of every field of every object. What no part of lbagent reads is left out of the store (`trimmed`):
the managedFields of other field managers and kubectl's last-applied-configuration annotation, which repeat an
object's fields (a third of a Service's JSON as kube-apiserver sends it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lbagent.logfmt import event
from lbagent.sources.kubernetes.writer import FIELD_MANAGER

log = logging.getLogger("lbagent.kubernetes")

PAGE = 500
ABSENT_RETRY = 30.0  # seconds between lists of an optional kind that does not exist (a CRD not installed)
CONNECT_TIMEOUT = 5.0
LIST_READ_TIMEOUT = 60.0
READ_TIMEOUT = 90.0  # longer than the API server's bookmark interval (about a minute)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def trimmed(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the store keeps it: without other managers' managedFields entries (lbagent's own tell the writer
    what it holds) and without kubectl's copy of the last applied object."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return obj
    fields = metadata.get("managedFields")
    if isinstance(fields, list):
        ours = [f for f in fields if isinstance(f, Mapping) and f.get("manager") == FIELD_MANAGER]
        if ours:
            metadata["managedFields"] = ours
        else:
            del metadata["managedFields"]
    annotations = metadata.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(LAST_APPLIED, None)
    return obj


# A generated kubernetes_asyncio list method, e.g. CoreV1Api(api).list_service_for_all_namespaces.
ListFunction = Callable[..., Awaitable[Any]]
Obj = Mapping[str, Any]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion we asked for is too old; list again."""


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))


class Reflector:
    """One kind's store. `on_change(keys)` is called on the loop with the keys that changed (after the first list:
    every key), never while the store is half-updated."""

    def __init__(self, kind: str, list_function: ListFunction, on_change: Callable[[set[str]], None],
                 label_selector: str | None = None, field_selector: str | None = None, optional: bool = False) -> None:
        """`optional`: a kind whose resource may not exist (a CRD not installed): then it is empty, synced, and
        listed again every ABSENT_RETRY seconds until it appears."""
        self.kind = kind
        self.optional = optional
        self.absent = False
        self._list = list_function
        self._on_change = on_change
        self._selector = label_selector
        self._field_selector = field_selector
        self.store: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.stale_since: float | None = None  # wall clock of the first failure since the last success
        self.last_error: str | None = None
        self.relists = 0
        self.events = 0

    def _params(self) -> dict[str, Any]:
        params = {"label_selector": self._selector} if self._selector else {}
        return params | ({"field_selector": self._field_selector} if self._field_selector else {})

    async def _request(self, **params: Any) -> Any:
        response = await self._list(**self._params(), **params, _preload_content=False)
        if response.status >= 300:
            text = await response.text()
            response.release()
            raise (Gone if response.status == 410 else ApiError)(response.status, text)
        return response

    async def list(self) -> None:
        """A full, paged list replaces the store; the keys that differ are reported."""
        items: dict[str, Obj] = {}
        token = None
        while True:
            response = await self._request(limit=PAGE, **({"_continue": token} if token else {}),
                                           _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT))
            body = json.loads(await response.read())
            for item in body.get("items") or []:
                items[object_key(item)] = trimmed(item)
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
                break
        changed = {k for k in items.keys() | self.store.keys() if items.get(k) != self.store.get(k)}
        self.store = items
        self.relists += 1
        self._healthy()
        first = not self.synced.is_set()
        self.synced.set()
        if changed or first:
            self._on_change(changed)

    async def watch(self) -> None:
        """Watch from resource_version until the server ends the watch or the read times out; returns then.
        Raises Gone when the version is too old."""
        timeout = random.randint(240, 480)
        response = await self._request(watch=True, resource_version=self.resource_version,
                                       allow_watch_bookmarks=True, timeout_seconds=timeout,
                                       _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        self._healthy()
        buffer = b""
        try:
            async for chunk in response.content.iter_any():  # lines may be longer than aiohttp's line limit
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._event(json.loads(line))
        finally:
            response.release()

    def _event(self, item: Mapping[str, Any]) -> None:
        kind, obj = item.get("type"), item.get("object") or {}
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "ERROR":
            status = int(obj.get("code") or 0)
            raise (Gone if status == 410 else ApiError)(status, str(obj.get("message")))
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return
        key = object_key(obj)
        if kind == "DELETED":
            existed = self.store.pop(key, None) is not None
        elif kind in ("ADDED", "MODIFIED"):
            obj = trimmed(obj)
            existed = self.store.get(key) != obj
            self.store[key] = obj
        else:
            return
        self.resource_version = version or self.resource_version
        self.events += 1
        if existed:
            self._on_change({key})

    def _absent(self) -> None:
        """The resource does not exist (its CRD is not installed): nothing of the kind, which is no error."""
        if not self.absent:
            event(log, logging.INFO, "kubernetes_kind_absent", kind=self.kind, retry_in=ABSENT_RETRY)
        self.absent = True
        self._healthy()
        changed = set(self.store)
        self.store = {}
        first = not self.synced.is_set()
        self.synced.set()
        if changed or first:
            self._on_change(changed)

    def _healthy(self) -> None:
        if self.stale_since is not None:
            event(log, logging.INFO, "kubernetes_reconnected", kind=self.kind,
                  stale_seconds=round(time.time() - self.stale_since, 1))
        self.stale_since = None
        self.last_error = None

    def _failed(self, exc: BaseException) -> None:
        if self.stale_since is None:
            self.stale_since = time.time()
        self.last_error = f"{type(exc).__name__}: {exc}"

    async def run(self) -> None:
        """List, then watch for ever; list again after a 410, back off after errors."""
        delay = BACKOFF_FIRST
        must_list = True
        while True:
            try:
                if must_list:
                    try:
                        await self.list()
                    except ApiError as exc:
                        if not (self.optional and exc.status == 404):
                            raise
                        self._absent()
                        await asyncio.sleep(ABSENT_RETRY)
                        continue
                    if self.absent:
                        event(log, logging.INFO, "kubernetes_kind_appeared", kind=self.kind)
                        self.absent = False
                    must_list = False
                await self.watch()
                delay = BACKOFF_FIRST
                continue  # the server ended the watch (its timeout), or the read timed out: watch again
            except asyncio.CancelledError:
                raise
            except Gone:
                event(log, logging.INFO, "kubernetes_relist", kind=self.kind, reason="resourceVersion expired (410)",
                      resource_version=self.resource_version)
                must_list = True
                continue
            except TimeoutError as exc:
                # the read timeout: the connection went silent (no event, no bookmark); the store may be behind
                # until a new watch from where we were is answered
                self._failed(exc)
                event(log, logging.INFO, "kubernetes_watch_restarted", kind=self.kind, reason="read timeout",
                      seconds=READ_TIMEOUT)
                continue
            except Exception as exc:
                first = self.stale_since is None
                self._failed(exc)
                event(log, logging.WARNING if first else logging.DEBUG, "kubernetes_unavailable", kind=self.kind,
                      error=self.last_error, retry_in=round(delay, 1), stale_since=self.stale_since)
                must_list = must_list or (isinstance(exc, ApiError) and exc.status in (401, 403, 404))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(BACKOFF_MAX, delay * 2)
