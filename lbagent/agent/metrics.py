"""Every Prometheus metric lbagent exports, in one place, on an injectable registry (Faucet's FaucetMetrics)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from lbagent.l7 import stats
from lbagent.plan.services import ServiceDecision


class BfdSessionLike(Protocol):
    @property
    def state(self) -> str: ...


# Sync durations span a one-element nft change (milliseconds) to a full resync of a large table (seconds).
_SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HttpResponses(Collector):
    """lbagent_http_responses_total{target, code}: HAProxy's responses by the backendRef (Service) that served them,
    read from HAProxy's admin socket at each scrape (its counters start again at a reload, as a counter may)."""

    def __init__(self) -> None:
        self.source: tuple[str, Mapping[tuple[str, str], str]] | None = None  # the admin socket, its servers' targets

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("lbagent_http_responses", "HTTP responses HAProxy's servers gave, by the "
                                     "backendRef they serve (a Service key, or a backend's name) and status class.",
                                     labels=["target", "code"])
        source = self.source
        if source is not None:
            try:
                counts = stats.responses_by_target(stats.show_stat(source[0]), source[1])
            except OSError:
                counts = {}
            for (target, code), value in sorted(counts.items()):
                family.add_metric([target, code], value)
        yield family


class Metrics:
    """The agent's metrics. Names follow Prometheus conventions: `lbagent_` prefix, units in the name."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_responses = HttpResponses()
        r.register(self.http_responses)
        self.bgp_session_up = Gauge("lbagent_bgp_session_up", "1 while the BGP session to the peer is up.",
                                    ["peer"], registry=r)
        self.bfd_session_up = Gauge("lbagent_bfd_session_up",
                                    "1 while the BFD session to the BGP peer is up (peers with BFD only).",
                                    ["peer"], registry=r)
        self.bfd_session_transitions = Counter(
            "lbagent_bfd_session_transitions_total",
            "Times the BFD session to the BGP peer went up or down (`to`), as bfdd counted them.",
            ["peer", "to"], registry=r)
        self._bfd_counted: dict[tuple[str, str], int] = {}
        self.announced_prefixes = Gauge("lbagent_announced_prefixes", "Prefixes ExaBGP has acknowledged announcing.",
                                        registry=r)
        self.vip_announced = Gauge("lbagent_vip_announced",
                                   "1 when the service's VIPs are announced, 0 when withdrawn; `reason` says why.",
                                   ["service", "reason"], registry=r)
        self.node_healthy = Gauge("lbagent_node_healthy", "1 when the node passes the service's health check.",
                                  ["service", "node"], registry=r)
        self.sync_duration = Histogram("lbagent_sync_duration_seconds", "Time one sync of a subsystem took.",
                                       ["subsystem"], buckets=_SYNC_BUCKETS, registry=r)
        self.sync_errors = Counter("lbagent_sync_errors_total", "Syncs that failed, by subsystem.",
                                   ["subsystem"], registry=r)
        self.last_sync = Gauge("lbagent_last_successful_sync_timestamp_seconds",
                               "Unix time of the subsystem's last successful sync.", ["subsystem"], registry=r)
        self.config_load_errors = Counter("lbagent_config_load_errors_total",
                                          "Config files refused (at start or on SIGHUP).", registry=r)
        self.config_info = Gauge("lbagent_config_info", "The loaded config's hash, as a label.", ["hash"],
                                 registry=r)
        self.process_restarts = Counter("lbagent_process_restarts_total",
                                        "Restarts of a child process lbagent supervises.", ["process"], registry=r)
        self.task_restarts = Counter("lbagent_task_restarts_total",
                                     "Restarts of one of the agent's own long-lived tasks after an internal error.",
                                     ["task"], registry=r)
        self.drift = Counter("lbagent_drift_detected_total",
                             "Changes to what lbagent owns in the kernel made by someone else, by what (dataplane, "
                             "vip); each is repaired at once.", ["what"], registry=r)
        self.health_cut_off = Gauge("lbagent_health_cut_off",
                                    "1 from the moment every health probe went unanswered at once (this LB cut off "
                                    "from the nodes) until the nodes that answer again are shown together.",
                                    registry=r)
        self.health_cut_offs = Counter("lbagent_health_cut_offs_total",
                                       "Times every health probe went unanswered at once.", registry=r)
        self.dataplane_applies = Counter("lbagent_dataplane_applies_total",
                                         "Data plane applies, by how (full, delta, unchanged).", ["how"], registry=r)
        self.haproxy_up = Gauge("lbagent_haproxy_up", "1 while HAProxy runs with lbagent's config.", registry=r)
        self.haproxy_reloads = Counter("lbagent_haproxy_reloads_total",
                                       "Seamless HAProxy reloads, by reason (start, listeners, routes, settings).",
                                       ["reason"], registry=r)
        self.haproxy_reload_failures = Counter("lbagent_haproxy_reload_failures_total",
                                               "HAProxy configs refused by validation (the running one stayed).",
                                               registry=r)
        self.haproxy_runtime_updates = Counter("lbagent_haproxy_runtime_updates_total",
                                               "Server weight and state changes sent over HAProxy's runtime API.",
                                               registry=r)
        self.certificate_updates = Counter("lbagent_certificate_updates_total",
                                           "Certificates replaced in the running HAProxy without a reload.",
                                           registry=r)
        self.certificate_not_after = Gauge(
            "lbagent_certificate_not_after_timestamp_seconds",
            "Unix time when the served certificate expires (alert on it minus time() falling under a few weeks).",
            ["listener", "file"], registry=r)
        self.certificate_not_before = Gauge(
            "lbagent_certificate_not_before_timestamp_seconds",
            "Unix time from which the served certificate is valid (above time(): clients refuse it).",
            ["listener", "file"], registry=r)
        self.source_stale_since = Gauge(
            "lbagent_source_stale_since_timestamp_seconds",
            "Unix time since when the source (the Kubernetes API) may be behind: lists, watches or the Lease fail; "
            "0 while it is current. What is programmed stays as last known meanwhile.", registry=r)
        self.source_synced = Gauge("lbagent_source_synced",
                                   "1 once the source is whole (the Kubernetes API: its first full lists are in).",
                                   registry=r)
        self.kubernetes_writer = Gauge("lbagent_kubernetes_writer",
                                       "1 while this LB node holds the Lease: it allocates addresses and writes "
                                       "status and Events.", registry=r)
        self._vip_labels: dict[str, str] = {}

    def follow_source(self, status: Callable[[], Mapping[str, object]]) -> None:
        """The source's gauges, read from its status when scraped."""
        self.source_stale_since.set_function(lambda: float(status().get("staleSince") or 0))  # type: ignore[arg-type]
        self.source_synced.set_function(lambda: float(bool(status().get("synced", True))))
        self.kubernetes_writer.set_function(lambda: float(bool(status().get("writer", False))))

    def serve(self, address: str, port: int) -> None:
        """Serve /metrics (prometheus-client's own HTTP server, in its thread)."""
        start_http_server(port, addr=address, registry=self.registry)

    def config_loaded(self, digest: str) -> None:
        self.config_info.clear()
        self.config_info.labels(digest).set(1)

    def decisions(self, changed: Iterable[ServiceDecision], removed: Iterable[str] = ()) -> None:
        """The announce state with its reason of the services whose decision changed, and forget removed ones:
        exactly one series per service, and a health change costs what changed, not the number of services."""
        for service in removed:
            if (reason := self._vip_labels.pop(service, None)) is not None:
                self.vip_announced.remove(service, reason)
        for d in changed:
            old = self._vip_labels.get(d.service)
            if old is not None and old != d.reason.value:
                self.vip_announced.remove(d.service, old)
            self.vip_announced.labels(d.service, d.reason.value).set(1 if d.announce else 0)
            self._vip_labels[d.service] = d.reason.value

    def health(self, verdicts: Mapping[tuple[str, str], bool], pairs: Iterable[tuple[str, str]]) -> None:
        """Node health per service, for the pairs that exist now (removed pairs disappear)."""
        self.node_healthy.clear()
        for key in pairs:
            if key in verdicts:
                self.node_healthy.labels(*key).set(1 if verdicts[key] else 0)

    def health_of(self, verdicts: Mapping[tuple[str, str], bool], pairs: Iterable[tuple[str, str]]) -> None:
        """`health()` for these pairs only (a reload that changed a few services): a pair without a verdict now,
        or gone, loses its series."""
        for key in pairs:
            if key in verdicts:
                self.node_healthy.labels(*key).set(1 if verdicts[key] else 0)
            else:
                with contextlib.suppress(KeyError):
                    self.node_healthy.remove(*key)

    def cut_off(self, cut_off: bool) -> None:
        """The health checker's cut-off began (True) or ended (False)."""
        self.health_cut_off.set(1 if cut_off else 0)
        if cut_off:
            self.health_cut_offs.inc()

    def bgp(self, peers: Mapping[str, str], announced: int) -> None:
        self.bgp_session_up.clear()
        for peer, state in peers.items():
            self.bgp_session_up.labels(peer).set(1 if state == "up" else 0)
        self.announced_prefixes.set(announced)

    def bfd(self, sessions: Mapping[str, BfdSessionLike], transitions: Mapping[tuple[str, str], int]) -> None:
        """BFD sessions of the peers that have BFD now; transitions as counted since the agent started."""
        self.bfd_session_up.clear()
        for peer, session in sessions.items():
            self.bfd_session_up.labels(peer).set(1 if session.state == "up" else 0)
        for (peer, to), count in transitions.items():
            if (delta := count - self._bfd_counted.get((peer, to), 0)) > 0:
                self.bfd_session_transitions.labels(peer, to).inc(delta)
                self._bfd_counted[(peer, to)] = count

    def certificates(self, validity: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        """The served certificates' validity, one series per (listener, certificate file) served now."""
        self.certificate_not_after.clear()
        self.certificate_not_before.clear()
        for (listener, file), (not_before, not_after) in validity.items():
            self.certificate_not_before.labels(listener, file).set(not_before)
            self.certificate_not_after.labels(listener, file).set(not_after)
