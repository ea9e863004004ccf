"""The daemon: health feeds the plan, one reconciler per subsystem (VIPs, data plane, BGP, HAProxy) applies it;
the source's changes reload (the file's: SIGHUP), signals stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from lbagent import __version__, model
from lbagent.agent.bgp import BgpReconciler, SpeakerFactory
from lbagent.agent.dataplane import DataplaneReconciler
from lbagent.agent.metrics import Metrics
from lbagent.agent.proxy import ProxyFactory, ProxyReconciler
from lbagent.agent.reconciler import Reconciler
from lbagent.agent.runner import BoundedFrequencyRunner
from lbagent.agent.sdnotify import Notifier
from lbagent.agent.status import SOCKET_NAME, StatusServer
from lbagent.agent.vips import VipReconciler
from lbagent.files import UnsafePath, prepare_runtime_dir
from lbagent.health import HealthChecker, Prober, not_probed_reason, probe
from lbagent.l3.bfd import BfdSpeaker, BfdUnavailable
from lbagent.l3.speaker import BgpSpeaker, ExaBgpSpeaker
from lbagent.l3.vips import VipBinder, apply_sysctls
from lbagent.l4.forwarder import Forwarder, make_forwarder
from lbagent.l7.process import HaproxyProcess, ProxyLayer
from lbagent.logfmt import event
from lbagent.plan.services import Plan, changed_services, plan, replan, with_listeners
from lbagent.sources import Source, SourceError

log = logging.getLogger("lbagent.agent")

# Fields whose change would need lbagent to move state it owns somewhere else: refused on reload.
_RESTART_ONLY: dict[str, Callable[[model.Model], object]] = {
    "node.vipInterface": lambda m: m.vip_interface,
    "agent.runtimeDir": lambda m: m.agent.runtime_dir,
    "agent.metricsAddress": lambda m: m.agent.metrics_address,
    "dataplane.table": lambda m: m.dataplane.table,
    "dataplane.kind": lambda m: m.dataplane.kind,
    # the source itself: whether the API is read, with which credentials, and the writer's Lease
    "kubernetes": lambda m: m.kubernetes is not None,
    "kubernetes.kubeconfig": lambda m: m.kubernetes.kubeconfig if m.kubernetes else None,
    "kubernetes.lease": lambda m: (m.kubernetes.lease_namespace, m.kubernetes.lease_name, m.kubernetes.lease_seconds)
    if m.kubernetes else None,
}
# Fixed while lbagent runs a HAProxy (from the first listener until the last one is removed).
_RESTART_ONLY_PROXY: dict[str, Callable[[model.Model], object]] = {
    "proxy.haproxy": lambda m: m.proxy.haproxy,
}


def load_off_the_loop(source: Source) -> model.Model:
    """The source's load (the file's: config.load) for a running agent, in a worker thread: `loaded`."""
    return loaded(source.load)


def loaded(load: Callable[[], model.Model]) -> model.Model:
    """A model loaded the agent's way (what bench/scale.py uses for its generated model too). The garbage collector
    holds the GIL for the whole of a collection, so a full one in the middle of a large load stalls the event loop
    however the load is threaded (0.43 s at 10,000 services, 1.6 s at 4,000 routes; bench/config_load.py). It is off
    during the load (what the load allocates and drops is freed by reference counting). A large model is then frozen
    out of future collections (it is immutable and kept until the next load); freezing also keeps whatever cyclic
    garbage the rest of the process has pending at that moment, so a small model, whose collections cost little, is
    not."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        new = load()
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


def _default_speaker(bgp: model.Bgp, runtime_dir: str, on_change: Callable[[], None]) -> BgpSpeaker:
    return ExaBgpSpeaker(bgp, runtime_dir, on_change)


def _default_bfd(bgp: model.Bgp, runtime_dir: str) -> BfdSpeaker:
    return BfdSpeaker(bgp, runtime_dir)


def _default_proxy(proxy: model.Proxy, runtime_dir: str, on_change: Callable[[], None]) -> ProxyLayer:
    return HaproxyProcess(proxy.haproxy, runtime_dir, on_change)


class Agent:
    """One LB node's agent. Deciding is in `plan`/`render`, applying in the reconcilers (agent/vips.py,
    dataplane.py, bgp.py, proxy.py); this class sequences: source -> health -> plan -> reconcilers, reloads, and
    assembles the status."""

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
        bfd_factory: Callable[[model.Bgp, str], BfdSpeaker] = _default_bfd,
    ) -> None:
        self.source = source  # where the model comes from: the agent does not know which source it is
        self.model = initial
        self.metrics = metrics or Metrics()
        self.metrics.follow_source(self.source.status)
        self.notifier = notifier or Notifier()
        self.draining = False
        self.health = HealthChecker(self._health_changed, prober, self.metrics.cut_off)
        a = initial.agent
        self.bgp = BgpReconciler(self, a, self.metrics, speaker_factory, self._servable)
        self.vips = VipReconciler(self, a, self.metrics, binder or VipBinder(initial.vip_interface),
                                  self.bgp.speaker.announced)
        self.dataplane = DataplaneReconciler(self, a, self.metrics, forwarder or make_forwarder(initial.dataplane))
        self.proxy = ProxyReconciler(self, a, self.metrics, self.health, proxy_factory)
        # BFD for the BGP sessions (bfdd): the routers' business, nothing the agent decides on.
        self.bfd = bfd_factory(initial.bgp, a.runtime_dir)
        self._bfd_restarts = 0
        # Who reads whose state: a change marks the readers dirty. A VIP is announced only once it is bound and
        # forwarded (or served by HAProxy), and unbound only once it is withdrawn.
        self.vips.readers, self.dataplane.readers, self.proxy.readers = [self.bgp], [self.bgp], [self.bgp]
        self.bgp.readers = [self.vips]
        self.reconcilers: tuple[Reconciler, ...] = (self.vips, self.dataplane, self.bgp, self.proxy)
        self._sysctl_root = sysctl_root
        self._plan: Plan | None = None
        self._plan_draining = False
        self._replan_all = True
        self._replan: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading = False  # a reload task runs (_source_changed)
        self._reload_again = False  # the source changed again while it ran
        self._watch_drift = watch_drift
        self._exit_code = 0  # 1 once the agent stops for anything but a signal: systemd's Restart=on-failure

    @property
    def runners(self) -> dict[str, BoundedFrequencyRunner]:
        return {r.name: r.runner for r in self.reconcilers}

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
            self._plan = with_listeners(self._plan, self.model,
                                        self.proxy.listener_decisions(self.model, self.draining))
        return self._plan

    def _servable(self) -> set[model.IPAddress]:
        """The VIPs BGP may announce now: bound, and forwarded by the kernel or served by HAProxy."""
        return self.vips.bound & (self.dataplane.programmed | self.proxy.serving())

    def _invalidate(self) -> None:
        """Everything is decided and applied afresh (a reload that changed more than services)."""
        self._replan_all = True
        self.dataplane.invalidate()

    def _changed_services(self, keys: Iterable[str]) -> None:
        """These services were added, removed or changed by a reload: only they are planned and applied again."""
        for key in keys:
            self._replan.add(key)
            self.dataplane.service_changed(key)

    # -- events ---------------------------------------------------------------------------------------

    def _health_changed(self, key: tuple[str, str]) -> None:
        """A (service or `backend:NAME`, node or endpoint) pair changed: only the layers that use it follow."""
        if key in self.health.verdicts:
            self.metrics.node_healthy.labels(*key).set(1 if self.health.verdicts[key] else 0)
        if self.model.has_service(key[0]):  # a static backend's endpoints are HAProxy's alone
            self._replan.add(key[0])
            self.dataplane.service_changed(key[0])
            self.bgp.mark_dirty()
        if key[0] in self.model.http_health_keys:
            self.proxy.mark_dirty()

    def mark_all_dirty(self) -> None:
        for reconciler in self.reconcilers:
            reconciler.mark_dirty()

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `lbagent status` shows: read from the state the agent acts on, never recomputed for show."""
        p = self._plan or self.current_plan()
        speaker = self.bgp.speaker
        announced = set(speaker.announced())
        verdicts, reasons = self.health.verdicts, self.health.reasons()
        listeners = {listener.key for listener in self.model.listeners}
        now = time.monotonic()
        return {
            "version": __version__, "node": self.model.node_name, "configHash": self.model.digest(),
            "source": self.source.status(),
            "dataplane": self.model.dataplane.kind.value, "draining": self.draining,
            "peers": dict(speaker.peers()),
            "bfd": {peer: session.as_dict() for peer, session in sorted(self.bfd.sessions().items())},
            "vips": [{"prefix": model.host_prefix(v), "announced": model.host_prefix(v) in announced,
                      "bound": v in self.vips.bound} for v in p.vips],
            "services": [
                {"service": d.service, "vips": [str(v) for v in d.vips], "announce": d.announce,
                 "reason": d.reason.value,
                 "nodes": [{"node": n.name, "healthy": verdicts.get((d.service, n.name)),
                            "reason": reasons.get((d.service, n.name), self._not_probed(d.service, n.name))}
                           for n in self.model.nodes]}
                for d in p.decisions if d.service not in listeners
            ],
            "listeners": [
                {"listener": d.service.removeprefix("listener:"), "vips": [str(v) for v in d.vips],
                 "announce": d.announce, "reason": d.reason.value, "backendsServing": list(d.healthy_nodes),
                 "backendsDown": list(d.unhealthy_nodes)}
                for d in p.decisions if d.service in listeners
            ],
            "proxy": self.proxy.status() if self.model.listeners else None,
            "sync": {name: {"secondsAgo": None if r.last_success is None else now - r.last_success,
                            "lastError": r.last_error, "runs": r.runs, "failures": r.failures}
                     for name, r in self.runners.items()},
        }

    def _not_probed(self, service: str, node: str) -> str:
        return not_probed_reason(self.model.service(service) if self.model.has_service(service) else None, node)

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
        self.source.watch(self._source_changed)  # the file's: SIGHUP; the Kubernetes API's: its changes too
        self._spawn(self._supervise("watchdog", self.notifier.feed_watchdog), "watchdog")
        if not await self._start_source():
            await status.stop()
            return 1
        try:
            self.bfd.check(self.model.bgp)
        except BfdUnavailable as exc:
            event(log, logging.ERROR, "bfd_unavailable", error=str(exc))
            await self.source.close()
            await status.stop()
            return 1
        event(log, logging.INFO, "agent_starting", node=self.model.node_name, config=self.source.name,
              config_hash=self.model.digest(), services=len(self.model.services), nodes=len(self.model.nodes))
        apply_sysctls(self.current_plan().sysctls, self._sysctl_root)
        self.health.update(self.model)
        self.health.start()
        await self._first_snapshot()
        await self.bfd.start()
        self._spawn(self._supervise("bfd poller", self._watch_bfd), "bfd poller")
        await self.bgp.speaker.start()
        for r in self.reconcilers:
            self._spawn(self._supervise(f"runner {r.name}", r.runner.run_forever), f"runner {r.name}")
        self._spawn(self._supervise("certificate watcher", self.proxy.watch_certificates), "certificate watcher")
        if self._watch_drift:
            self._spawn(self._supervise("dataplane drift watcher", self.dataplane.watch_drift),
                        "dataplane drift watcher")
            self._spawn(self._supervise("address drift watcher", self.vips.watch_addresses), "address drift watcher")
            self._spawn(self._supervise("refusal watcher", lambda: self.dataplane.watch_refusals(self.health.refused)),
                        "refusal watcher")
        await self._first_syncs()
        apply_sysctls(self.current_plan().sysctls, self._sysctl_root)  # those of modules the data plane loaded
        # What is bound and programmed now is what this node serves: the next BGP pass announces all of it and
        # (with graceful restart) ends the routers' wait with End-of-RIB.
        self.bgp.started()
        self.notifier.ready(f"serving {len(self.model.services)} services")
        event(log, logging.INFO, "agent_started", node=self.model.node_name)
        await self._stop.wait()
        await self._shutdown()
        await self.source.close()
        await status.stop()
        return self._exit_code

    async def _start_source(self) -> bool:
        """Wait for the source to be whole (the Kubernetes API: its first full lists; programming a half-listed
        cluster would withdraw the rest), then take its model. The watchdog is fed meanwhile; SIGTERM ends the
        wait."""
        start = asyncio.ensure_future(self.source.start())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([start, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done():
            start.cancel()
            await self.source.close()
            return False
        start.result()
        try:
            new = await asyncio.to_thread(load_off_the_loop, self.source)
        except SourceError as exc:
            for problem in exc.problems:
                event(log, logging.ERROR, "config_problem", file=exc.source, line=problem.line or "-",
                      field=problem.path, value=problem.value, error=problem.message)
            await self.source.close()
            return False
        if new != self.model:
            self.model = new
            self.metrics.config_loaded(new.digest())
            self._invalidate()
        return True

    def _source_changed(self) -> None:
        """Reload, one at a time: changes that come while a reload runs are taken by one more reload after it
        (the Kubernetes API sends them in bursts; each reload reads the whole source)."""
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        self._spawn(self._reload_while_changed(), "reload")

    async def _reload_while_changed(self) -> None:
        try:
            while True:
                self._reload_again = False
                await self.reload()
                if not self._reload_again:
                    return
        finally:
            self._reloading = False

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
            await self.vips.runner.wait_synced()
            await self.dataplane.runner.wait_synced()
            if self.model.listeners:
                await self.proxy.runner.wait_synced()

        waits = [asyncio.ensure_future(synced()), asyncio.ensure_future(self._stop.wait())]
        await asyncio.wait(waits, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()

    async def _watch_bfd(self) -> None:
        """Read bfdd's sessions and export them."""
        while True:
            await self.bfd.poll()
            self.metrics.bfd(self.bfd.sessions(), self.bfd.transitions)
            if self.bfd.restarts > self._bfd_restarts:
                self.metrics.process_restarts.labels("bfdd").inc(self.bfd.restarts - self._bfd_restarts)
                self._bfd_restarts = self.bfd.restarts
            await asyncio.sleep(self.bfd.poll_interval)

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
                await self.bgp.withdraw_all()
            event(log, logging.INFO, "withdrew_all", drain_seconds=self.model.agent.drain_seconds)
        except Exception as exc:
            event(log, logging.ERROR, "withdraw_all_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(self.model.agent.drain_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.stop()
        for reconciler in self.reconcilers:  # the speaker, then HAProxy (withdrawn and drained: it finishes)
            await reconciler.stop()
        await self.bfd.stop()  # after ExaBGP: its sessions are closed, BFD has nothing left to report
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
                await self.bfd.reconfigure(previous.bgp)
            except Exception as exc:
                event(log, logging.ERROR, "config_restore_failed", subsystem="bfd",
                      error=f"{type(exc).__name__}: {exc}")
            try:
                await self.bgp.speaker.reconfigure(previous.bgp)
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
        restart_only = {**_RESTART_ONLY, **(_RESTART_ONLY_PROXY if self.proxy.made else {})}
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
        # Only services changed (a Kubernetes source's usual change): only theirs is probed, planned and applied
        # again, at a cost that does not grow with the services that did not change.
        changed = changed_services(old, new)
        if changed is not None and self.health.update_services(old, new, changed):
            self.metrics.health_of(self.health.verdicts, [(key, n.name) for key in changed for n in new.nodes])
        else:
            self.health.update(new)
            self.metrics.health(self.health.verdicts, self.health.reasons())
        if changed is None:
            self._invalidate()
        else:
            self._changed_services(changed)
        self.metrics.config_loaded(new.digest())
        apply_sysctls(self.current_plan().sysctls, self._sysctl_root)
        if new.bgp != old.bgp:
            await self.bfd.reconfigure(new.bgp)  # first: a machine without bfdd refuses the config untouched
            await self.bgp.speaker.reconfigure(new.bgp)
        self.mark_all_dirty()
        event(log, logging.INFO, "config_loaded", config_hash=new.digest(), previous_hash=old.digest(),
              services=len(new.services), nodes=len(new.nodes))
        return True
