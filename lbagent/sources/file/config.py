"""The YAML configuration file: strict pydantic models, then the checks that span fields, into the model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, ValidationError, model_validator

from lbagent import model, routing, tls
from lbagent.files import read_file
from lbagent.sources import Problem, SourceError
from lbagent.sources.file import http as config_http
from lbagent.sources.file.base import (
    _NAME,
    CIDR,
    AsNumber,
    Community,
    Duration,
    IPAddress,
    IPv4,
    ListenAddress,
    Port,
    Strict,
    _is_prime,
    _parse_duration,
    short,
)
from lbagent.sources.kubernetes.allocator import Pool

__all__ = ["ConfigError", "Problem", "field_line", "load", "parse"]

class NodeSection(Strict):
    name: str = Field(pattern=_NAME)
    vip_interface: str = Field("lo", alias="vipInterface", pattern=r"^[^\s/]{1,15}$")


class AgentSection(Strict):
    drain_seconds: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, le=600)] = Field(
        2.0, alias="drain"
    )
    resync_seconds: Duration = Field(30.0, alias="resync")
    min_sync_interval: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, le=60)] = Field(
        0.1, alias="minSyncInterval"
    )
    retry_seconds: Duration = Field(1.0, alias="retry")
    runtime_dir: str = Field("/run/lbagent", alias="runtimeDir")
    metrics_address: ListenAddress | None = Field("127.0.0.1:9469", alias="metricsAddress")


class BfdSection(Strict):
    """BFD on a BGP session (lbagent.l3.bfd): a peer's own fields, else bgp.bfd's, else the defaults here. Ranges
    are bfdd's (FRR): intervals 10 ms to 60 s, multiplier 2 to 255."""

    enabled: bool | None = None  # default false
    receive_interval: int | None = Field(None, alias="receiveInterval", ge=10, le=60000)  # ms, default 300
    transmit_interval: int | None = Field(None, alias="transmitInterval", ge=10, le=60000)  # ms, default 300
    detect_multiplier: int | None = Field(None, alias="detectMultiplier", ge=2, le=255)  # default 3


class PeerSection(Strict):
    address: IPAddress
    peer_as: AsNumber = Field(alias="peerAS")
    hold_time: int = Field(9, alias="holdTime", ge=3, le=65535)
    password: str | None = Field(None, min_length=1, max_length=80, pattern=r"^[\x21-\x7e]+$")
    multihop: int | None = Field(None, ge=1, le=255)
    local_address: IPAddress | None = Field(None, alias="localAddress")
    port: Port = 179
    bfd: BfdSection = Field(default_factory=BfdSection)


class BgpSection(Strict):
    local_as: AsNumber = Field(alias="localAS")
    router_id: IPv4 = Field(alias="routerID")
    peers: list[PeerSection] = Field(min_length=1)
    graceful_restart: int | None = Field(None, alias="gracefulRestart", ge=1, le=4095)
    exabgp: str = Field("exabgp", description="the exabgp executable: a path, or a name looked up in PATH")
    bfd: BfdSection = Field(default_factory=BfdSection)


class DataplaneSection(Strict):
    kind: Literal["nftables", "iptables", "ipvs"] = "nftables"
    table: str = Field("lbagent", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")
    masquerade_mark: int = Field(0x00200000, alias="masqueradeMark", ge=1, le=0xFFFFFFFF)
    manage_sysctls: bool = Field(True, alias="manageSysctls")
    forwarding_mode: Literal["masquerade", "nat", "dsr"] = Field("masquerade", alias="forwardingMode")
    dsr_interfaces: list[Annotated[str, StringConstraints(pattern=r"^[^\s/]{1,15}$")]] = Field(
        [], alias="dsrInterfaces", max_length=64)
    maglev_table_size: int = Field(1021, alias="maglevTableSize", ge=7, le=65521)
    iptables_variant: Literal["nft", "legacy"] = Field("nft", alias="iptablesVariant")

    @model_validator(mode="after")
    def _prime_table(self) -> DataplaneSection:
        if not _is_prime(self.maglev_table_size):
            raise ValueError(f"maglevTableSize must be a prime number (got {self.maglev_table_size})")
        if self.masquerade_mark & (self.masquerade_mark - 1):
            raise ValueError(f"masqueradeMark must be a single bit (got {self.masquerade_mark:#x})")
        return self


class HealthCheckSection(Strict):
    interval: Duration | None = None
    timeout: Duration | None = None
    rise: int | None = Field(None, ge=1, le=100)
    fall: int | None = Field(None, ge=1, le=100)
    kube_proxy_healthz: bool | None = Field(None, alias="kubeProxyHealthz")
    kube_proxy_port: Port | None = Field(None, alias="kubeProxyPort")
    probe_on_refusal: bool | None = Field(None, alias="probeOnRefusal")


class NodeEntry(Strict):
    name: str = Field(pattern=_NAME)
    addresses: list[IPAddress] = Field(min_length=1, max_length=2)
    weight: int = Field(1, ge=1, le=100)
    draining: bool = False


class PortEntry(Strict):
    name: str = Field("", pattern=r"^([a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?)?$")
    protocol: Literal["TCP", "UDP"] = "TCP"
    port: Port
    node_port: Port = Field(alias="nodePort")


class ServiceBgpEntry(Strict):
    med: int | None = Field(None, ge=0, le=4294967295)
    local_pref: int | None = Field(None, alias="localPref", ge=0, le=4294967295)
    communities: list[Community] = []


class ClientIPConfig(Strict):
    timeout_seconds: int = Field(10800, alias="timeoutSeconds", ge=1, le=86400)


class SessionAffinityConfig(Strict):
    client_ip: ClientIPConfig = Field(default_factory=ClientIPConfig, alias="clientIP")


class ServiceEntry(Strict):
    name: str = Field(pattern=_NAME)
    namespace: str = Field("default", pattern=_NAME)
    vip: IPAddress | None = None
    vips: list[IPAddress] | None = Field(None, min_length=1, max_length=2)
    external_traffic_policy: Literal["Cluster", "Local"] = Field("Cluster", alias="externalTrafficPolicy")
    health_check_node_port: Port | None = Field(None, alias="healthCheckNodePort")
    ports: list[PortEntry] = Field(min_length=1)
    health_check: HealthCheckSection = Field(default_factory=HealthCheckSection, alias="healthCheck")
    bgp: ServiceBgpEntry = Field(default_factory=ServiceBgpEntry)
    forwarding_mode: Literal["masquerade", "nat", "dsr"] | None = Field(None, alias="forwardingMode")
    session_affinity: Literal["None", "ClientIP"] = Field("None", alias="sessionAffinity")
    session_affinity_config: SessionAffinityConfig = Field(
        default_factory=SessionAffinityConfig, alias="sessionAffinityConfig"
    )
    load_balancer_source_ranges: list[CIDR] = Field([], alias="loadBalancerSourceRanges")
    ipvs_scheduler: Literal["rr", "wrr", "lc", "sh", "mh"] = Field("mh", alias="ipvsScheduler")

    @model_validator(mode="after")
    def _one_way_to_say_vips(self) -> ServiceEntry:
        if self.vip is not None and self.vips is not None:
            raise ValueError("give either `vip` (one address) or `vips` (one per family for dual stack), not both")
        return self

    @property
    def all_vips(self) -> list[model.IPAddress]:
        return [self.vip] if self.vip is not None else list(self.vips or [])


class BackendEntry(config_http.StaticBackendEntry):
    health_check: HealthCheckSection = Field(default_factory=HealthCheckSection, alias="healthCheck")


def _pool_address(value: Any) -> Any:
    if isinstance(value, str):
        try:
            Pool.parse("-", [value])
        except ValueError as exc:
            raise ValueError(f"a CIDR (203.0.113.64/27) or a range (first-last) of one family: {exc}") from None
    return value


class PoolEntry(Strict):
    name: str = Field(pattern=_NAME)
    addresses: list[Annotated[str, AfterValidator(_pool_address)]] = Field(min_length=1)
    auto_assign: bool = Field(True, alias="autoAssign")


class LeaseSection(Strict):
    namespace: str = Field("kube-system", pattern=_NAME)
    name: str = Field("lbagent", pattern=_NAME)
    duration: Annotated[float, BeforeValidator(_parse_duration), Field(ge=2, le=300)] = 15.0


class IngressSection(Strict):
    """Ingress objects of the IngressClasses whose spec.controller is `controller`, served by HAProxy on `addresses`
    (one per family) at httpPort and httpsPort."""

    controller: str = Field("lbagent.io/ingress-controller",
                            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
    addresses: list[IPAddress] = Field(min_length=1, max_length=2)
    http_port: int = Field(80, alias="httpPort", ge=1, le=65535)
    https_port: int = Field(443, alias="httpsPort", ge=1, le=65535)
    watch_without_class: bool = Field(False, alias="watchIngressWithoutClass")


class GatewaySection(Strict):
    """Gateways of the GatewayClasses whose spec.controllerName is `controllerName`, and their HTTPRoutes."""

    controller_name: str = Field("lbagent.io/gateway-controller", alias="controllerName",
                                 pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")


class KubernetesSection(Strict):
    kubeconfig: str | None = Field(None, min_length=1)
    load_balancer_class: str = Field("lbagent.io/lbagent", alias="loadBalancerClass",
                                     pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    node_address_type: Literal["InternalIP", "ExternalIP"] = Field("InternalIP", alias="nodeAddressType")
    pools: list[PoolEntry] = []
    lease: LeaseSection = Field(default_factory=LeaseSection)
    ingress: IngressSection | None = None
    gateway: GatewaySection | None = None
    # whether the LB nodes route to the pod network (the CNI announces pod CIDRs by BGP, or static routes): then an
    # HTTP backend that is a ClusterIP Service is reached at its EndpointSlices' addresses
    pods_routable: bool = Field(False, alias="podsRoutable")


class ConfigFile(Strict):
    node: NodeSection
    agent: AgentSection = Field(default_factory=AgentSection)
    bgp: BgpSection
    dataplane: DataplaneSection = Field(default_factory=DataplaneSection)
    health_check_defaults: HealthCheckSection = Field(
        default_factory=HealthCheckSection, alias="healthCheckDefaults"
    )
    nodes: list[NodeEntry] = []  # at least one unless `kubernetes` gives them
    services: list[ServiceEntry] = []
    kubernetes: KubernetesSection | None = None
    proxy: config_http.ProxySection = Field(default_factory=config_http.ProxySection)
    listeners: list[config_http.ListenerEntry] = []
    routes: list[config_http.RouteEntry] = []
    backends: list[BackendEntry] = []


_DEFAULT_HEALTH = model.HealthCheck(interval=2.0, timeout=1.0, rise=2, fall=3)


class ConfigError(SourceError):
    """The file cannot be used; every problem is listed, not just the first."""


def _format_path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# libyaml's parser when PyYAML has it (ten times faster on large files), else PyYAML's own.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # a config nests about 10 deep; Python's recursion would fail near 1,000
MAX_NODES = 2_000_000  # values after expanding aliases: 10,000 services are about 300,000


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe YAML that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short(key_node.value)} (first on line "
                        f"{seen[key_node.value].start_mark.line + 1})", key_node.start_mark)
                seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_shape(root: yaml.Node) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, or larger than MAX_NODES once its aliases are expanded
    (a few hundred bytes of nested aliases make billions of values), before anything walks it recursively."""
    height: dict[int, int] = {}
    size: dict[int, int] = {}
    expanding: set[int] = set()  # the nodes on the path from the root to the one being looked at
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        kids = _children(node)
        if not children_done:
            if any(id(kid) in expanding or kid is node for kid in kids):
                raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it",
                                                        node.start_mark)
            expanding.add(key)
            stack.append((node, True))
            stack.extend((kid, False) for kid in kids if id(kid) not in size)
            continue
        expanding.discard(key)
        height[key] = 1 + max((height[id(kid)] for kid in kids), default=0)
        size[key] = 1 + sum(size[id(kid)] for kid in kids)
        if height[key] > MAX_DEPTH:
            raise yaml.constructor.ConstructorError(None, None, f"values nest more than {MAX_DEPTH} deep",
                                                    node.start_mark)
        if size[key] > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the document holds more than {MAX_NODES:,} values once its aliases are expanded",
                node.start_mark)


def _load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree (for line numbers), parsed once; yaml.YAMLError when refused."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        if "&" in text:  # only anchors make aliases; without them libyaml bounds the nesting and size is text
            _check_shape(root)
        try:
            return loader.construct_document(root), root
        except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4,300 digits
            raise yaml.constructor.ConstructorError(None, None, f"cannot read a value: {exc}") from exc
    finally:
        loader.dispose()


class _LineIndex:
    """Finds the line of a field path in the YAML document, so every problem can point into the file."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def line(self, loc: Sequence[int | str]) -> int | None:
        node = self._root
        found = node
        for part in loc:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
            else:
                node = None
            if node is None:
                break
            found = node
        return None if found is None else found.start_mark.line + 1


def parse(text: str, source: str = "<config>", warnings: list[Problem] | None = None) -> model.Model:
    """Parse and validate a whole config document into the model, or raise ConfigError listing every problem.
    `warnings`, when given, receives what is served all the same but should be known (an expired certificate)."""
    try:
        data, root = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None)
        context = getattr(exc, "context", None)
        message = (f"{context}: {problem}" if context else problem) if problem else str(exc)
        raise ConfigError(source, [Problem("", "invalid YAML", message.replace("\n", " "), line)]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", short(data), "the file must be a YAML mapping")])
    lines = _LineIndex(root)
    try:
        config = ConfigFile.model_validate(data)
    except ValidationError as exc:
        problems = [
            Problem(
                _format_path(err["loc"]),
                "nothing" if err["type"] == "missing" else short(err.get("input")),
                err["msg"].removeprefix("Value error, "),
                lines.line(err["loc"]),
            )
            for err in exc.errors()
        ]
        raise ConfigError(source, problems) from exc
    problems = list(_cross_checks(config))
    if problems:
        raise ConfigError(source, [Problem(p.path, p.value, p.message, lines.line(_loc(p.path))) for p in problems])
    result = _to_model(config)
    shadowed = [Problem(where, "a route match", f"can never match on listener {listener}: {by} always takes "
                                               f"precedence (it matches every request this one does)",
                        lines.line(_loc(where)))
                for where, listener, by in routing.unreachable(result)]
    if shadowed:
        raise ConfigError(source, shadowed)
    if warnings is not None:
        warnings += [Problem(p.path, p.value, p.message, lines.line(_loc(p.path))) for p in _warnings(config)]
    return result


def _warnings(config: ConfigFile) -> Iterable[Problem]:
    """What the agent serves all the same but an operator must hear of: certificates expired, not yet valid, soon
    expiring, or served without their issuer (lbagent.tls, which `run` reads them with too)."""
    for i, listener in enumerate(config.listeners):
        for where, cert in listener.certificate_refs():
            field = f"listeners[{i}].{where}.certFile"
            for warning in tls.read_pair(cert.cert_file, cert.key_file or cert.cert_file).warnings:
                yield Problem(field, short(warning.path), f"listener {listener.name}: {warning.message}")


def load(path: str | Path, warnings: list[Problem] | None = None) -> model.Model:
    """Read and validate a config file (`warnings`: as for parse)."""
    path = Path(path)
    try:
        text = read_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(str(path), [Problem("", str(path), f"cannot read the file: {reason}")]) from exc
    return parse(text, str(path), warnings)


def field_line(text: str, path: str) -> int | None:
    """The line of the file where the field `path` (as problems name it: `listeners[1].port`) is, if it is there:
    for pointing from something derived from the config (a rendered artifact) back into it."""
    try:
        _, root = _load_yaml(text)
    except yaml.YAMLError:
        return None
    return _LineIndex(root).line(_loc(path))


def _loc(path: str) -> list[int | str]:
    parts: list[int | str] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return parts


def _routable(address: model.IPAddress) -> bool:
    """A unicast address another host can reach: not loopback, multicast, unspecified or link-local."""
    return not (address.is_loopback or address.is_multicast or address.is_unspecified or address.is_link_local)


_RUNTIME_DIR = re.compile(r"/[A-Za-z0-9._/-]*", re.ASCII)
# The unix sockets lbagent makes in the runtime dir, whose paths must fit sockaddr_un.sun_path (107 bytes): the
# status and ExaBGP API sockets always; with listeners, HAProxy's master and admin sockets, which HAProxy binds as
# "<path>.<pid>.tmp" first. Their owners (agent/status.py, l3/speaker.py, l7/process.py) are held to these names by
# tests/unit/test_runtime_dir.py.
SUN_PATH_MAX = 107
RUNTIME_SOCKETS = ("status.sock", "exabgp-api.sock", "bfd/bfdd.vty", "bfd/bfdd.ctl")
HAPROXY_SOCKETS = ("haproxy/master.sock", "haproxy/api.sock")
HAPROXY_SOCKET_TMP_SUFFIX = 24


def _dsr_checks(config: ConfigFile) -> Iterable[Problem]:
    """Direct server return: only where the data plane can send a packet to a node's MAC address unchanged
    (nftables: the netdev table, on the interfaces the routers' traffic comes in on; IPVS: direct routing, wherever
    the packet comes in)."""
    users = [(f"services[{i}].forwardingMode", s.name) for i, s in enumerate(config.services)
             if (s.forwarding_mode or config.dataplane.forwarding_mode) == "dsr"]
    if config.dataplane.forwarding_mode == "dsr":
        users.insert(0, ("dataplane.forwardingMode", "dsr"))
    if not users:
        return
    field, _ = users[0]
    if config.dataplane.kind == "iptables":
        yield Problem(field, "dsr", "needs dataplane.kind nftables or ipvs (here iptables: iptables cannot send a "
                                    "packet to another host's MAC address without rewriting it or keeping state)")
    if config.dataplane.kind == "nftables" and not config.dataplane.dsr_interfaces:
        yield Problem("dataplane.dsrInterfaces", "[]",
                      f"{field} is dsr: name the interfaces the routers send the VIPs' traffic in on (e.g. [eth0])")


def _cross_checks(config: ConfigFile) -> Iterable[Problem]:
    """Checks no single field can make: uniqueness, families, addresses that clash, features not built yet."""
    if not config.agent.runtime_dir.startswith("/"):
        yield Problem("agent.runtimeDir", short(config.agent.runtime_dir),
                      "must be an absolute path (the agent and its children run from other directories)")
    elif not _RUNTIME_DIR.fullmatch(config.agent.runtime_dir):
        yield Problem("agent.runtimeDir", short(config.agent.runtime_dir),
                      "only letters, digits, '.', '_', '-' and '/': the path goes unquoted into ExaBGP's and "
                      "HAProxy's configs (a space would split ExaBGP's API command)")
    else:
        longest = max((len(name), name) for name in RUNTIME_SOCKETS)
        if config.listeners:
            longest = max(longest, *((len(name) + HAPROXY_SOCKET_TMP_SUFFIX, name) for name in HAPROXY_SOCKETS))
        room = SUN_PATH_MAX - longest[0] - 1
        if len(config.agent.runtime_dir.rstrip("/")) > room:
            yield Problem("agent.runtimeDir", short(config.agent.runtime_dir),
                          f"too long for the unix sockets made in it: at most {room} characters"
                          f"{' with listeners' if config.listeners else ''} (a socket path holds {SUN_PATH_MAX} "
                          f"bytes; the longest here is {longest[1]})")
    if not config.nodes and config.kubernetes is None:
        yield Problem("nodes", "[]", "at least one node, unless the `kubernetes` section gives them")
    if config.kubernetes is not None:
        yield from _kubernetes_checks(config, config.kubernetes)
    yield from _dsr_checks(config)
    own: dict[str, str] = {str(config.bgp.router_id): "bgp.routerID"}
    seen_peers: dict[str, int] = {}
    for i, peer in enumerate(config.bgp.peers):
        address = str(peer.address)
        if address in seen_peers:
            yield Problem(f"bgp.peers[{i}].address", address,
                          f"duplicate peer (also bgp.peers[{seen_peers[address]}]): one session per neighbor")
        seen_peers.setdefault(address, i)
        own.setdefault(address, f"bgp.peers[{i}].address")
        if peer.local_address is not None:
            own.setdefault(str(peer.local_address), f"bgp.peers[{i}].localAddress")
            if peer.local_address.version != peer.address.version:
                yield Problem(f"bgp.peers[{i}].localAddress", str(peer.local_address),
                              f"an IPv{peer.local_address.version} local address cannot reach the IPv"
                              f"{peer.address.version} peer {peer.address}")
        bfd = _bfd(config.bgp.bfd, peer.bfd)
        if bfd is not None and bfd.detect_multiplier * bfd.receive_interval >= peer.hold_time * 1000:
            yield Problem(f"bgp.peers[{i}].bfd", f"{bfd.detect_multiplier} x {bfd.receive_interval} ms",
                          f"the detection time (detectMultiplier x receiveInterval) must be shorter than the hold "
                          f"time ({peer.hold_time} s), or BFD detects nothing BGP does not")
    seen_nodes: dict[str, int] = {}
    families: set[int] = set()
    for i, node in enumerate(config.nodes):
        for k, node_address in enumerate(node.addresses):
            own.setdefault(str(node_address), f"nodes[{i}].addresses[{k}]")
            if not _routable(node_address):
                yield Problem(f"nodes[{i}].addresses[{k}]", str(node_address),
                              "a node address must be a unicast address the LB reaches the node at")
        if node.name in seen_nodes:
            yield Problem(f"nodes[{i}].name", short(node.name),
                          f"duplicate node name (also nodes[{seen_nodes[node.name]}])")
        seen_nodes.setdefault(node.name, i)
        node_families = [a.version for a in node.addresses]
        if len(set(node_families)) != len(node_families):
            yield Problem(f"nodes[{i}].addresses", short([str(a) for a in node.addresses]),
                          "at most one address per family (one IPv4, one IPv6)")
        families.update(node_families)

    seen_services: dict[str, int] = {}
    vip_attributes: dict[str, tuple[int, ServiceBgpEntry]] = {}
    seen_frontends: dict[tuple[str, str, int], str] = {}
    seen_node_ports: dict[tuple[str, int], str] = {}
    for i, svc in enumerate(config.services):
        key = f"{svc.namespace}/{svc.name}"
        if key in seen_services:
            yield Problem(f"services[{i}].name", short(svc.name),
                          f"duplicate service {key} (also services[{seen_services[key]}])")
        seen_services.setdefault(key, i)
        yield from _check_vips(i, svc, families, vip_attributes)
        field = "vip" if svc.vip is not None else "vips"
        for vip in svc.all_vips:
            if str(vip) in own:
                yield Problem(f"services[{i}].{field}", str(vip),
                              f"a VIP cannot be an address the site already uses: it is {own[str(vip)]}")
        # A dual-stack service may admit one family only (as kube-proxy does); no family at all admits nobody.
        ranges = svc.load_balancer_source_ranges
        if ranges and svc.all_vips and not {r.version for r in ranges} & {v.version for v in svc.all_vips}:
            yield Problem(f"services[{i}].loadBalancerSourceRanges", short([str(r) for r in ranges]),
                          f"no range of the VIPs' family (IPv{svc.all_vips[0].version}): every client would be "
                          "dropped")
        if svc.external_traffic_policy == "Local" and svc.health_check_node_port is None:
            yield Problem(f"services[{i}].healthCheckNodePort", "nothing",
                          "externalTrafficPolicy Local needs the Service's healthCheckNodePort (kube-proxy's "
                          "answer says which nodes have a ready endpoint)")
        if svc.health_check_node_port is not None:
            hc = ("TCP", svc.health_check_node_port)
            if hc in seen_node_ports:
                yield Problem(f"services[{i}].healthCheckNodePort", str(svc.health_check_node_port),
                              f"port {svc.health_check_node_port} is already used by {seen_node_ports[hc]}")
            seen_node_ports.setdefault(hc, key)
        port_names: set[str] = set()
        for j, port in enumerate(svc.ports):
            where = f"services[{i}].ports[{j}]"
            if len(svc.ports) > 1 and not port.name:
                yield Problem(f"{where}.name", "''", "every port needs a name when a service has several")
            if port.name and port.name in port_names:
                yield Problem(f"{where}.name", short(port.name), "duplicate port name in this service")
            port_names.add(port.name)
            for vip in svc.all_vips:
                frontend = (str(vip), port.protocol, port.port)
                if frontend in seen_frontends:
                    yield Problem(f"{where}.port", str(port.port),
                                  f"{port.protocol} {vip} port {port.port} is already used by "
                                  f"{seen_frontends[frontend]}")
                seen_frontends.setdefault(frontend, key)
            node_port = (port.protocol, port.node_port)
            if node_port in seen_node_ports:
                yield Problem(f"{where}.nodePort", str(port.node_port),
                              f"{port.protocol} nodePort {port.node_port} is already used by "
                              f"{seen_node_ports[node_port]}")
            seen_node_ports.setdefault(node_port, key)
    yield from _http_checks(config)


def _kubernetes_checks(config: ConfigFile, section: KubernetesSection) -> Iterable[Problem]:
    """Pools with unique names that overlap neither each other nor an address the file uses (the allocator would
    give a Service an address the file already serves)."""
    if section.kubeconfig is not None:
        path = Path(section.kubeconfig)
        if not path.is_absolute():
            yield Problem("kubernetes.kubeconfig", section.kubeconfig, "must be an absolute path")
        elif not path.is_file():
            yield Problem("kubernetes.kubeconfig", section.kubeconfig,
                          "no such file" if not path.exists() else "not a regular file")
        elif path.stat().st_mode & 0o077:
            yield Problem("kubernetes.kubeconfig", section.kubeconfig,
                          f"readable by others (mode {path.stat().st_mode & 0o777:04o}): it holds lbagent's "
                          "credentials; make it 0600")
    pools: list[tuple[int, Pool]] = []
    for i, entry in enumerate(section.pools):
        pool = Pool.parse(entry.name, entry.addresses)
        for j, other in pools:
            if other.name == pool.name:
                yield Problem(f"kubernetes.pools[{i}].name", pool.name, f"the name of kubernetes.pools[{j}] too")
            elif any(first.version == a.version and int(first) <= int(b) and int(a) <= int(last)
                     for first, last in pool.ranges for a, b in other.ranges):
                yield Problem(f"kubernetes.pools[{i}].addresses", ", ".join(entry.addresses),
                              f"overlaps kubernetes.pools[{j}] ({other.name})")
        pools.append((i, pool))
    used = [(f"services[{k}]", v) for k, s in enumerate(config.services) for v in s.all_vips]
    used += [(f"listeners[{k}]", v) for k, lst in enumerate(config.listeners) for v in lst.all_vips]
    used += [(f"nodes[{k}].addresses", a) for k, n in enumerate(config.nodes) for a in n.addresses]
    used += [(f"bgp.peers[{k}].address", p.address) for k, p in enumerate(config.bgp.peers)]
    used.append(("bgp.routerID", config.bgp.router_id))
    for i, pool in pools:
        for where, address in used:
            if address in pool:
                yield Problem(f"kubernetes.pools[{i}].addresses", str(address),
                              f"holds {where}'s address: the pool would give it to a Service")
    if section.ingress is not None:
        yield from _ingress_checks(section.ingress, used, pools)


def _ingress_checks(ingress: IngressSection, used: list[tuple[str, Any]], pools: list[tuple[int, Pool]]
                    ) -> Iterable[Problem]:
    if len({a.version for a in ingress.addresses}) != len(ingress.addresses):
        yield Problem("kubernetes.ingress.addresses", ", ".join(map(str, ingress.addresses)),
                      "one address per family")
    if ingress.http_port == ingress.https_port:
        yield Problem("kubernetes.ingress.httpsPort", str(ingress.https_port), "the same as httpPort")
    for k, address in enumerate(ingress.addresses):
        for where, other in used:
            if address == other:
                yield Problem(f"kubernetes.ingress.addresses[{k}]", str(address),
                              f"also {where}'s address: the Ingress listeners need their own")
        for i, pool in pools:
            if address in pool:
                yield Problem(f"kubernetes.ingress.addresses[{k}]", str(address),
                              f"in kubernetes.pools[{i}] ({pool.name}): the pool would give it to a Service")


def _http_checks(config: ConfigFile) -> Iterable[Problem]:
    services = {f"{s.namespace}/{s.name}": (i, {p.port for p in s.ports if p.protocol == "TCP"})
                for i, s in enumerate(config.services)}
    l4_vips = {str(v) for s in config.services for v in s.all_vips}
    yield from config_http.cross_checks(config.listeners, config.routes, list(config.backends), services, l4_vips,
                                        config.proxy)
    if config.listeners and (not config.routes and all(lst.default_backend is None and not lst.redirect_to_https
                                                       for lst in config.listeners)):
        yield Problem("routes", "[]", "listeners are configured but no route or default backend serves them")
    for i, listener in enumerate(config.listeners):
        refs = listener.certificate_refs()
        if not refs:
            continue
        cert_problems = [Problem(p.path, p.value, f"listener {listener.name}: {p.message}", p.line)
                         for w, c in refs for p in config_http.certificate_problems(f"listeners[{i}].{w}", c)]
        yield from cert_problems
        if cert_problems:
            continue
        certs = [c for _, c in refs]
        hostnames = [(f"routes[{r}].hostnames[{h}]", name) for r, route in enumerate(config.routes)
                     if listener.name in route.listeners for h, name in enumerate(route.hostnames)]
        yield from config_http.hostname_coverage(listener.name, hostnames, certs)


def _check_vips(
    i: int, svc: ServiceEntry, families: set[int], vip_attributes: dict[str, tuple[int, ServiceBgpEntry]]
) -> Iterable[Problem]:
    field = "vip" if svc.vip is not None else "vips"
    vips = svc.all_vips
    if len({v.version for v in vips}) != len(vips):
        yield Problem(f"services[{i}].vips", short([str(v) for v in vips]), "at most one VIP per family")
    for vip in vips:
        if vip.version not in families:
            yield Problem(f"services[{i}].{field}", short(str(vip)),
                          f"no node has an IPv{vip.version} address to forward this VIP to")
        if not _routable(vip):
            yield Problem(f"services[{i}].{field}", short(str(vip)), "a VIP must be a unicast, routable address")
        first = vip_attributes.setdefault(str(vip), (i, svc.bgp))
        if first[1] != svc.bgp:
            yield Problem(f"services[{i}].bgp", short(svc.bgp.model_dump(by_alias=True)),
                          f"services sharing VIP {vip} must announce it with the same attributes "
                          f"as services[{first[0]}]")


def _health(defaults: model.HealthCheck, section: HealthCheckSection) -> model.HealthCheck:
    return model.HealthCheck(
        interval=section.interval if section.interval is not None else defaults.interval,
        timeout=section.timeout if section.timeout is not None else defaults.timeout,
        rise=section.rise if section.rise is not None else defaults.rise,
        fall=section.fall if section.fall is not None else defaults.fall,
        kube_proxy_healthz=(
            section.kube_proxy_healthz if section.kube_proxy_healthz is not None else defaults.kube_proxy_healthz
        ),
        kube_proxy_port=section.kube_proxy_port if section.kube_proxy_port is not None else defaults.kube_proxy_port,
        probe_on_refusal=(
            section.probe_on_refusal if section.probe_on_refusal is not None else defaults.probe_on_refusal
        ),
    )


def _bfd(defaults: BfdSection, section: BfdSection) -> model.Bfd | None:
    """A peer's BFD settings: its own fields, else bgp.bfd's, else model.Bfd's defaults; None when not enabled."""
    def pick(name: str) -> Any:
        own = getattr(section, name)
        return own if own is not None else getattr(defaults, name)

    if not pick("enabled"):
        return None
    fallback = model.Bfd()
    return model.Bfd(
        receive_interval=pick("receive_interval") or fallback.receive_interval,
        transmit_interval=pick("transmit_interval") or fallback.transmit_interval,
        detect_multiplier=pick("detect_multiplier") or fallback.detect_multiplier,
    )


def _to_model(config: ConfigFile) -> model.Model:
    defaults = _health(_DEFAULT_HEALTH, config.health_check_defaults)
    return model.Model(
        node_name=config.node.name,
        vip_interface=config.node.vip_interface,
        bgp=model.Bgp(
            local_as=config.bgp.local_as,
            router_id=config.bgp.router_id,
            peers=tuple(
                model.Peer(
                    address=p.address,
                    peer_as=p.peer_as,
                    hold_time=p.hold_time,
                    password=p.password,
                    multihop=p.multihop,
                    local_address=p.local_address,
                    port=p.port,
                    bfd=_bfd(config.bgp.bfd, p.bfd),
                )
                for p in config.bgp.peers
            ),
            graceful_restart=config.bgp.graceful_restart,
            exabgp=config.bgp.exabgp,
        ),
        nodes=tuple(
            model.Node(name=n.name, addresses=tuple(n.addresses), weight=n.weight, draining=n.draining)
            for n in config.nodes
        ),
        services=tuple(
            model.Service(
                namespace=s.namespace,
                name=s.name,
                vips=tuple(s.all_vips),
                ports=tuple(
                    model.ServicePort(p.name, model.Protocol(p.protocol), p.port, p.node_port) for p in s.ports
                ),
                external_traffic_policy=model.TrafficPolicy(s.external_traffic_policy),
                health_check=_health(defaults, s.health_check),
                bgp=model.BgpAttributes(s.bgp.med, s.bgp.local_pref, tuple(s.bgp.communities)),
                health_check_node_port=s.health_check_node_port,
                forwarding_mode=model.ForwardingMode(s.forwarding_mode or config.dataplane.forwarding_mode),
                session_affinity_timeout=(
                    s.session_affinity_config.client_ip.timeout_seconds if s.session_affinity == "ClientIP" else None
                ),
                source_ranges=tuple(s.load_balancer_source_ranges),
                ipvs_scheduler=s.ipvs_scheduler,
            )
            for s in config.services
        ),
        dataplane=model.Dataplane(
            kind=model.DataplaneKind(config.dataplane.kind),
            table=config.dataplane.table,
            masquerade_mark=config.dataplane.masquerade_mark,
            manage_sysctls=config.dataplane.manage_sysctls,
            maglev_table_size=config.dataplane.maglev_table_size,
            iptables_variant=config.dataplane.iptables_variant,
            dsr_interfaces=tuple(config.dataplane.dsr_interfaces),
        ),
        agent=model.Agent(
            drain_seconds=config.agent.drain_seconds,
            resync_seconds=config.agent.resync_seconds,
            min_sync_interval=config.agent.min_sync_interval,
            retry_seconds=config.agent.retry_seconds,
            runtime_dir=config.agent.runtime_dir,
            metrics_address=config.agent.metrics_address,
        ),
        proxy=config_http.proxy_model(config.proxy),
        listeners=config_http.listeners_model(config.listeners),
        routes=config_http.routes_model(config.routes),
        backends=tuple(model.StaticBackend(b.name, tuple(b.endpoints), _health(defaults, b.health_check))
                       for b in config.backends),
        kubernetes=None if config.kubernetes is None else model.Kubernetes(
            kubeconfig=config.kubernetes.kubeconfig,
            load_balancer_class=config.kubernetes.load_balancer_class,
            node_address_type=config.kubernetes.node_address_type,
            pools=tuple(model.AddressPool(p.name, tuple(p.addresses), p.auto_assign) for p in config.kubernetes.pools),
            lease_namespace=config.kubernetes.lease.namespace,
            lease_name=config.kubernetes.lease.name,
            lease_seconds=config.kubernetes.lease.duration,
            health_check=defaults,
            forwarding_mode=model.ForwardingMode(config.dataplane.forwarding_mode),
            ingress=None if config.kubernetes.ingress is None else model.IngressSettings(
                controller=config.kubernetes.ingress.controller,
                addresses=tuple(config.kubernetes.ingress.addresses),
                http_port=config.kubernetes.ingress.http_port,
                https_port=config.kubernetes.ingress.https_port,
                watch_without_class=config.kubernetes.ingress.watch_without_class,
            ),
            pods_routable=config.kubernetes.pods_routable,
            gateway=None if config.kubernetes.gateway is None else model.GatewaySettings(
                controller_name=config.kubernetes.gateway.controller_name),
        ),
    )
