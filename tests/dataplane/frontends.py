"""Frontends as JSON, so a forwarder can be driven in another network namespace (or a guest) by a plain pipe."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import ip_address, ip_network
from typing import Any

from lbagent import model
from lbagent.plan.services import Backend, Frontend


def to_dict(f: Frontend) -> dict[str, Any]:
    return {
        "service": f.service, "portName": f.port_name, "vip": str(f.vip), "protocol": f.protocol.value,
        "port": f.port, "nodePort": f.node_port,
        "backends": [{"node": b.node, "address": str(b.address), "weight": b.weight} for b in f.backends],
        "mode": f.mode.value, "affinityTimeout": f.affinity_timeout,
        "sourceRanges": [str(n) for n in f.source_ranges], "scheduler": f.scheduler,
    }


def from_dict(d: Mapping[str, Any]) -> Frontend:
    return Frontend(
        service=d["service"], port_name=d["portName"], vip=ip_address(d["vip"]),
        protocol=model.Protocol(d["protocol"]), port=int(d["port"]),
        backends=tuple(Backend(node=b["node"], address=ip_address(b["address"]), weight=int(b["weight"]))
                       for b in d["backends"]),
        node_port=int(d["nodePort"]),
        mode=model.ForwardingMode(d["mode"]), affinity_timeout=d.get("affinityTimeout"),
        source_ranges=tuple(ip_network(n) for n in d.get("sourceRanges", ())),
        scheduler=d.get("scheduler", "mh"),
    )


def dumps(frontends: Iterable[Frontend], vips: Iterable[model.IPAddress]) -> str:
    return json.dumps({"frontends": [to_dict(f) for f in frontends], "vips": [str(v) for v in vips]})


def load(doc: Mapping[str, Any]) -> tuple[list[Frontend], list[model.IPAddress]]:
    return [from_dict(d) for d in doc["frontends"]], [ip_address(v) for v in doc["vips"]]


def by_service(frontends: Sequence[Frontend], keys: Iterable[str]) -> dict[str, tuple[Frontend, ...]]:
    """These services' frontends, by service."""
    return {key: tuple(f for f in frontends if f.service == key) for key in keys}
