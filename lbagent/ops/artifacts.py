"""What `lbagent run` would write for a config, rendered by the same code it uses, as one document: `lbagent plan`
shows it and `lbagent check` hands its files to the real tools (lbagent.ops.judge). Needs no root and changes nothing:
every node is assumed healthy (nothing is probed), and all it asks the kernel is the routing table's source address
for each BGP peer, as `run` does (lbagent.l3.speaker.local_addresses), and, for dsr frontends, which interfaces exist
and which nodes are on-link (lbagent.l4.routes.on_link_paths)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from lbagent import model
from lbagent.l3 import render as exabgp
from lbagent.l3 import speaker
from lbagent.l4.iptables import render as iptables
from lbagent.l4.ipvs import render as ipvs
from lbagent.l4.nftables import dsr
from lbagent.l4.nftables import render as nftables
from lbagent.l4.routes import on_link_paths
from lbagent.l7 import certs, process
from lbagent.l7 import render as haproxy
from lbagent.plan import http as plan_http
from lbagent.plan.services import all_healthy, listener_decision, plan, with_listeners


def certificate_paths(m: model.Model, directory: str | None = None) -> dict[str, tuple[str, ...]]:
    """Listener name -> the combined PEM files HAProxy reads, in `directory` (by default where `run` writes them)."""
    where = directory if directory is not None else certs.directory(m.agent.runtime_dir)
    return certs.combined_paths(m.listeners, where)


def plan_document(m: model.Model, certificates: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Decisions and every artifact: the data plane's input for `dataplane.kind` (the nft script, the
    iptables-restore input per family, or the IPVS services and their companion nft table), haproxy.cfg (None
    without listeners; its `crt` files are `certificates`, by default the runtime directory's) and exabgp.conf.
    Raises ValueError when a renderer refuses the model (a config the checks should have refused)."""
    healthy = all_healthy(m)
    p = plan(m, healthy)
    proxy = plan_http.plan_proxy(m, healthy, certificate_paths(m) if certificates is None else certificates)
    fronts = {f.listener: f for f in proxy.frontends}
    p = with_listeners(p, m, [listener_decision(lst, *plan_http.listener_serves(fronts[lst.name], proxy), True, False)
                              for lst in m.listeners])
    kind = m.dataplane.kind
    rules: dict[str, str] | None = None
    ipvs_doc: dict[str, Any] | None = None
    if kind is model.DataplaneKind.IPTABLES:
        ruleset = iptables.build(p.frontends, p.l4_vips, m.dataplane)
        rules = {f"ipv{family}": iptables.render_full(ruleset, family) for family in sorted(ruleset.families())}
    elif kind is model.DataplaneKind.IPVS:
        services = ipvs.desired(p.frontends)
        table = ipvs.companion_table(m.dataplane)
        ipvs_doc = {
            "services": len(services),
            "operations": [str(op) for op in ipvs.diff({}, services)],
            "nftables": ipvs.render_companion(ipvs.companion(table, p.frontends, p.l4_vips, services)),
        }
    runtime_dir = m.agent.runtime_dir
    dsr_doc: dict[str, Any] | None = None
    if kind is model.DataplaneKind.NFTABLES and (wanted := dsr.dsr_frontends(p.frontends)):
        # what `run` would write on this host: its interfaces, its routes to the nodes
        paths, interfaces = on_link_paths({str(b.address) for f in wanted for b in f.active},
                                          m.dataplane.dsr_interfaces)
        dsr_plan = dsr.build(m.dataplane.table, wanted, m.dataplane.maglev_table_size, interfaces, paths)
        dsr_doc = {"text": dsr_plan.text, "frontends": dsr_plan.frontends,
                   "missingInterfaces": sorted(set(m.dataplane.dsr_interfaces) - set(interfaces)),
                   "notOnLink": {node: address for address, node in sorted(dsr_plan.unreachable.items())}}
    return {
        "assumption": "every node healthy for every service (plan does not probe)",
        "configHash": m.digest(),
        "vips": [{"address": str(v), "interface": m.vip_interface} for v in p.vips],
        "decisions": [
            {"service": d.service, "vips": [str(v) for v in d.vips], "announce": d.announce,
             "reason": d.reason.value, "healthyNodes": list(d.healthy_nodes), "drainingNodes": list(d.draining_nodes)}
            for d in p.decisions
        ],
        "frontends": [
            {"service": f.service, "port": f.port_name, "vip": str(f.vip), "protocol": f.protocol.value,
             "listen": f.port, "mode": f.mode.value, "affinityTimeout": f.affinity_timeout,
             "sourceRanges": [str(n) for n in f.source_ranges],
             "backends": [f"{b.node}={b.address}:{f.node_port}" + (f"*{b.weight}" if b.weight != 1 else "")
                          for b in f.backends]}
            for f in p.frontends
        ],
        "bgp": {
            "localAS": m.bgp.local_as, "routerID": str(m.bgp.router_id),
            "peers": [{**asdict(peer), "address": str(peer.address), "password": "***" if peer.password else None,
                       "local_address": str(peer.local_address) if peer.local_address else None}
                      for peer in m.bgp.peers],
            "announcements": [exabgp.announce_command(a) for a in p.announcements.values()],
        },
        "sysctls": {k.replace("/", "."): v for k, v in p.sysctls.items()},
        "dataplane": kind.value,
        "nftables": nftables.render(p.frontends, p.l4_vips, m.dataplane) if kind is model.DataplaneKind.NFTABLES
        else None,
        "nftablesDsr": dsr_doc,
        "iptables": rules,
        "ipvs": ipvs_doc,
        "listeners": [
            {"listener": f.listener, "vips": [str(v) for v in f.vips], "port": f.port, "protocol": f.protocol.value,
             "redirectToHTTPS": f.redirect_to_https,
             "routes": [{"host": e.hostname or "*", "match": describe(e.match), "backend": e.backend,
                         "where": e.where} for e in f.entries],
             "defaultBackend": f.default_backend or "404"}
            for f in proxy.frontends
        ],
        "haproxy": haproxy.render(proxy, m.proxy, process.runtime_socket(runtime_dir))
        if m.listeners else None,
        # The source addresses as this host's routing table has them now, as `run` looks them up.
        "exabgp": exabgp.render_config(m.bgp, speaker.api_run(runtime_dir), speaker.local_addresses(m.bgp)),
    }


def describe(match: model.RouteMatch) -> str:
    """A route match in one line, as an operator reads it."""
    parts = [f"path {match.path.type.value} {match.path.value}"]
    parts += [f"method {match.method}"] if match.method else []
    parts += [f"header {h.name} {'=' if h.type is model.ValueMatchType.EXACT else '~'} {h.value}"
              for h in match.headers]
    parts += [f"query {q.name} {'=' if q.type is model.ValueMatchType.EXACT else '~'} {q.value}"
              for q in match.query_params]
    return ", ".join(parts)
