"""The Vagrant lab (vagrant/, configs/lab/), checked without booting it: the Vagrantfile parses and, run
against a stand-in for Vagrant's API, builds the namespace lab's machines and addresses; the provisioning scripts
pass shellcheck; the LB configs pass lbagent's validation and, with the demo manifest's Services as lbagent's
Kubernetes source reads them (allocated and translated by its own code), describe the namespace lab's topology
(tests/lab/lab.py); the BIRD config parses and peers with both LBs and accepts every pool address."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbagent import model
from lbagent.sources.file import config
from lbagent.sources.kubernetes import translate
from lbagent.sources.kubernetes.allocator import Allocator, Pool, Request
from lbagent.sources.kubernetes.source import settings_of
from tests import programs
from tests.lab.lab import HOSTS, LB_AS, LBS, NODES, ROUTER_AS, ROUTER_UPLINK, Lab

REPO = Path(__file__).resolve().parents[2]
VAGRANT = REPO / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
TOPOLOGY = VAGRANT / "topology.yaml"
PROVISION = VAGRANT / "provision"
MANIFEST = VAGRANT / "manifests" / "demo.yaml"
LAB_CONFIGS = REPO / "configs" / "lab"
BIRD_CONF = LAB_CONFIGS / "bird.conf"
INSTALL = REPO / "systemd" / "install.sh"
UNIT = REPO / "systemd" / "lbagent.service"
LB_CLASS = "lbagent.io/lbagent"
KUBECONFIG = "/etc/lbagent/kubeconfig"  # where vagrant/provision/lb.sh writes it


def _tool(name: str) -> str:
    try:
        return programs.path(name)
    except RuntimeError as e:
        pytest.fail(str(e))


def _topology() -> dict[str, Any]:
    data = yaml.safe_load(TOPOLOGY.read_text())
    assert isinstance(data, dict)
    return data


def _lab() -> Lab:
    """A namespace lab object that is never brought up: constructing one touches nothing on the machine."""
    return Lab(prefix="vagrant", start_agents=False)


def _lb_config_path(lb: str) -> Path:
    return LAB_CONFIGS / f"{lb}.yaml"


def _lb_config(lb: str) -> dict[str, Any]:
    data = yaml.safe_load(_lb_config_path(lb).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A stand-in for the kubeconfig lb.sh writes on an LB node: validation wants a 0600 file there."""
    path = tmp_path_factory.mktemp("kube") / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\n")
    path.chmod(0o600)
    return str(path)


def _lb_doc(lb: str, kubeconfig: str) -> dict[str, Any]:
    doc = _lb_config(lb)
    assert doc["kubernetes"]["kubeconfig"] == KUBECONFIG
    doc["kubernetes"]["kubeconfig"] = kubeconfig
    return doc


def _lb_model(lb: str, kubeconfig: str) -> model.Model:
    """configs/lab/LB.yaml as lbagent reads it, the kubeconfig in a temporary place."""
    return _parse(_lb_doc(lb, kubeconfig))


def _pools(m: model.Model) -> list[Pool]:
    assert m.kubernetes is not None
    return [Pool.parse(p.name, p.addresses, p.auto_assign) for p in m.kubernetes.pools]


# ----- the Vagrantfile ----------------------------------------------------------------------------------------

def test_vagrantfile_is_valid_ruby() -> None:
    result = subprocess.run([_tool("ruby"), "-c", str(VAGRANTFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stdout + result.stderr


# A stand-in for the part of Vagrant's configuration API the Vagrantfile uses; anything else is a NoMethodError.
# It records every machine and prints them as JSON.
_VAGRANT_STUB = r"""
require "json"

class StubProvider
  attr_accessor :memory, :cpus
end

class StubVM
  def initialize(record)
    @record = record
  end

  def box=(value)
    @record["box"] = value
  end

  def hostname=(value)
    @record["hostname"] = value
  end

  def synced_folder(host_path, guest_path, **options)
    @record["synced_folders"] << { "host" => host_path, "guest" => guest_path, "options" => options }
  end

  def network(kind, **options)
    @record["networks"] << { "kind" => kind, "options" => options }
  end

  def provider(name)
    provider = StubProvider.new
    yield provider
    @record["providers"][name] = { "memory" => provider.memory, "cpus" => provider.cpus }
  end

  def provision(name, **options)
    @record["provisioners"] << { "name" => name, "options" => options }
  end

  def define(name)
    machine = StubRecord.make
    MACHINES[name] = machine
    yield StubConfig.new(machine)
  end
end

module StubRecord
  def self.make
    { "synced_folders" => [], "networks" => [], "providers" => {}, "provisioners" => [] }
  end
end

class StubConfig
  attr_reader :vm

  def initialize(record)
    @vm = StubVM.new(record)
  end
end

MACHINES = {}
GLOBAL = StubRecord.make

module Vagrant
  def self.configure(version)
    raise "Vagrant.configure(#{version.inspect}): want \"2\"" unless version == "2"

    yield StubConfig.new(GLOBAL)
  end
end

load ARGV.fetch(0)
puts JSON.generate({ "global" => GLOBAL, "machines" => MACHINES })
"""


@pytest.fixture(scope="module")
def vagrant_machines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Vagrantfile run against the stand-in, from a copy of vagrant/ (it writes its k3s token beside itself)."""
    copy = tmp_path_factory.mktemp("vagrant") / "vagrant"
    shutil.copytree(VAGRANT, copy, ignore=shutil.ignore_patterns(".vagrant", ".k3s-token"))
    stub = copy.parent / "stub.rb"
    stub.write_text(_VAGRANT_STUB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("K3S_")}
    result = subprocess.run([_tool("ruby"), str(stub), str(copy / "Vagrantfile")], capture_output=True, text=True,
                            check=False, cwd=copy, env=env)
    assert result.returncode == 0, result.stderr
    token = copy / ".k3s-token"
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text()), "the Vagrantfile makes a k3s token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_vagrantfile_machines_have_the_namespace_labs_addresses(vagrant_machines: dict[str, Any]) -> None:
    machines = vagrant_machines["machines"]
    lab_hosts = {name: host for name, host in HOSTS.items() if host.role != "switch"}
    assert set(machines) == set(lab_hosts)
    for name, host in lab_hosts.items():
        machine = machines[name]
        assert machine["hostname"] == name
        networks = [n for n in machine["networks"] if n["kind"] == "private_network"]
        assert len(networks) == len(machine["networks"]), f"{name}: only private networks"
        got = {
            str(ipaddress.ip_interface(f"{n['options']['ip']}/{n['options']['netmask']}")) for n in networks
        }
        assert got == set(host.interfaces.values()), name
        for n in networks:  # the same isolated segment per network in both providers
            opts = n["options"]
            assert opts["virtualbox__intnet"] == opts["libvirt__network_name"], name
            assert opts["libvirt__forward_mode"] == "veryisolated" and opts["libvirt__dhcp_enabled"] is False
        assert set(machine["providers"]) == {"virtualbox", "libvirt"}
        for provider in machine["providers"].values():
            assert 256 <= provider["memory"] <= 2048 and 1 <= provider["cpus"] <= 2, (name, provider)


def test_machines_on_one_network_share_one_segment(vagrant_machines: dict[str, Any]) -> None:
    segments: dict[str, set[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    for machine in vagrant_machines["machines"].values():
        for n in machine["networks"]:
            opts = n["options"]
            net = ipaddress.ip_interface(f"{opts['ip']}/{opts['netmask']}").network
            segments.setdefault(opts["virtualbox__intnet"], set()).add(net)
    assert all(len(nets) == 1 for nets in segments.values()), segments
    assert len(segments) == 3, segments  # client, uplink, cluster


def test_vagrantfile_syncs_the_repository_and_provisions_each_role(vagrant_machines: dict[str, Any]) -> None:
    topology = _topology()
    source = topology["sourceDir"]
    glob = vagrant_machines["global"]
    assert glob["box"] == topology["box"] == "debian/bookworm64"
    folders = {f["guest"]: f for f in glob["synced_folders"]}
    assert folders["/vagrant"]["options"] == {"disabled": True}
    repo = folders[source]
    assert repo["host"] == ".." and repo["options"]["type"] == "rsync"  # the repository, not only vagrant/
    assert ".venv/" in repo["options"]["rsync__exclude"] and "vagrant/.vagrant/" in repo["options"]["rsync__exclude"]

    server = HOSTS["node1"].addresses[0]
    expected: dict[str, list[tuple[str, list[str]]]] = {
        "router": [("router.sh", [])],
        "client": [],
        **{lb: [("lb.sh", [lb, server])] for lb in LBS},
        "node1": [("k3s-server.sh", [server])],
        **{node: [("k3s-agent.sh", [HOSTS[node].addresses[0], server])] for node in NODES[1:]},
    }
    k3s_env = {"LAB_SRC": source, "K3S_VERSION": "", "K3S_CHANNEL": "stable"}  # the stand-in runs without them
    for name, machine in vagrant_machines["machines"].items():
        provisioners = machine["provisioners"]
        for p in provisioners:
            k3s = Path(p["options"]["path"]).name.startswith("k3s-")
            assert p["options"]["env"] == (k3s_env if k3s else {"LAB_SRC": source}), name
            assert p["options"]["type"] == "shell" and (VAGRANT / p["options"]["path"]).is_file(), name
        base, *rest = provisioners
        assert base["options"]["path"] == "provision/base.sh"
        assert base["options"]["args"] == topology["hosts"][name].get("routes", [])
        assert [(Path(p["options"]["path"]).name, p["options"]["args"]) for p in rest] == expected[name], name


def test_topology_file_has_the_namespace_labs_hosts_and_routes(kubeconfig: str) -> None:
    topology = _topology()
    networks = {name: ipaddress.ip_network(prefix) for name, prefix in topology["networks"].items()}
    hosts = topology["hosts"]
    assert set(hosts) == {name for name, host in HOSTS.items() if host.role != "switch"}
    roles = {name: host["role"] for name, host in hosts.items()}
    assert {name for name, role in roles.items() if role == "lb"} == set(LBS)
    assert {name for name, role in roles.items() if role.startswith("k3s-")} == set(NODES)
    assert roles["node1"] == "k3s-server" and roles["router"] == "router" and roles["client"] == "client"
    for name, host in hosts.items():
        lab = HOSTS[name]
        assert set(host["addresses"].values()) == set(lab.interfaces.values()), name
        for network, cidr in host["addresses"].items():
            assert ipaddress.ip_interface(cidr).network == networks[network], (name, cidr)
        # The namespace lab's default route via the router becomes routes to the lab's networks via it.
        gateways = {route.split(" via ")[1] for route in host.get("routes", [])}
        assert gateways == ({lab.gateway} if lab.gateway else set()), name
        for route in host.get("routes", []):
            ipaddress.ip_network(route.split(" via ")[0])
    # every address the pools may give (the first and last of each range) is routed by the client via the router
    pools = _pools(_lb_model("lb1", kubeconfig))
    vips = {end for pool in pools for first, last in pool.ranges for end in (first, last)}
    client_routes = [ipaddress.ip_network(r.split(" via ")[0]) for r in hosts["client"]["routes"]]
    assert vips and all(any(vip in net for net in client_routes) for vip in vips), \
        "the client routes the VIPs via the router"
    for lb in LBS:
        lb_routes = [ipaddress.ip_network(r.split(" via ")[0]) for r in hosts[lb]["routes"]]
        assert networks["client"] in lb_routes, f"{lb} answers the clients via the router"


# ----- the provisioning scripts -------------------------------------------------------------------------------

def _scripts() -> list[Path]:
    scripts = sorted(VAGRANT.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"base.sh", "router.sh", "lb.sh", "k3s-server.sh", "k3s-agent.sh"}
    return scripts


def test_scripts_pass_shellcheck() -> None:
    scripts = _scripts()
    result = subprocess.run([_tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_the_provisioning_writes_pass_shellcheck() -> None:
    """base.sh writes the routes script of each machine from a quoted here-document."""
    body = re.search(r"<<'SCRIPT'\n(.*?)\nSCRIPT\n", (PROVISION / "base.sh").read_text(), re.S)
    assert body and body.group(1).startswith("#!/bin/sh\n")
    result = subprocess.run([_tool("shellcheck"), "-s", "sh", "-"], input=body.group(1) + "\n", capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_strict_bash() -> None:
    for script in _scripts():
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", script
        assert "set -euo pipefail" in lines, script


def test_lb_script_installs_with_the_projects_install_script() -> None:
    text = (PROVISION / "lb.sh").read_text()
    assert 'bash "$src/systemd/install.sh" --config "$config" --start' in text
    assert 'config="$src/configs/lab/$name.yaml"' in text
    # the kubeconfig is written (0600) before the install checks the config that names it
    assert f"kubeconfig={KUBECONFIG}\n" in text and "umask 077" in text
    assert text.index('mv "$kubeconfig.new" "$kubeconfig"') < text.index('bash "$src/systemd/install.sh"')
    assert '"https://$server_ip:6443/cacerts"' in text and '"$src/vagrant/.lbagent-token"' in text


def test_k3s_server_knows_lbagents_token_and_applies_its_rbac() -> None:
    """The user lb.sh's token authenticates as is the subject of deploy/kubernetes/rbac.yaml."""
    server = (PROVISION / "k3s-server.sh").read_text()
    assert '"$src/vagrant/.lbagent-token"' in server and "%s,lbagent,lbagent" in server
    assert '--kube-apiserver-arg "token-auth-file=$lbagent_tokens"' in server
    rbac = server.index('apply -f "$src/deploy/kubernetes/rbac.yaml"')
    assert rbac < server.index('apply -f "$src/vagrant/manifests/demo.yaml"')
    subjects = [s for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "rbac.yaml").read_text())
                if d and d["kind"].endswith("Binding") for s in d["subjects"]]
    assert subjects and all(s == {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "lbagent"}
                            for s in subjects)


def test_k3s_scripts_disable_servicelb_and_traefik_and_share_the_token() -> None:
    server = (PROVISION / "k3s-server.sh").read_text()
    agent = (PROVISION / "k3s-agent.sh").read_text()
    assert "--disable servicelb --disable traefik" in server
    assert "vagrant/manifests/demo.yaml" in server
    for text in (server, agent):
        assert '"$src/vagrant/.k3s-token"' in text and '--token-file "$token"' in text
        assert '--node-ip "$node_ip"' in text and '--flannel-iface "$iface"' in text
    assert '--server "https://$server_ip:6443"' in agent


def test_router_script_installs_the_lab_bird_config() -> None:
    text = (PROVISION / "router.sh").read_text()
    assert 'conf="$src/configs/lab/bird.conf"' in text and "/etc/bird/bird.conf" in text
    assert "net.ipv4.ip_forward = 1" in text and "net.ipv4.fib_multipath_hash_policy = 3" in text
    assert "net.ipv4.fib_multipath_hash_fields = 0x0037" in text


# ----- the LB configs -----------------------------------------------------------------------------------------

def test_lab_configs_are_the_lbs() -> None:
    assert {p.name for p in LAB_CONFIGS.glob("*.yaml")} == {f"{lb}.yaml" for lb in LBS}


@pytest.mark.parametrize("lb", LBS)
def test_lab_config_is_valid_and_takes_services_from_the_api(lb: str, kubeconfig: str) -> None:
    m = _lb_model(lb, kubeconfig)
    assert m.kubernetes is not None and m.kubernetes.load_balancer_class == LB_CLASS
    assert not m.services and not m.nodes, "the cluster's Services and Nodes come from the API, not the file"


def _service_topology(service: model.Service) -> tuple[object, ...]:
    return (
        service.namespace,
        service.name,
        tuple(str(v) for v in service.vips),
        tuple((p.name, p.protocol.value, p.port, p.node_port) for p in service.ports),
        service.external_traffic_policy.value,
        service.health_check_node_port,
    )


def _topology_of(m: model.Model, nodes: list[tuple[str, tuple[str, ...]]],
                 services: Iterable[model.Service]) -> dict[str, object]:
    """What defines the lab's topology in an lbagent config (not timings, paths or data-plane choices)."""
    return {
        "node": m.node_name,
        "localAS": m.bgp.local_as,
        "routerID": str(m.bgp.router_id),
        "peers": sorted((str(p.address), p.peer_as) for p in m.bgp.peers),
        "nodes": sorted(nodes),
        "services": sorted(_service_topology(s) for s in services),
    }


def _k3s_nodes() -> list[tuple[str, tuple[str, ...]]]:
    """The Nodes the API will list: k3s names a node by its hostname, with --node-ip (its cluster address) as
    its InternalIP (vagrant/provision/k3s-*.sh)."""
    return [(name, (host["addresses"]["cluster"].split("/")[0],)) for name, host in _topology()["hosts"].items()
            if host["role"].startswith("k3s-")]


def _demo_services(m: model.Model, later: tuple[Path, ...] = ()) -> list[model.Service]:
    """The manifest's Services (and those of `later` manifests, created after them) as the LB nodes will serve
    them: lbagent's own allocator gives each its address (as the writer does), which goes into its status, and
    lbagent's own translation reads them back."""
    settings = settings_of(m)
    objects = []
    docs = [*_kind("Service").values(), *(d for path in later for d in yaml.safe_load_all(path.read_text()) if d)]
    for n, doc in enumerate(docs):
        obj = json.loads(json.dumps(doc))
        obj["metadata"]["creationTimestamp"] = f"2026-01-01T00:00:{n:02d}Z"
        for i, port in enumerate(obj["spec"]["ports"]):  # the API server gives a nodePort where none is written
            port.setdefault("nodePort", 32700 + 10 * n + i)
        assert translate.is_ours(obj, settings), f"{translate.key_of(obj)} is not of lbagent's class"
        objects.append(obj)
    requests = []
    for obj in objects:
        request, problems = Request.of(obj)
        assert request is not None and not problems, problems
        requests.append(request)
    result = Allocator(_pools(m)).allocate(requests)
    assert not result.problems and not result.warnings, (result.problems, result.warnings)
    services = []
    for obj in objects:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": str(a)} for a in result.addresses[translate.key_of(obj)]]}}
        service, problems = translate.translate_service(obj, [], settings)
        assert service is not None and not problems, problems
        services.append(service)
    return services


def _file_form(s: model.Service) -> dict[str, Any]:
    """A Service as a file service (the namespace lab's form)."""
    (vip,) = s.vips
    doc: dict[str, Any] = {
        "name": s.name, "namespace": s.namespace, "vip": str(vip),
        "externalTrafficPolicy": s.external_traffic_policy.value,
        "ports": [{"name": p.name, "protocol": p.protocol.value, "port": p.port, "nodePort": p.node_port}
                  for p in s.ports],
    }
    if s.health_check_node_port is not None:
        doc["healthCheckNodePort"] = s.health_check_node_port
    return doc


def _parse(doc: dict[str, Any]) -> model.Model:
    return config.parse(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize("lb", LBS)
def test_lb_config_has_the_namespace_labs_topology(lb: str, kubeconfig: str) -> None:
    ours = _lb_model(lb, kubeconfig)
    demo = _demo_services(ours)
    # The namespace lab running these same services: everything but the services comes from the lab.
    lab_model = _parse(Lab(prefix="vagrant", start_agents=False,
                           services=[_file_form(s) for s in demo]).default_agent_config(lb))
    lab_nodes = [(n.name, tuple(str(a) for a in n.addresses)) for n in lab_model.nodes]
    assert _topology_of(ours, _k3s_nodes(), demo) == _topology_of(lab_model, lab_nodes, lab_model.services)
    # The lab's own services are among them, unchanged.
    default_model = _parse(_lab().default_agent_config(lb))
    assert {_service_topology(s) for s in default_model.services} <= {_service_topology(s) for s in demo}
    # One service per traffic policy.
    assert {s.external_traffic_policy for s in demo} == set(model.TrafficPolicy)


@pytest.mark.parametrize("lb", LBS)
def test_lb_config_uses_production_values_and_the_installs_paths(lb: str, kubeconfig: str) -> None:
    doc = _lb_doc(lb, kubeconfig)
    ours = _parse(doc)
    # agent, health checks and hold times are lbagent's defaults, written out: the same model without them
    stripped = json.loads(json.dumps(doc))
    del stripped["agent"], stripped["healthCheckDefaults"]
    for peer in stripped["bgp"]["peers"]:
        del peer["holdTime"]
    assert _parse(stripped) == ours
    assert ours.agent.runtime_dir == "/run/lbagent"
    assert re.search(r"^RuntimeDirectory=lbagent$", UNIT.read_text(), re.M)
    prefix = re.search(r"^prefix=(\S+)$", INSTALL.read_text(), re.M)
    assert prefix and ours.bgp.exabgp == f"{prefix.group(1)}/bin/exabgp"
    assert ours.agent.metrics_address == "127.0.0.1:9469"


def test_lb_configs_differ_only_in_the_node() -> None:
    one, two = _lb_config("lb1"), _lb_config("lb2")
    for doc, lb in ((one, "lb1"), (two, "lb2")):
        assert doc["node"]["name"] == lb
        assert doc["bgp"]["routerID"] == HOSTS[lb].interfaces["uplink"].split("/")[0]
    one["node"] = two["node"]
    one["bgp"]["routerID"] = two["bgp"]["routerID"]
    assert one == two


# ----- the router ---------------------------------------------------------------------------------------------

def test_bird_config_parses() -> None:
    result = subprocess.run([_tool("bird"), "-p", "-c", str(BIRD_CONF)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bird_config_peers_with_both_lbs_as_the_namespace_lab_does(kubeconfig: str) -> None:
    text = re.sub(r"#.*", "", BIRD_CONF.read_text())
    lab = _lab()
    assert re.search(rf"^router id {re.escape(ROUTER_UPLINK)};", text, re.M)
    template = re.search(r"template bgp (\w+) \{(.*?)\n\}", text, re.S)
    assert template
    assert re.search(rf"local {re.escape(ROUTER_UPLINK)} as {ROUTER_AS};", template.group(2))
    assert re.search(r"passive on;", template.group(2))
    peers = {
        name: (address, int(asn))
        for name, address, asn in re.findall(
            rf"protocol bgp (\w+) from {template.group(1)} \{{\s*neighbor (\S+) as (\d+);\s*\}}", text
        )
    }
    assert peers == {lab.bird_protocol_name(peer): (peer, asn) for peer, asn in lab.bgp_peers.items()}
    assert {address for address, _ in peers.values()} == {HOSTS[lb].interfaces["uplink"].split("/")[0] for lb in LBS}
    assert {asn for _, asn in peers.values()} == {LB_AS}
    kernel = re.search(r"protocol kernel \{(.*?)\n\}", text, re.S)
    assert kernel and "merge paths yes" in kernel.group(1) and "export where source = RTS_BGP" in kernel.group(1)
    # every VIP of the LB configs passes the import filter's prefix set
    vip_set = re.search(r"net ~ \[ ([0-9./]+)\{32,32\} \]", text)
    assert vip_set
    for pool in _pools(_lb_model("lb1", kubeconfig)):
        for first, last in pool.ranges:
            assert first in ipaddress.ip_network(vip_set.group(1)) and last in ipaddress.ip_network(vip_set.group(1))
    # the LBs' hold time is the router's
    hold = re.search(r"hold time (\d+);", template.group(2))
    assert hold and {p.hold_time for lb in LBS for p in _lb_model(lb, kubeconfig).bgp.peers} == {
        int(hold.group(1))
    }


# ----- the demo app -------------------------------------------------------------------------------------------

def _manifest() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _kind(kind: str) -> dict[str, dict[str, Any]]:
    return {f"{d['metadata']['namespace']}/{d['metadata']['name']}": d for d in _manifest() if d["kind"] == kind}


def test_demo_services_are_lbagents_with_the_namespace_labs_ports(kubeconfig: str) -> None:
    services = _kind("Service")
    demo = {f"{s.namespace}/{s.name}": s for s in _demo_services(_lb_model("lb1", kubeconfig))}
    assert set(services) == set(demo)
    for key, svc in services.items():
        spec = svc["spec"]
        # lbagent's class, with node ports (lbagent forwards to them), each asking for its address
        assert spec["type"] == "LoadBalancer" and spec["loadBalancerClass"] == LB_CLASS, key
        assert spec.get("allocateLoadBalancerNodePorts", True) is True, key
        asked = svc["metadata"]["annotations"]["lbagent.io/loadBalancerIPs"]
        assert [str(v) for v in demo[key].vips] == [asked], key
        if spec["externalTrafficPolicy"] == "Local":
            assert spec["healthCheckNodePort"] == demo[key].health_check_node_port, key
        else:
            assert "healthCheckNodePort" not in spec, key
    # the namespace lab's node ports and health-check ports, as its backends serve them
    lab = Lab(prefix="vagrant", start_agents=False, services=[_file_form(s) for s in demo.values()])
    assert sorted(p["nodePort"] for svc in services.values() for p in svc["spec"]["ports"]) == lab.node_ports()
    assert {k: v["spec"]["healthCheckNodePort"] for k, v in services.items() if "healthCheckNodePort" in v["spec"]} \
        == lab.health_check_node_ports()
    node_port_range = range(30000, 32768)  # the API server's default --service-node-port-range
    assert all(port in node_port_range for port in [*lab.node_ports(), *lab.health_check_node_ports().values()])


def test_walk_through_service_gets_the_next_address(kubeconfig: str) -> None:
    """README step 5: web2.yaml, applied after the demo, asks for no address and gets 192.0.2.12."""
    doc = yaml.safe_load((VAGRANT / "manifests" / "web2.yaml").read_text())
    assert "annotations" not in doc["metadata"] and "loadBalancerIP" not in doc["spec"]
    services = _demo_services(_lb_model("lb1", kubeconfig), later=(VAGRANT / "manifests" / "web2.yaml",))
    assert {s.name: [str(v) for v in s.vips] for s in services}["web2"] == ["192.0.2.12"]
    assert "http://192.0.2.12:8080/" in (VAGRANT / "README.md").read_text()


def test_demo_deployments_are_two_versions_behind_the_services() -> None:
    deployments = _kind("Deployment")
    versions = {}
    for key, d in deployments.items():
        spec = d["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), key
        container = spec["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert labels["version"] in env["WHOAMI_NAME"] and "$(NODE_NAME)" in env["WHOAMI_NAME"], key
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": int(env["WHOAMI_PORT_NUMBER"])}
        versions[labels["version"]] = labels
    assert set(versions) == {"v1", "v2"}
    for key, svc in _kind("Service").items():
        selector = svc["spec"]["selector"]
        selected = {v for v, labels in versions.items() if selector.items() <= labels.items()}
        assert selected, f"{key} selects no pods"
        assert all(p["targetPort"] == "http" for p in svc["spec"]["ports"]), key
        if svc["spec"]["externalTrafficPolicy"] == "Cluster":
            assert selected == {"v1", "v2"}, f"{key} answers with both versions"
