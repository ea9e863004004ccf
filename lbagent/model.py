"""The validated, frozen internal model every later step (health, plan, render, apply) works from."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_interface, ip_network
from typing import Any, Literal

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
ServerConnectionReuse = Literal["safe", "aggressive", "always"]


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class TrafficPolicy(StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class ForwardingMode(StrEnum):
    """How a VIP's packets reach the node: the client's address hidden behind the LB's (masquerade) or kept (nat),
    or not rewritten at all (dsr: the LB only puts the node's MAC address on the packet, the node's kube-proxy takes
    the VIP, and the answers go from the node to the client without the LB)."""

    MASQUERADE = "masquerade"
    NAT = "nat"
    DSR = "dsr"


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
    probe_on_refusal: bool = True  # probe at once when the data plane sees the node refuse a forwarded connection

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
    # externalTrafficPolicy Local: the nodes the API says have endpoints (EndpointSlices), sorted; None when the
    # source does not know (the file): then the healthCheckNodePort probe alone decides.
    endpoint_nodes: tuple[str, ...] | None = None

    def digest(self) -> bytes:
        """A hash of the service's settings, worked out once (the service is frozen): see Model.digest."""
        return _item_digest(self)

    @cached_property
    def key(self) -> str:
        """The Kubernetes-style identity `namespace/name` (kept: a plan asks for it several times per service)."""
        return f"{self.namespace}/{self.name}"

    @property
    def probe(self) -> ProbeKind:
        if self.external_traffic_policy is TrafficPolicy.LOCAL:
            return ProbeKind.HEALTH_CHECK_NODE_PORT
        return ProbeKind.KUBE_PROXY if self.health_check.kube_proxy_healthz else ProbeKind.NODE_PORT


@functools.lru_cache(maxsize=1 << 16)
def host_prefix(vip: IPAddress) -> str:
    """The host route announced for a VIP: /32 or /128 (cached: the ipaddress module's parsing is slow Python, and
    every BGP pass asks for every VIP's)."""
    return str(ip_network(vip))


@functools.lru_cache(maxsize=1 << 16)
def prefix_address(prefix: str) -> IPAddress:
    """The address of a host prefix (`192.0.2.10/32`): `host_prefix` the other way, cached as it is."""
    return ip_interface(prefix).ip


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
class Bfd:
    """BFD (RFC 5880) on a BGP peer's session, spoken by the bfdd lbagent runs (lbagent.l3.bfd): the router drops
    this node's paths once `detect_multiplier` packets in a row are missing, instead of after the BGP hold time.
    Intervals in milliseconds; each side's negotiated rate is the slower of what it sends and the other accepts."""

    receive_interval: int = 300  # the fastest rate this node accepts the peer's packets at (required min RX)
    transmit_interval: int = 300  # the fastest rate this node would send at (desired min TX)
    detect_multiplier: int = 3


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
    bfd: Bfd | None = None  # None: no BFD for this session


@dataclass(frozen=True)
class Bgp:
    local_as: int
    router_id: IPv4Address
    peers: tuple[Peer, ...]
    graceful_restart: int | None = None
    exabgp: str = "exabgp"

    def without_bfd(self) -> Bgp:
        """These settings with BFD left out: what ExaBGP is told (BFD changes must not restart its sessions)."""
        return replace(self, peers=tuple(replace(peer, bfd=None) for peer in self.peers))

    @property
    def bfd_peers(self) -> tuple[Peer, ...]:
        """The peers whose session has BFD."""
        return tuple(peer for peer in self.peers if peer.bfd is not None)


@dataclass(frozen=True)
class Dataplane:
    """The L4 forwarder's settings."""

    kind: DataplaneKind = DataplaneKind.NFTABLES
    table: str = "lbagent"
    masquerade_mark: int = 0x00200000
    manage_sysctls: bool = True
    maglev_table_size: int = 1021  # prime; slots per Maglev lookup table
    iptables_variant: str = "nft"  # which iptables: "nft" (iptables-nft) or "legacy" (iptables-legacy)
    dsr_interfaces: tuple[str, ...] = ()  # where the routers' VIP traffic comes in: dsr frontends are hooked there


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
class AddressPool:
    """Load-balancer addresses the Kubernetes source may give Services: CIDRs and `first-last` ranges, as written."""

    name: str
    addresses: tuple[str, ...]
    auto_assign: bool = True


@dataclass(frozen=True)
class IngressSettings:
    """Ingress objects of lbagent's IngressClasses, served on these addresses (one per family)."""

    controller: str = "lbagent.io/ingress-controller"  # IngressClass.spec.controller
    addresses: tuple[IPAddress, ...] = ()
    http_port: int = 80
    https_port: int = 443
    watch_without_class: bool = False  # also Ingresses that name no class (ingress-nginx's option of that name)


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway API objects of lbagent's GatewayClasses."""

    controller_name: str = "lbagent.io/gateway-controller"  # GatewayClass.spec.controllerName


@dataclass(frozen=True)
class Kubernetes:
    """The Kubernetes API as a source of services and nodes, beside the file's (None: the file alone)."""

    kubeconfig: str | None = None  # None: in-cluster (the pod's service account)
    load_balancer_class: str = "lbagent.io/lbagent"
    node_address_type: str = "InternalIP"
    pools: tuple[AddressPool, ...] = ()
    lease_namespace: str = "kube-system"
    lease_name: str = "lbagent"
    lease_seconds: float = 15.0  # a dead writer is replaced within this
    # what the file's healthCheckDefaults and dataplane.forwardingMode give every Service of the API
    health_check: HealthCheck = field(default_factory=lambda: HealthCheck(interval=2.0, timeout=1.0, rise=2, fall=3))
    forwarding_mode: ForwardingMode = ForwardingMode.MASQUERADE
    ingress: IngressSettings | None = None
    pods_routable: bool = False  # ClusterIP backends at their EndpointSlices' addresses
    gateway: GatewaySettings | None = None


# ---- Layer 7: HAProxy listeners, HTTP routes (Gateway API HTTPRoute semantics) and their backends ----------


class PathMatchType(StrEnum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class ValueMatchType(StrEnum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


@dataclass(frozen=True)
class PathMatch:
    type: PathMatchType = PathMatchType.PATH_PREFIX
    value: str = "/"


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match: names of headers compare case-insensitively, values exactly."""

    name: str
    value: str
    type: ValueMatchType = ValueMatchType.EXACT


@dataclass(frozen=True)
class RouteMatch:
    """One HTTPRouteMatch: every condition must hold. A rule's matches are alternatives."""

    path: PathMatch = field(default_factory=PathMatch)
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


class PathModifierType(StrEnum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"
    # not the Gateway API's: nginx's `rewrite` (ingress-nginx's rewrite-target): when `pattern` matches the path,
    # the whole path becomes `value`, \1... taken from the pattern's capture groups
    REGEX_REPLACE = "RegexReplace"


@dataclass(frozen=True)
class PathModifier:
    type: PathModifierType
    value: str
    pattern: str | None = None  # REGEX_REPLACE's regular expression (PCRE, searched in the path)


@dataclass(frozen=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class Redirect:
    """RequestRedirect: what is not given is kept from the request (the port follows a changed scheme)."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathModifier | None = None
    status_code: int = 302


class BackendKind(StrEnum):
    SERVICE = "Service"  # a Kubernetes Service: its healthy nodes at the nodePort of the referenced port
    BACKEND = "Backend"  # a fixed set of endpoints from the config's `backends`


@dataclass(frozen=True)
class BackendRef:
    kind: BackendKind
    name: str  # a service key (namespace/name) or a static backend's name
    port: int | None = None  # the Service port (its nodePort is dialled); None for a static backend
    weight: int = 1
    proxy_protocol: bool = False  # send a PROXY protocol v2 header to the servers
    # why the reference cannot be resolved (Gateway API: a Service that does not exist or is not permitted): its
    # share of the rule's requests is answered 500, as the spec says, instead of going to the other backendRefs
    invalid: str | None = None
    tls: bool = False  # the servers speak HTTPS (not verified: ingress-nginx's backend-protocol HTTPS)


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    codes: tuple[int, ...] = (502, 503, 504)


@dataclass(frozen=True)
class RouteRule:
    """One HTTPRoute rule; `where` is its field path in the config file (for messages and HAProxy comments)."""

    where: str
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backend_refs: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier = field(default_factory=HeaderModifier)
    response_headers: HeaderModifier = field(default_factory=HeaderModifier)
    rewrite: URLRewrite | None = None
    redirect: Redirect | None = None
    request_timeout: float | None = None  # Gateway API `request`: the whole request, every attempt included
    backend_request_timeout: float | None = None  # Gateway API `backendRequest`: one attempt
    retry: Retry | None = None
    source_ranges: tuple[IPNetwork, ...] = ()  # only clients from these (403 to others); empty: everyone
    session_cookie: SessionCookie | None = None  # a client stays on the server a cookie names
    max_body_bytes: int | None = None  # a request declaring a larger body (Content-Length) gets 413


@dataclass(frozen=True)
class SessionCookie:
    """Cookie affinity (ingress-nginx's `affinity: cookie`): the first answer sets the cookie, later requests that
    carry it go to the same server while it is up."""

    name: str = "INGRESSCOOKIE"
    max_age: int | None = None  # seconds; None: a session cookie


@dataclass(frozen=True)
class Route:
    """An HTTPRoute: attached to listeners by name, for some hostnames (none: every host)."""

    namespace: str
    name: str
    listeners: tuple[str, ...]
    hostnames: tuple[str, ...]  # exact names or `*.example.com`
    rules: tuple[RouteRule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class ListenerProtocol(StrEnum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"


@dataclass(frozen=True)
class Certificate:
    """A certificate chain and its private key (the same file when it holds both)."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Listener:
    """An HTTP or HTTPS port on VIPs, served by HAProxy."""

    name: str
    vips: tuple[IPAddress, ...]
    port: int
    protocol: ListenerProtocol
    certificates: tuple[Certificate, ...] = ()  # the first one is served when SNI names none of them
    redirect_to_https: int | None = None  # an HTTP listener that only redirects, to this HTTPS port
    default_backend: BackendRef | None = None  # where requests no route matches go (else 404)
    proxy_protocol: bool = False  # expect a PROXY protocol header from whatever is in front of the VIP
    hsts: str | None = None  # HTTPS: the Strict-Transport-Security header every answer gets

    @property
    def key(self) -> str:
        return f"listener:{self.name}"


def refuse_scope_id(text: str) -> None:
    """ValueError for an address with an IPv6 scope id: Python takes `fe80::1%eth0`, but nft, HAProxy and ExaBGP
    would get the zone (any text after `%`) written into their configs."""
    if "%" in text:
        raise ValueError("an IPv6 scope id (%zone) is not allowed here: give a global address")


@dataclass(frozen=True)
class Endpoint:
    address: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`198.51.100.7:8080` or `[2001:db8::7]:8080`; ValueError saying what is wrong."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()):
            raise ValueError(f"{text!r} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port} in {text!r} is out of range")
        refuse_scope_id(host)
        try:
            address = ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        except ValueError:
            raise ValueError(f"{text!r}: not a valid IPv4 or IPv6 address (IPv6 as [ADDRESS]:PORT)") from None
        return cls(address, int(port))

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class StaticBackend:
    """Fixed endpoints outside the cluster, probed like nodePorts (TCP connect)."""

    name: str
    endpoints: tuple[Endpoint, ...]
    health_check: HealthCheck
    # endpoints the source says take no requests now (a pod not ready): kept among the servers, in maintenance, so
    # that readiness changes are runtime updates of HAProxy, not reloads
    down: frozenset[Endpoint] = frozenset()

    @property
    def key(self) -> str:
        return f"backend:{self.name}"


@dataclass(frozen=True)
class Proxy:
    """How lbagent runs HAProxy."""

    haproxy: str = "haproxy"  # the executable
    metrics_address: str | None = "127.0.0.1:9470"  # HAProxy's own Prometheus exporter
    connect_timeout: float = 5.0
    client_timeout: float = 60.0
    server_timeout: float = 60.0
    max_connections: int = 8000  # HAProxy needs about twice as many file descriptors
    certificate_check_interval: float = 5.0  # how often certificate files are looked at for replacement
    # HAProxy's http-reuse: whether a client's first request may go over an idle connection to a server that
    # earlier requests opened (aggressive: one that has carried a request already; always: any).
    server_connection_reuse: ServerConnectionReuse = "safe"
    # Clients (other proxies, a front load balancer) whose X-Forwarded-For and X-Real-IP are kept; from anyone
    # else both are replaced by the address lbagent sees (ingress-nginx's proxy-real-ip-cidr).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # The largest request line and headers HAProxy takes, and how many header fields (beyond: 400).
    max_request_header_bytes: int = 15360
    max_request_headers: int = 100


def _json_digest(obj: Any) -> bytes:
    """A dataclass's fields as canonical JSON, to be hashed."""
    return json.dumps(asdict(obj), default=str, sort_keys=True).encode()


def _item_digest(obj: Any) -> bytes:
    """A frozen dataclass's hash, worked out once and kept with it."""
    cached: bytes | None = obj.__dict__.get("_digest")
    if cached is None:
        cached = _sha256(_json_digest(obj)).digest()
        object.__setattr__(obj, "_digest", cached)
    return cached


# hashlib lets go of the GIL for an input of this many bytes or more (CPython's HASHLIB_GIL_MINSIZE).
_HASHLIB_RELEASES_GIL = 2048


def _sha256(data: bytes) -> hashlib._Hash:
    """sha256 fed in pieces too small for hashlib to let go of the GIL. A thread that lets go of the GIL and takes it
    back at once, thousands of times (one large hash per route), starves the others: CPython's waiting thread asks
    for the GIL only if it saw no switch in 5 ms, and each of those brief releases counts as one. The agent's event
    loop stopped for the whole of the routes' hashing that way (1.2 s at 4,000 routes, in the load's worker
    thread); in pieces the thread is switched out every 5 ms like any other."""
    whole, view = hashlib.sha256(), memoryview(data)
    for start in range(0, len(view), _HASHLIB_RELEASES_GIL - 1):
        whole.update(view[start:start + _HASHLIB_RELEASES_GIL - 1])
    return whole


@dataclass(frozen=True)
class Model:
    node_name: str
    vip_interface: str
    bgp: Bgp
    nodes: tuple[Node, ...]
    services: tuple[Service, ...]
    dataplane: Dataplane = field(default_factory=Dataplane)
    agent: Agent = field(default_factory=Agent)
    proxy: Proxy = field(default_factory=Proxy)
    listeners: tuple[Listener, ...] = ()
    routes: tuple[Route, ...] = ()
    backends: tuple[StaticBackend, ...] = ()
    kubernetes: Kubernetes | None = None

    def digest(self) -> str:
        """A stable hash of the whole model: the loaded config's identity in logs and metrics. Worked out once per
        model (it is frozen, and the agent asks for it in several places), from each service's own hash, which is
        kept with the service: a source that keeps the services that did not change (the Kubernetes source does)
        hashes only the changed ones (a whole model of 10,000 services: 0.5 s; one changed: a few ms). Routes and
        static backends are hashed one by one too: one JSON encoding of 4,000 routes held the GIL, and so stopped
        the agent's event loop, for 0.2 s."""
        cached: str | None = self.__dict__.get("_digest")
        if cached is None:
            whole = _sha256(_json_digest(replace(self, services=(), routes=(), backends=())))
            for items in (self.services, self.routes, self.backends):
                whole.update(len(items).to_bytes(8, "big"))
                for item in items:
                    whole.update(_item_digest(item))
            cached = whole.hexdigest()[:16]
            object.__setattr__(self, "_digest", cached)
        return cached

    @cached_property
    def service_index(self) -> Mapping[str, Service]:
        """Each service by its key (`namespace/name`), in config order."""
        return {s.key: s for s in self.services}

    @cached_property
    def services_by_vip(self) -> dict[IPAddress, list[str]]:
        """Each VIP and the services and listeners on it (keys `namespace/name`, `listener:name`), in config
        order: services first."""
        out: dict[IPAddress, list[str]] = {}
        for s in self.services:
            for vip in s.vips:
                out.setdefault(vip, []).append(s.key)
        for listener in self.listeners:
            for vip in listener.vips:
                out.setdefault(vip, []).append(listener.key)
        return out

    @cached_property
    def l4_vips(self) -> tuple[IPAddress, ...]:
        """The VIPs the kernel forwards (services'); a listener's VIP is HAProxy's and stays open to it."""
        return tuple(dict.fromkeys(v for s in self.services for v in s.vips))

    @cached_property
    def _backend_index(self) -> dict[str, StaticBackend]:
        return {b.name: b for b in self.backends}

    @cached_property
    def http_health_keys(self) -> frozenset[str]:
        """The health keys (service keys, `backend:NAME`) whose changes HAProxy's servers follow."""
        refs = [r for route in self.routes for rule in route.rules for r in rule.backend_refs if not r.invalid]
        refs += [listener.default_backend for listener in self.listeners if listener.default_backend is not None]
        return frozenset(r.name if r.kind is BackendKind.SERVICE else f"backend:{r.name}" for r in refs)

    def static_backend(self, name: str) -> StaticBackend:
        return self._backend_index[name]

    def has_service(self, key: str) -> bool:
        return key in self.service_index

    def service(self, key: str) -> Service:
        return self.service_index[key]
