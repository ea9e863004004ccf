"""The daemon: health feeds the plan, four runners (VIPs, data plane, BGP, HAProxy) apply it; the source's changes
reload (the file's: SIGHUP), signals stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

from lbagent import __version__, model
from lbagent.agent.metrics import Metrics
from lbagent.agent.runner import BoundedFrequencyRunner
from lbagent.agent.sdnotify import Notifier
from lbagent.agent.status import SOCKET_NAME, StatusServer
from lbagent.files import UnsafePath, prepare_runtime_dir
from lbagent.health import HealthChecker, Prober, probe
from lbagent.l3.speaker import BgpSpeaker, ExaBgpSpeaker
from lbagent.l3.vips import VipBinder, apply_sysctls, watch_removed_addresses
from lbagent.l4.conntrack import clear_udp
from lbagent.l4.drift import NftChange, NftWatcher
from lbagent.l4.forwarder import Forwarder, FrontendChange, make_forwarder
from lbagent.l7 import render as render_haproxy
from lbagent.l7.certs import CertificateStore
from lbagent.l7.haproxy import ConfigRefused, HaproxyProcess, ProxyError, ProxyLayer
from lbagent.logfmt import event
from lbagent.plan import http as plan_http
from lbagent.plan.services import (
    Frontend,
    Plan,
    ServiceDecision,
    listener_decision,
    plan,
    replan,
    stale_udp_flows,
    with_listeners,
)
from lbagent.sources import Source, SourceError

log = logging.getLogger("lbagent.agent")

SpeakerFactory = Callable[[model.Bgp, str, Callable[[], None]], BgpSpeaker]
ProxyFactory = Callable[[model.Proxy, str, Callable[[], None]], ProxyLayer]

# Fields whose change would need lbagent to move state it owns somewhere else: refused on reload.
_RESTART_ONLY: dict[str, Callable[[model.Model], object]] = {
    "node.vipInterface": lambda m: m.vip_interface,
    "agent.runtimeDir": lambda m: m.agent.runtime_dir,
    "agent.metricsAddress": lambda m: m.agent.metrics_address,
    "dataplane.table": lambda m: m.dataplane.table,
    "dataplane.kind": lambda m: m.dataplane.kind,
}
# Fixed while lbagent runs a HAProxy (from the first listener until the last one is removed).
_RESTART_ONLY_PROXY: dict[str, Callable[[model.Model], object]] = {
    "proxy.haproxy": lambda m: m.proxy.haproxy,
}


def load_off_the_loop(source: Source) -> model.Model:
    """The source's load (the file's: config.load) for a running agent, in a worker thread. The garbage collector
    holds the GIL for the whole of a collection, so a full one in the middle of a large load stalls the event loop
    however the load is threaded (0.43 s at 10,000 services, 1.6 s at 4,000 routes; bench/config_load.py). It is off
    during the load (what the load allocates and drops is freed by reference counting). A large model is then frozen
    out of future collections (it is immutable and kept until the next load); freezing also keeps whatever cyclic
    garbage the rest of the process has pending at that moment, so a small model, whose collections cost little, is
    not."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        new = source.load()
        new.digest()  # here, not on the loop
        if gc.get_count()[0] > FREEZE_AFTER_OBJECTS:
            gc.freeze()
        return new
    finally:
        if enabled:
            gc.enable()


# Objects a load leaves behind (net of what it freed) past which the model is frozen out of collections: about
# 2,000 services; 10,000 leave 92,000, the lab's config 215.
FREEZE_AFTER_OBJECTS = 20_000


# Drift repairs: the first few at once; when drift keeps coming with less than DRIFT_QUIET seconds between reports,
# each further repair waits twice as long as the one before, up to DRIFT_DELAY_MAX.
DRIFT_QUIET = 10.0
DRIFT_PROMPT_REPAIRS = 3
DRIFT_DELAY_MAX = 30.0


def drift_repair_delay(streak: int) -> float:
    """Seconds to wait before repairing the `streak`-th drift report in a row."""
    if streak <= DRIFT_PROMPT_REPAIRS:
        return 0.0
    return min(DRIFT_DELAY_MAX, 0.5 * 2.0 ** (streak - DRIFT_PROMPT_REPAIRS - 1))


def _default_speaker(bgp: model.Bgp, runtime_dir: str, on_change: Callable[[], None]) -> BgpSpeaker:
    return ExaBgpSpeaker(bgp, runtime_dir, on_change)


def _default_proxy(proxy: model.Proxy, runtime_dir: str, on_change: Callable[[], None]) -> ProxyLayer:
    return HaproxyProcess(proxy.haproxy, runtime_dir, on_change)


class Agent:
    """One LB node's agent. Deciding is in `plan`/`render`; this class only sequences and applies."""

    def __init__(
        self,
        source: Source,
        initial: model.Model,
        *,
        speaker_factory: SpeakerFactory = _default_speaker,
        forwarder: Forwarder | None = None,
        binder: VipBinder | None = None,
        prober: Prober = probe,
        sysctl_root: Path = Path("/proc/sys"),
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        proxy_factory: ProxyFactory = _default_proxy,
        watch_drift: bool = True,
    ) -> None:
        self.source = source  # where the model comes from: the agent does not know which source it is
        self.model = initial
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.draining = False
        self.health = HealthChecker(self._health_changed, prober)
        self.speaker = speaker_factory(initial.bgp, initial.agent.runtime_dir, self._bgp_changed)
        self.forwarder = forwarder or make_forwarder(initial.dataplane)
        self.binder = binder or VipBinder(initial.vip_interface)
        self._proxy_factory = proxy_factory
        self._proxy: ProxyLayer | None = None  # made when the first listener is configured
        self.certificates = CertificateStore(Path(initial.agent.runtime_dir) / "haproxy" / "certs",
                                             initial.agent.runtime_dir)
        self._proxy_plan: plan_http.ProxyPlan | None = None  # what HAProxy runs now (None: not running)
        # its structure (plan without runtime state, settings) and that structure rendered, to skip rendering again
        self._proxy_shape: tuple[tuple[plan_http.ProxyPlan, model.Proxy], str] | None = None
        self._proxy_rejected: str | None = None  # the last config HAProxy's validation refused
        self._proxy_restarts = 0
        self._sysctl_root = sysctl_root
        self._bound: set[model.IPAddress] = set()
        self._started = False  # the first syncs are done: what the BGP runner announces is complete
        self._programmed: set[model.IPAddress] = set()
        self._applied: Mapping[str, tuple[Frontend, ...]] = {}
        self._applied_vips: tuple[model.IPAddress, ...] = ()
        self._speaker_restarts = 0
        self.clear_udp = clear_udp
        self._plan: Plan | None = None
        self._plan_draining = False
        self._replan_all = True
        self._replan: set[str] = set()
        self._dataplane_dirty: set[str] | None = None  # services changed since the last apply; None: all
        self._decisions: Mapping[str, ServiceDecision] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_drift = watch_drift
        self._drift_pending = False  # the kernel lost what the data plane applied: unknown until the next apply
        self._drift_streak = 0  # drift reports with less than DRIFT_QUIET seconds between them
        self._drift_last = -DRIFT_QUIET
        self._drift_repair: asyncio.TimerHandle | None = None  # a repair put off because the drift keeps coming
        self._exit_code = 0  # 1 once the agent stops for anything but a signal: systemd's Restart=on-failure
        a = initial.agent
        self.runners = {
            name: BoundedFrequencyRunner(name, self._measured(name, fn), a.min_sync_interval, a.resync_seconds,
                                         a.retry_seconds)
            for name, fn in (("vips", self._sync_vips), ("dataplane", self._sync_dataplane), ("bgp", self._sync_bgp),
                             ("proxy", self._sync_proxy))
        }

    def _measured(self, name: str, sync: Callable[[bool], Awaitable[None]]) -> Callable[[bool], Awaitable[None]]:
        async def run(resync: bool) -> None:
            started = time.monotonic()
            try:
                await sync(resync)
            except Exception:
                self.metrics.sync_errors.labels(name).inc()
                raise
            finally:
                self.metrics.sync_duration.labels(name).observe(time.monotonic() - started)
            self.metrics.last_sync.labels(name).set(time.time())

        return run

    # -- deciding -------------------------------------------------------------------------------------

    def current_plan(self) -> Plan:
        """The plan for the current model and verdicts: recomputed whole after a reload or a change of the
        draining state, and only for the services whose health changed otherwise."""
        if self._plan is None or self._replan_all or self._plan_draining != self.draining:
            self._plan = plan(self.model, self.health.verdicts, self.draining)
        elif self._replan:
            self._plan = replan(self._plan, self.model, self.health.verdicts, self._replan, self.draining)
        self._replan_all, self._replan, self._plan_draining = False, set(), self.draining
        if self.model.listeners:
            self._plan = with_listeners(self._plan, self.model, self._listener_decisions())
        return self._plan

    @property
    def proxy(self) -> ProxyLayer:
        if self._proxy is None:
            self._proxy = self._proxy_factory(self.model.proxy, self.model.agent.runtime_dir, self._proxy_changed)
        return self._proxy

    def _proxy_up(self) -> bool:
        return self._proxy is not None and self._proxy.up()

    def _listener_decisions(self) -> list[ServiceDecision]:
        """Each listener from what HAProxy serves now: announced while it runs and a backend can answer."""
        running = self._proxy_plan
        up = running is not None and self._proxy_up()
        fronts = {f.listener: f for f in running.frontends} if running is not None else {}
        out = []
        for listener in self.model.listeners:
            front = fronts.get(listener.name)
            usable, unusable = plan_http.listener_serves(front, running) if front and running else ([], [])
            out.append(listener_decision(listener, usable, unusable, up and front is not None, self.draining))
        return out

    def _invalidate(self) -> None:
        """Everything is decided and applied afresh (a reload)."""
        self._replan_all = True
        self._dataplane_dirty = None

    # -- events ---------------------------------------------------------------------------------------

    def _health_changed(self, key: tuple[str, str]) -> None:
        """A (service or `backend:NAME`, node or endpoint) pair changed: only the layers that use it follow."""
        if key in self.health.verdicts:
            self.metrics.node_healthy.labels(*key).set(1 if self.health.verdicts[key] else 0)
        if self.model.has_service(key[0]):  # a static backend's endpoints are HAProxy's alone
            self._replan.add(key[0])
            if self._dataplane_dirty is not None:
                self._dataplane_dirty.add(key[0])
            self.runners["dataplane"].mark_dirty()
            self.runners["bgp"].mark_dirty()
        if key[0] in self.model.http_health_keys:
            self.runners["proxy"].mark_dirty()

    def _proxy_changed(self) -> None:
        """HAProxy went down or came back: its listeners' announcements follow."""
        self.runners["proxy"].mark_dirty()
        self.runners["bgp"].mark_dirty()

    def _bgp_changed(self) -> None:
        self.runners["bgp"].mark_dirty()

    def mark_all_dirty(self) -> None:
        for runner in self.runners.values():
            runner.mark_dirty()

    # -- applying -------------------------------------------------------------------------------------

    async def _sync_vips(self, resync: bool) -> None:
        p = self.current_plan()
        # A VIP is unbound only once it is no longer announced: withdraw first, then let go of the address.
        announced = {ip_interface(prefix).ip for prefix in self.speaker.announced()}
        try:
            bound = await self.binder.sync(p.vips, keep=announced)
        except BaseException:
            # What is bound is unknown now (a VIP taken away that cannot be bound again): announce only what is
            # there, so no router sends this node traffic for an address it does not hold.
            with contextlib.suppress(Exception):
                actual = await self.binder.bound()
                if actual != self._bound:
                    self._bound = actual
                    self.runners["bgp"].mark_dirty()
            raise
        if bound != self._bound:
            self._bound = bound
            self.runners["bgp"].mark_dirty()

    async def _sync_dataplane(self, resync: bool) -> None:
        p = self.current_plan()
        dirty, self._dataplane_dirty = self._dataplane_dirty, set()
        change = None
        if not resync and dirty is not None and p.l4_vips == self._applied_vips:
            change = FrontendChange.of(self._applied, p.by_service, dirty)
        try:
            how = await self.forwarder.apply(p.frontends, p.l4_vips, force=resync, change=change)
        except BaseException:
            self._dataplane_dirty = None  # whatever happened, the next sync applies everything
            if self._drift_pending and self._programmed:
                # Someone else changed the table and it could not be put back: nothing is known to forward.
                self._programmed = set()
                self.runners["bgp"].mark_dirty()
            raise
        self._drift_pending = False
        self.metrics.dataplane_applies.labels(how).inc()
        if change is None:
            change = FrontendChange(self._applied, p.by_service)
        for key in change.services:
            for stale in stale_udp_flows(change.before(key), change.after(key)):
                await self.clear_udp(stale)
        self._applied, self._applied_vips = p.by_service, p.l4_vips
        programmed = self.forwarder.programmed()
        if programmed != self._programmed:
            self._programmed = programmed
            self.runners["bgp"].mark_dirty()

    async def _sync_bgp(self, resync: bool) -> None:
        p = self.current_plan()
        # Never attract traffic this node cannot serve yet: the VIP must be bound and its forwarding programmed.
        served = self._programmed | self._proxy_vips()
        desired = {
            prefix: a for prefix, a in p.announcements.items()
            if ip_interface(prefix).ip in self._bound and ip_interface(prefix).ip in served
        }
        before = set(self.speaker.announced())
        await self.speaker.apply(desired, complete=self._started)
        self._log_decisions(p)
        self.metrics.bgp(self.speaker.peers(), len(self.speaker.announced()))
        if self.speaker.restarts > self._speaker_restarts:
            self.metrics.process_restarts.labels("exabgp").inc(self.speaker.restarts - self._speaker_restarts)
            self._speaker_restarts = self.speaker.restarts
        if before - set(self.speaker.announced()):
            self.runners["vips"].mark_dirty()

    def _proxy_vips(self) -> set[model.IPAddress]:
        """The VIPs HAProxy listens on now."""
        if self._proxy_plan is None or not self._proxy_up():
            return set()
        return {v for f in self._proxy_plan.frontends for v in f.vips}

    async def _sync_proxy(self, resync: bool) -> None:
        """HAProxy as the plan wants it: started, reloaded seamlessly for a structural change, runtime API for
        server weights and states, runtime API for replaced certificates. A config HAProxy refuses is logged and
        the running one stays."""
        m = self.model
        if not m.listeners:
            if self._proxy is not None:
                await self._proxy.stop(m.agent.drain_seconds)
                # the next listener gets a HAProxy of the settings then (its executable may have changed)
                self._proxy, self._proxy_plan, self._proxy_shape, self._proxy_restarts = None, None, None, 0
                event(log, logging.INFO, "haproxy_stopped", reason="no listeners configured")
                self.metrics.certificates({})
            return
        paths = self.certificates.sync(m.listeners)
        self.metrics.certificates(self.certificates.validity())
        planned = plan_http.plan_proxy(m, self.health.verdicts, paths)
        text = render_haproxy.render(planned, m.proxy, self.proxy.runtime_socket)
        shape = (plan_http.structural(planned), m.proxy)
        if self._proxy_shape is not None and self._proxy_shape[0] == shape and self._proxy_up():
            # what changed is runtime state only (the common case: health): no second render, no reload reason
            structure, (kind, detail) = self._proxy_shape[1], ("runtime", "")
        else:
            structure = render_haproxy.render(shape[0], m.proxy, self.proxy.runtime_socket)
            kind, detail = plan_http.changes(self._proxy_plan if self._proxy_up() else None, planned)
        # Replacements made before this apply: a start or reload reads them; else the runtime API gets them. One
        # made while apply runs stays pending for the next sync (which the certificate watcher asks for).
        replacements = self.certificates.take_pending()
        try:
            result = await self.proxy.apply(text, structure, planned.runtime(), kind)
        except BaseException as exc:
            for replaced in replacements:
                self.certificates.requeue(replaced)
            if not isinstance(exc, ConfigRefused):
                raise  # anything else HAProxy says fails this sync: the runner retries it
            if self._proxy_rejected != text:
                self._proxy_rejected = text
                self.metrics.haproxy_reload_failures.inc()
                event(log, logging.ERROR, "haproxy_config_rejected", error=str(exc), kept="running config")
            return
        self._proxy_rejected = None
        if result.reloaded or result.started:
            self.metrics.haproxy_reloads.labels(kind).inc()
            replacements = []  # HAProxy has just read every file
            event(log, logging.INFO, "proxy_config_applied", how="start" if result.started else "reload",
                  reason=kind, changed=detail)
        for replaced in replacements:
            try:
                await self.proxy.set_certificate(replaced.path, replaced.pem)
            except ProxyError as exc:  # offered again on the next sync (a reload or restart reads the file anyway)
                self.certificates.requeue(replaced)
                event(log, logging.ERROR, "certificate_update_failed", file=replaced.path, error=str(exc))
                continue
            self.metrics.certificate_updates.inc()
            event(log, logging.INFO, "certificate_replaced", file=replaced.path, how="runtime API")
        if result.runtime_updates:
            self.metrics.haproxy_runtime_updates.inc(result.runtime_updates)
        self.metrics.haproxy_up.set(1 if self._proxy_up() else 0)
        if self.proxy.restarts > self._proxy_restarts:
            self.metrics.process_restarts.labels("haproxy").inc(self.proxy.restarts - self._proxy_restarts)
            self._proxy_restarts = self.proxy.restarts
        self._proxy_plan, self._proxy_shape = planned, (shape, structure)
        self.runners["bgp"].mark_dirty()

    # -- drift ----------------------------------------------------------------------------------------

    def _dataplane_drift(self, change: NftChange) -> None:
        """Another process changed the data plane's nftables table: the next sync, at once, rewrites it whole.
        When the drift keeps coming (a firewall manager fighting over the table, or lbagent's own commits not
        recognised), repairs back off so that the two never spin each other."""
        self.metrics.drift.labels("dataplane").inc()
        now = time.monotonic()
        if now - self._drift_last > DRIFT_QUIET:
            self._drift_streak = 0
        self._drift_last = now
        self._drift_streak += 1
        delay = drift_repair_delay(self._drift_streak)
        event(log, logging.WARNING, "dataplane_drift", change=change.what, pid=change.pid, process=change.process,
              generation=change.generation, action="full apply now" if not delay else f"full apply in {delay:g}s",
              **({"repeated": self._drift_streak} if delay else {}))
        self._drift_pending = True
        self._dataplane_dirty = None
        if not delay:
            self.runners["dataplane"].request_resync()
        elif self._drift_repair is None:
            self._drift_repair = asyncio.get_running_loop().call_later(delay, self._repair_drift)

    def _repair_drift(self) -> None:
        self._drift_repair = None
        self._dataplane_dirty = None
        self.runners["dataplane"].request_resync()

    def _dataplane_events_lost(self) -> None:
        event(log, logging.WARNING, "dataplane_events_lost", action="full apply now")
        self._dataplane_dirty = None
        self.runners["dataplane"].request_resync()

    def _address_removed(self, address: model.IPAddress) -> None:
        """An address left the VIP interface: if it is a VIP this node should hold, someone else removed it."""
        if address not in self._bound or self._plan is None or address not in self._plan.vips:
            return  # not ours, or lbagent's own unbind
        self.metrics.drift.labels("vip").inc()
        event(log, logging.WARNING, "vip_drift", vip=address, interface=self.model.vip_interface,
              action="bind again now")
        self.runners["vips"].mark_dirty()

    async def _watch_dataplane(self) -> None:
        tables = self.forwarder.nft_tables
        if not tables():
            return
        await NftWatcher(tables, self._dataplane_drift, self._dataplane_events_lost).run()

    async def _watch_addresses(self) -> None:
        await watch_removed_addresses(self.model.vip_interface, self._address_removed)

    async def _watch_certificates(self) -> None:
        """Certificate files replaced on disk reach HAProxy through its runtime API, without a reload."""
        while True:
            await asyncio.sleep(self.model.proxy.certificate_check_interval)
            if self.model.listeners and self.certificates.look():
                self.runners["proxy"].mark_dirty()

    def _log_decisions(self, p: Plan) -> None:
        """Log and export the services whose announce decision changed since the last call, and only those."""
        current = p.decision_by_service
        changed = []
        for key, decision in current.items():
            previous = self._decisions.get(key)
            if previous is decision:  # replan keeps the decisions of services it did not touch
                continue
            if previous is not None and (previous.announce, previous.reason) == (decision.announce, decision.reason):
                continue
            changed.append(decision)
            event(
                log, logging.INFO if decision.announce else logging.WARNING,
                ("vip_announced" if decision.announce else "vip_withdrawn") if decision.vips
                else ("backend_ready" if decision.announce else "backend_unavailable"),
                service=key, vips=decision.vips, reason=decision.reason.value,
                healthy_nodes=decision.healthy_nodes or "-", unhealthy_nodes=decision.unhealthy_nodes or "-",
                draining_nodes=decision.draining_nodes or "-",
            )
        self.metrics.decisions(changed, self._decisions.keys() - current.keys())
        self._decisions = current

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `lbagent status` shows: read from the state the agent acts on, never recomputed for show."""
        p = self._plan or self.current_plan()
        announced = set(self.speaker.announced())
        verdicts, reasons = self.health.verdicts, self.health.reasons()
        listeners = {listener.key for listener in self.model.listeners}
        now = time.monotonic()
        return {
            "version": __version__, "node": self.model.node_name, "configHash": self.model.digest(),
            "dataplane": self.model.dataplane.kind.value, "draining": self.draining,
            "peers": dict(self.speaker.peers()),
            "vips": [{"prefix": model.host_prefix(v), "announced": model.host_prefix(v) in announced,
                      "bound": v in self._bound} for v in p.vips],
            "services": [
                {"service": d.service, "vips": [str(v) for v in d.vips], "announce": d.announce,
                 "reason": d.reason.value,
                 "nodes": [{"node": n.name, "healthy": verdicts.get((d.service, n.name)),
                            "reason": reasons.get((d.service, n.name), "notProbed")} for n in self.model.nodes]}
                for d in p.decisions if d.service not in listeners
            ],
            "listeners": [
                {"listener": d.service.removeprefix("listener:"), "vips": [str(v) for v in d.vips],
                 "announce": d.announce, "reason": d.reason.value, "backendsServing": list(d.healthy_nodes),
                 "backendsDown": list(d.unhealthy_nodes)}
                for d in p.decisions if d.service in listeners
            ],
            "proxy": None if not self.model.listeners else {
                "up": self._proxy_up(), "reloads": dict(self._proxy.reloads) if self._proxy else {},
                "runtimeUpdates": self._proxy.runtime_updates if self._proxy else 0,
                "restarts": self._proxy.restarts if self._proxy else 0,
            },
            "sync": {name: {"secondsAgo": None if r.last_success is None else now - r.last_success,
                            "lastError": r.last_error, "runs": r.runs, "failures": r.failures}
                     for name, r in self.runners.items()},
        }

    # -- life cycle -----------------------------------------------------------------------------------

    async def run(self, serve_metrics: bool = False) -> int:
        try:
            prepare_runtime_dir(self.model.agent.runtime_dir)
        except UnsafePath as exc:  # another user could replace the configs and sockets the agent keeps there
            for problem in exc.problems:
                event(log, logging.ERROR, "runtime_dir_unsafe", path=self.model.agent.runtime_dir, error=problem)
            return 1
        loop = asyncio.get_running_loop()
        self.metrics.config_loaded(self.model.digest())
        if serve_metrics and self.model.agent.metrics_address:
            host, _, port = self.model.agent.metrics_address.rpartition(":")
            self.metrics.serve(host.strip("[]"), int(port))
        status = StatusServer(Path(self.model.agent.runtime_dir) / SOCKET_NAME, self.status)
        await status.start()
        loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
        self.source.watch(lambda: self._spawn(self.reload(), "reload"))  # the file's: SIGHUP
        event(log, logging.INFO, "agent_starting", node=self.model.node_name, config=self.source.name,
              config_hash=self.model.digest(), services=len(self.model.services), nodes=len(self.model.nodes))
        apply_sysctls(self.current_plan().sysctls, self._sysctl_root)
        self.health.update(self.model)
        self.health.start()
        await self._first_snapshot()
        await self.speaker.start()
        for name, runner in self.runners.items():
            self._spawn(self._supervise(f"runner {name}", runner.run_forever), f"runner {name}")
        self._spawn(self._supervise("watchdog", self.notifier.feed_watchdog), "watchdog")
        self._spawn(self._supervise("certificate watcher", self._watch_certificates), "certificate watcher")
        if self._watch_drift:
            self._spawn(self._supervise("dataplane drift watcher", self._watch_dataplane), "dataplane drift watcher")
            self._spawn(self._supervise("address drift watcher", self._watch_addresses), "address drift watcher")
        await self._first_syncs()
        # What is bound and programmed now is what this node serves: the next BGP pass announces all of it and
        # (with graceful restart) ends the routers' wait with End-of-RIB.
        self._started = True
        self.runners["bgp"].mark_dirty()
        self.notifier.ready(f"serving {len(self.model.services)} services")
        event(log, logging.INFO, "agent_started", node=self.model.node_name)
        await self._stop.wait()
        await self._shutdown()
        await status.stop()
        return self._exit_code

    async def _first_snapshot(self) -> None:
        """Program nothing until every (service, node) pair has a verdict, bounded by the longest probe timeout."""
        limit = max((s.health_check.timeout for s in self.model.services), default=0.0) + 1.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self.health.wait_complete()
        event(log, logging.INFO, "first_health_snapshot", complete=self.health.complete(),
              healthy=sum(self.health.snapshot().values()), pairs=len(self.health.reasons()))

    async def _first_syncs(self) -> None:
        """Ready (for systemd) once VIPs and forwarding are programmed; BGP may take as long as the peers need."""
        async def synced() -> None:
            await self.runners["vips"].wait_synced()
            await self.runners["dataplane"].wait_synced()
            if self.model.listeners:
                await self.runners["proxy"].wait_synced()

        waits = [asyncio.ensure_future(synced()), asyncio.ensure_future(self._stop.wait())]
        await asyncio.wait(waits, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()

    def stop(self, why: str = "request", exit_code: int = 0) -> None:
        if not self._stop.is_set():
            self._exit_code = exit_code
            self.notifier.stopping()
            event(log, logging.INFO, "agent_stopping", signal=why)
            self._stop.set()

    async def _shutdown(self) -> None:
        # Withdraw everything before anything else is torn down: the routers move traffic to the other LB
        # nodes while this one still forwards what is in flight.
        self.draining = True
        try:
            async with asyncio.timeout(5):
                await self.speaker.withdraw_all()
            self._log_decisions(self.current_plan())
            event(log, logging.INFO, "withdrew_all", drain_seconds=self.model.agent.drain_seconds)
        except Exception as exc:
            event(log, logging.ERROR, "withdraw_all_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(self.model.agent.drain_seconds)
        if self._drift_repair is not None:
            self._drift_repair.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.stop()
        await self.speaker.stop()
        if self._proxy_plan is not None:
            # Withdrawn and drained: HAProxy finishes what it has in flight, then goes.
            await self.proxy.stop(self.model.agent.drain_seconds)
        # The VIPs and the nftables table stay: connections still in flight keep working, and a restarted
        # agent adopts them without a gap. `lbagent cleanup` removes them.
        event(log, logging.INFO, "agent_stopped")

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    async def _supervise(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived task; when it fails, say so and start it again after the retry interval, so one
        subsystem's internal error is retried and reported instead of taking the node out of service."""
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.task_restarts.labels(task=name).inc()
                event(log, logging.ERROR, "task_failed", task=name, error=f"{type(exc).__name__}: {exc}",
                      retry_in=self.model.agent.retry_seconds)
                await asyncio.sleep(self.model.agent.retry_seconds)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            # Not supervised, and nothing else should get here: stop, and exit non-zero so systemd restarts us.
            event(log, logging.ERROR, "task_crashed", task=task.get_name(), error=repr(task.exception()))
            self.stop("internal error", exit_code=1)

    async def reload(self) -> bool:
        """The source changed (the file: SIGHUP): load it again. A bad file is refused and the running config stays
        as it was; so does one that `check` accepts but whose apply fails (the running config is put back, and the
        log says why)."""
        self.notifier.reloading()
        previous = self.model
        try:
            return await self._reload()
        except Exception as exc:
            self.metrics.config_load_errors.inc()
            event(log, logging.ERROR, "config_apply_failed", file=self.source.name,
                  error=f"{type(exc).__name__}: {exc}", kept_hash=previous.digest())
            if self.model != previous:
                await self._restore(previous)
            return False
        finally:
            self.notifier.ready(f"serving {len(self.model.services)} services, config {self.model.digest()}")

    async def _restore(self, previous: model.Model) -> None:
        """Put the running config back after a reload whose apply failed."""
        failed, self.model = self.model, previous
        self.health.update(previous)
        self.metrics.config_loaded(previous.digest())
        self._invalidate()
        if failed.bgp != previous.bgp:
            try:
                await self.speaker.reconfigure(previous.bgp)
            except Exception as exc:
                event(log, logging.ERROR, "config_restore_failed", subsystem="bgp",
                      error=f"{type(exc).__name__}: {exc}")
        self.mark_all_dirty()

    async def _reload(self) -> bool:
        try:
            # In a worker thread: a large file takes seconds to parse and check (10,000 services: about 3 s),
            # and the event loop must go on feeding the watchdog, probing and syncing meanwhile. The parse is
            # pure (it reads the file and builds new frozen objects), so it shares nothing with the loop.
            new = await asyncio.to_thread(load_off_the_loop, self.source)
        except SourceError as exc:
            self.metrics.config_load_errors.inc()
            for problem in exc.problems:
                event(log, logging.ERROR, "config_problem", file=exc.source, line=problem.line or "-",
                      field=problem.path, value=problem.value, error=problem.message)
            event(log, logging.ERROR, "config_rejected", file=exc.source, problems=len(exc.problems),
                  kept_hash=self.model.digest())
            return False
        restart_only = {**_RESTART_ONLY, **(_RESTART_ONLY_PROXY if self._proxy is not None else {})}
        for name, get in restart_only.items():
            if get(new) != get(self.model):
                self.metrics.config_load_errors.inc()
                event(log, logging.ERROR, "config_rejected", file=self.source.name, field=name,
                      value=get(new), error="changing this field needs a restart", kept_hash=self.model.digest())
                return False
        if new == self.model:
            event(log, logging.INFO, "config_unchanged", config_hash=new.digest())
            return True
        old, self.model = self.model, new
        self.health.update(new)
        self.metrics.health(self.health.verdicts, self.health.reasons())
        self.metrics.config_loaded(new.digest())
        self._invalidate()
        apply_sysctls(self.current_plan().sysctls, self._sysctl_root)
        if new.bgp != old.bgp:
            await self.speaker.reconfigure(new.bgp)
        self.mark_all_dirty()
        event(log, logging.INFO, "config_loaded", config_hash=new.digest(), previous_hash=old.digest(),
              services=len(new.services), nodes=len(new.nodes))
        return True
