"""The HTTP proxy reconciler: HAProxy run, reloaded and updated as the listeners, routes, health and certificates
want it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lbagent import model
from lbagent.agent.metrics import Metrics
from lbagent.agent.reconciler import Desired, Reconciler
from lbagent.health import HealthChecker
from lbagent.l7 import certs
from lbagent.l7 import render as render_haproxy
from lbagent.l7.certs import CertificateStore
from lbagent.l7.process import ConfigRefused, ProxyLayer
from lbagent.l7.runtime import ProxyError
from lbagent.logfmt import event
from lbagent.plan import http as plan_http
from lbagent.plan.services import ServiceDecision, listener_decision

log = logging.getLogger("lbagent.agent")

ProxyFactory = Callable[[model.Proxy, str, Callable[[], None]], ProxyLayer]


class ProxyReconciler(Reconciler):
    """Owns the HAProxy lbagent runs (made when the first listener is configured, stopped with the last one), what
    it runs now (`running`: its plan, from which the listeners' decisions are made and, through BGP's readers,
    their VIPs announced), the config it last refused and the certificates it serves with their pending
    replacements."""

    def __init__(self, desired: Desired, settings: model.Agent, metrics: Metrics, health: HealthChecker,
                 factory: ProxyFactory) -> None:
        super().__init__("proxy", desired, settings, metrics)
        self._health = health
        self._factory = factory
        self._process: ProxyLayer | None = None  # made when the first listener is configured
        runtime_dir = desired.model.agent.runtime_dir
        self.certificates = CertificateStore(certs.directory(runtime_dir), runtime_dir)
        self.running: plan_http.ProxyPlan | None = None  # what HAProxy runs now (None: not running)
        # its structure (plan without runtime state, settings) and that structure rendered, to skip rendering again
        self._shape: tuple[tuple[plan_http.ProxyPlan, model.Proxy], str] | None = None
        self._rejected: str | None = None  # the last config HAProxy's validation refused
        self._restarts = 0

    @property
    def process(self) -> ProxyLayer:
        if self._process is None:
            m = self.desired.model
            self._process = self._factory(m.proxy, m.agent.runtime_dir, self._process_changed)
        return self._process

    @property
    def made(self) -> bool:
        """A HAProxy exists (from the first listener until the last one is removed): its settings are fixed."""
        return self._process is not None

    def up(self) -> bool:
        return self._process is not None and self._process.up()

    def serving(self) -> set[model.IPAddress]:
        """The VIPs HAProxy listens on now."""
        if self.running is None or not self.up():
            return set()
        return {v for f in self.running.frontends for v in f.vips}

    def listener_decisions(self, m: model.Model, draining: bool) -> list[ServiceDecision]:
        """Each listener from what HAProxy serves now: announced while it runs and a backend can answer."""
        running = self.running
        up = running is not None and self.up()
        fronts = {f.listener: f for f in running.frontends} if running is not None else {}
        out = []
        for listener in m.listeners:
            front = fronts.get(listener.name)
            usable, unusable = plan_http.listener_serves(front, running) if front and running else ([], [])
            out.append(listener_decision(listener, usable, unusable, up and front is not None, draining))
        return out

    def _process_changed(self) -> None:
        """HAProxy went down or came back: its listeners' announcements follow."""
        self.mark_dirty()
        self._changed()

    async def reconcile(self, resync: bool) -> None:
        """HAProxy as the plan wants it: started, reloaded seamlessly for a structural change, runtime API for
        server weights and states, runtime API for replaced certificates. A config HAProxy refuses is logged and
        the running one stays."""
        m = self.desired.model
        if not m.listeners:
            if self._process is not None:
                await self._process.stop(m.agent.drain_seconds)
                # the next listener gets a HAProxy of the settings then (its executable may have changed)
                self._process, self.running, self._shape, self._restarts = None, None, None, 0
                self.metrics.http_responses.source = None
                event(log, logging.INFO, "haproxy_stopped", reason="no listeners configured")
                self.metrics.certificates({})
            return
        paths = self.certificates.sync(m.listeners)
        self.metrics.certificates(self.certificates.validity())
        planned = plan_http.plan_proxy(m, self._health.verdicts, paths)
        text = render_haproxy.render(planned, m.proxy, self.process.runtime_socket)
        shape = (plan_http.structural(planned), m.proxy)
        if self._shape is not None and self._shape[0] == shape and self.up():
            # what changed is runtime state only (the common case: health): no second render, no reload reason
            structure, (kind, detail) = self._shape[1], ("runtime", "")
        else:
            structure = render_haproxy.render(shape[0], m.proxy, self.process.runtime_socket)
            kind, detail = plan_http.changes(self.running if self.up() else None, planned)
        # Replacements made before this apply: a start or reload reads them; else the runtime API gets them. One
        # made while apply runs stays pending for the next sync (which the certificate watcher asks for).
        replacements = self.certificates.take_pending()
        try:
            result = await self.process.apply(text, structure, planned.runtime(), kind)
        except BaseException as exc:
            for replaced in replacements:
                self.certificates.requeue(replaced)
            if not isinstance(exc, ConfigRefused):
                raise  # anything else HAProxy says fails this sync: the runner retries it
            if self._rejected != text:
                self._rejected = text
                self.metrics.haproxy_reload_failures.inc()
                event(log, logging.ERROR, "haproxy_config_rejected", error=str(exc), kept="running config")
            return
        self._rejected = None
        if result.reloaded or result.started:
            self.metrics.haproxy_reloads.labels(kind).inc()
            replacements = []  # HAProxy has just read every file
            event(log, logging.INFO, "proxy_config_applied", how="start" if result.started else "reload",
                  reason=kind, changed=detail)
        for replaced in replacements:
            try:
                await self.process.set_certificate(replaced.path, replaced.pem)
            except ProxyError as exc:  # offered again on the next sync (a reload or restart reads the file anyway)
                self.certificates.requeue(replaced)
                event(log, logging.ERROR, "certificate_update_failed", file=replaced.path, error=str(exc))
                continue
            self.metrics.certificate_updates.inc()
            event(log, logging.INFO, "certificate_replaced", file=replaced.path, how="runtime API")
        if result.runtime_updates:
            self.metrics.haproxy_runtime_updates.inc(result.runtime_updates)
        self.metrics.haproxy_up.set(1 if self.up() else 0)
        if self.process.restarts > self._restarts:
            self.metrics.process_restarts.labels("haproxy").inc(self.process.restarts - self._restarts)
            self._restarts = self.process.restarts
        self.running, self._shape = planned, (shape, structure)
        self.metrics.http_responses.source = (self.process.runtime_socket, planned.targets())
        self._changed()

    async def watch_certificates(self) -> None:
        """Certificate files replaced on disk reach HAProxy through its runtime API, without a reload."""
        while True:
            await asyncio.sleep(self.desired.model.proxy.certificate_check_interval)
            if self.desired.model.listeners and self.certificates.look():
                self.mark_dirty()

    async def stop(self) -> None:
        if self.running is not None:
            # Withdrawn and drained: HAProxy finishes what it has in flight, then goes.
            await self.process.stop(self.desired.model.agent.drain_seconds)

    def status(self) -> dict[str, Any]:
        """What `lbagent status` shows of HAProxy."""
        p = self._process
        return {"up": self.up(), "reloads": dict(p.reloads) if p else {},
                "runtimeUpdates": p.runtime_updates if p else 0, "restarts": p.restarts if p else 0}
