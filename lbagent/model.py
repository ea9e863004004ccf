"""The validated, frozen internal model every later step (health, plan, render, apply) works from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class TrafficPolicy(StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class ForwardingMode(StrEnum):
    """How the client's address reaches the node: hidden behind the LB's (masquerade) or kept (nat)."""

    MASQUERADE = "masquerade"
    NAT = "nat"


class DataplaneKind(StrEnum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"
    IPVS = "ipvs"


class ProbeKind(StrEnum):
    """What is asked of a node to decide whether it takes a service's traffic."""

    NODE_PORT = "nodePort"  # TCP connect to each TCP nodePort
    KUBE_PROXY = "kubeProxyHealthz"  # kube-proxy's /healthz (503 while the node drains)
    HEALTH_CHECK_NODE_PORT = "healthCheckNodePort"  # Local: kube-proxy says the node has a ready endpoint


@dataclass(frozen=True)
class HealthCheck:
    """How a node is probed for one service: every `interval`, give up after `timeout`, hysteresis."""

    interval: float
    timeout: float
    rise: int
    fall: int
    kube_proxy_healthz: bool = False
    kube_proxy_port: int = 10256

    @property
    def window(self) -> float:
        """The longest time a dead node stays in rotation: `fall` failed probes, the last one timing out."""
        return self.fall * self.interval + self.timeout


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: Protocol
    port: int
    node_port: int


@dataclass(frozen=True)
class BgpAttributes:
    """Per-service path attributes sent with the VIP's announcement."""

    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    vips: tuple[IPAddress, ...]  # one per family: dual stack when both
    ports: tuple[ServicePort, ...]
    external_traffic_policy: TrafficPolicy
    health_check: HealthCheck
    bgp: BgpAttributes = field(default_factory=BgpAttributes)
    health_check_node_port: int | None = None
    forwarding_mode: ForwardingMode = ForwardingMode.MASQUERADE
    session_affinity_timeout: int | None = None  # ClientIP affinity when set
    source_ranges: tuple[IPNetwork, ...] = ()  # loadBalancerSourceRanges; empty: everyone
    ipvs_scheduler: str = "mh"

    @property
    def key(self) -> str:
        """The Kubernetes-style identity `namespace/name`."""
        return f"{self.namespace}/{self.name}"

    @property
    def probe(self) -> ProbeKind:
        if self.external_traffic_policy is TrafficPolicy.LOCAL:
            return ProbeKind.HEALTH_CHECK_NODE_PORT
        return ProbeKind.KUBE_PROXY if self.health_check.kube_proxy_healthz else ProbeKind.NODE_PORT


def host_prefix(vip: IPAddress) -> str:
    """The host route announced for a VIP: /32 or /128."""
    return str(ip_network(vip))


@dataclass(frozen=True)
class Node:
    """A cluster node that serves nodePorts."""

    name: str
    addresses: tuple[IPAddress, ...]
    weight: int = 1  # share of new flows relative to the other nodes
    draining: bool = False  # no new flows; established ones continue

    def address_for(self, vip: IPAddress) -> IPAddress | None:
        """The node's address of the VIP's family: NAT cannot cross families."""
        for address in self.addresses:
            if address.version == vip.version:
                return address
        return None


@dataclass(frozen=True)
class Peer:
    """A BGP router this LB node announces VIPs to."""

    address: IPAddress
    peer_as: int
    hold_time: int
    password: str | None = None
    multihop: int | None = None
    local_address: IPAddress | None = None
    port: int = 179


@dataclass(frozen=True)
class Bgp:
    local_as: int
    router_id: IPv4Address
    peers: tuple[Peer, ...]
    graceful_restart: int | None = None
    exabgp: str = "exabgp"


@dataclass(frozen=True)
class Dataplane:
    """The L4 forwarder's settings."""

    kind: DataplaneKind = DataplaneKind.NFTABLES
    table: str = "lbagent"
    masquerade_mark: int = 0x00200000
    manage_sysctls: bool = True
    maglev_table_size: int = 1021  # prime; slots per Maglev lookup table
    iptables_variant: str = "nft"  # which iptables: "nft" (iptables-nft) or "legacy" (iptables-legacy)


@dataclass(frozen=True)
class Agent:
    """Timings of the daemon itself."""

    drain_seconds: float = 2.0
    resync_seconds: float = 30.0
    min_sync_interval: float = 0.1
    retry_seconds: float = 1.0
    runtime_dir: str = "/run/lbagent"
    metrics_address: str | None = "127.0.0.1:9469"  # host:port for /metrics; None: not served


@dataclass(frozen=True)
class Model:
    node_name: str
    vip_interface: str
    bgp: Bgp
    nodes: tuple[Node, ...]
    services: tuple[Service, ...]
    dataplane: Dataplane = field(default_factory=Dataplane)
    agent: Agent = field(default_factory=Agent)

    def digest(self) -> str:
        """A stable hash of the whole model: the loaded config's identity in logs and metrics."""
        return hashlib.sha256(json.dumps(asdict(self), default=str, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def _service_index(self) -> dict[str, Service]:
        return {s.key: s for s in self.services}

    @cached_property
    def services_by_vip(self) -> dict[IPAddress, list[str]]:
        """Each VIP and the services on it, in config order."""
        out: dict[IPAddress, list[str]] = {}
        for s in self.services:
            for vip in s.vips:
                out.setdefault(vip, []).append(s.key)
        return out

    def service(self, key: str) -> Service:
        return self._service_index[key]
