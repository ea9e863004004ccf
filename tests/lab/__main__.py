"""The lab's command line: `python -m tests.lab up|exec|topology|down|list|demo` (run from the repo root)."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import yaml

from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.objects import table
from tests.lab.kube import POOL, REPO, KubeLab, pod_slice
from tests.lab.lab import DEFAULT_SERVICES, LBS, NODES, RUN_ROOT, Lab, LabError, address, existing_prefixes, wait_for
from tests.lab.traffic import Flows, count_by_port

# The demo's HTTP layer: two versions of a shop behind one listener, with ingress-nginx's canary annotations.
DEMO_LISTENER_VIP = "192.0.2.20"
DEMO_HOST = "shop.example.com"
DEMO_SERVICES = [*DEFAULT_SERVICES, {"name": "shop-v1", "ports": [{"port": 80, "nodePort": 30081}]},
                 {"name": "shop-v2", "ports": [{"port": 80, "nodePort": 30082}]}]
# The failover stage: long-lived connections to a direct-server-return VIP while an LB node is lost and comes back.
DEMO_DSR = {"name": "stream", "vip": "192.0.2.12", "forwardingMode": "dsr", "ports": [{"port": 80, "nodePort": 30083}]}
DEMO_SERVICES.append(DEMO_DSR)
DEMO_HTTP = {
    "listeners": [{"name": "web", "vip": DEMO_LISTENER_VIP, "port": 80}],
    "routes": [{"name": "shop", "listeners": ["web"], "hostnames": [DEMO_HOST], "rules": [
        {"backendRefs": [{"name": "shop-v1", "port": 80}],
         "canary": {"backendRef": {"name": "shop-v2", "port": 80},
                    "nginx.ingress.kubernetes.io/canary-weight": "20",
                    "nginx.ingress.kubernetes.io/canary-by-header": "X-Canary"}},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}],
         "filters": [{"type": "URLRewrite",
                      "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
         "backendRefs": [{"name": "shop-v1", "port": 80}]},
    ]}],
}
VERSIONS = {30081: "v1", 30082: "v2"}
# The Kubernetes stage: a Service as a user writes it, of lbagent's class; the lab's backends serve its nodePort.
DEMO_K8S_SERVICE = {
    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
    "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbagent.io/lbagent", "selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]},
}
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
DEMO_INGRESS_ADDRESS = "192.0.2.30"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so every `finally` and context manager tears its lab down."""
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def _resolve_prefix(prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    labs = existing_prefixes(RUN_ROOT)
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise LabError("no lab is up")
    raise LabError(f"several labs are up ({', '.join(labs)}): pick one with --prefix")


def _attach(prefix: str | None) -> Lab:
    return Lab.attach(_resolve_prefix(prefix))


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(prefix=args.prefix, start_agents=not args.no_agents, ipv6=args.ipv6, return_path=not args.no_return_path)
    lab.up()
    lab.detach()
    print(json.dumps(lab.topology(), indent=2))
    print(f"lab {lab.prefix} is up; tear it down with: python -m tests.lab down --prefix {lab.prefix}",
          file=sys.stderr)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise LabError("exec: no command given (exec HOST -- CMD ...)")
    lab = _attach(args.prefix)
    return subprocess.run(["ip", "netns", "exec", lab.ns(args.host), *argv], check=False).returncode


def cmd_topology(args: argparse.Namespace) -> int:
    print(json.dumps(_attach(args.prefix).topology(), indent=2))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    prefixes = existing_prefixes(RUN_ROOT) if args.all else [_resolve_prefix(args.prefix)]
    failed = 0
    for prefix in prefixes:
        try:
            lab = Lab.attach(prefix)
        except LabError:
            lab = Lab(prefix=prefix, start_agents=False)
        try:
            lab.down()
            print(f"lab {prefix}: down")
        except LabError as exc:
            print(f"lab {prefix}: {exc}", file=sys.stderr)
            failed += 1
    if not prefixes:
        print("no lab found")
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    for prefix in existing_prefixes(RUN_ROOT):
        print(prefix)
    return 0


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    # BFD between the router and both agents (100 ms x 3): an LB that dies is dropped in about 0.3 s
    lab = Lab(prefix=args.prefix, start_agents=True, services=DEMO_SERVICES, http=DEMO_HTTP,
              router_bfd={"interval": 100, "multiplier": 3})
    services = lab.services
    vip = str(services[0]["vip"])
    port = int(services[0]["ports"][0]["port"])
    lb_addresses = {address(lb, "uplink"): lb for lb in LBS}
    try:
        _step(f"building lab {lab.prefix}: client - router (BIRD, AS {lab.router_as}) - lb1, lb2 (lbagent) "
              "- node1..3 (backends)")
        lab.up()
        for host, info in lab.topology()["hosts"].items():
            print(f"  {host:7} {info['namespace']:16} {' '.join(info['addresses'])}")

        _step(f"waiting until the router learns {vip}/32 over BGP from both LBs")
        try:
            wait_for(lambda: _both_lbs_announce(lab, vip), args.timeout, 0.2,
                     f"both LBs as next hops of {vip} on the router")
        except LabError:
            print(f"  BGP sessions on the router: {lab.bgp_sessions()}")
            print(f"  the router's next hops for {vip}: {sorted(lab.router_nexthops(vip)) or 'none'}")
            for lb in LBS:
                print(f"  --- last lines of {lb}'s agent log:")
                print("    " + "\n    ".join(lab.agent_log(lb).splitlines()[-15:]))
            raise
        print(f"  BGP sessions on the router: {lab.bgp_sessions()}")
        print("  the router's kernel route (ECMP: one next hop per LB):")
        print("    " + "\n    ".join(lab.router_route(vip).splitlines()))

        url = f"http://{vip}:{port}/"
        _step(f"{args.requests} requests from the client ({address('client')}) to {url}")
        wait_for(lambda: lab.request(url) is not None, args.timeout, 0.2, f"a first answer from {url}")
        answers: Counter[str] = Counter()
        seen: dict[str, Counter[str]] = defaultdict(Counter)
        failures = 0
        for _ in range(args.requests):
            body = lab.request(url)
            if body is None:
                failures += 1
                continue
            node = str(body["node"])
            answers[node] += 1
            source = str(body["client"]).rsplit(":", 1)[0]
            seen[node][f"{source} ({lb_addresses.get(_uplink_of(source), '?')})"] += 1
        print("  node    answers  client address the node saw (which LB forwarded)")
        for node in sorted(answers):
            sources = ", ".join(f"{src} x{n}" for src, n in sorted(seen[node].items()))
            print(f"  {node:7} {answers[node]:7}  {sources}")
        if failures:
            print(f"  failed requests: {failures}")
        print("  every answer comes from a node, and each node saw an LB's cluster address as the client: "
              "the LBs spread the flows over the nodes and masquerade toward them.")
        if not (failures == 0 and answers and _demo_failover(lab) and _demo_http(lab, args)):
            return 1
        return 0 if args.no_kubernetes or _demo_kubernetes(lab, args) else 1
    finally:
        _step(f"tearing down lab {lab.prefix}")
        lab.down()
        print("  done")


def _routed_via(lab: Lab, vip: str, want: set[str]) -> bool:
    return lab.router_nexthops(f"{vip}/32") == want


def _demo_failover(lab: Lab) -> bool:
    vip = str(DEMO_DSR["vip"])
    _step(f"16 long-lived connections to {vip} (forwardingMode dsr), a request every 100 ms each, while lb1 is "
          "unplugged and plugged back in")
    uplinks = {address(lb, "uplink") for lb in LBS}
    wait_for(lambda: lab.router_nexthops(f"{vip}/32") == uplinks, 30, 0.1, f"both LBs announcing {vip}")
    wait_for(lambda: all(lab.bfd_sessions().get(u) == "Up" for u in uplinks), 30, 0.1, "BFD up with both LBs")
    flows = Flows(lab, vip)
    try:
        for up, want in ((False, {address("lb2", "uplink")}), (True, uplinks)):
            before, started = flows.results(), time.monotonic()
            lab.set_links("lb1", up)
            wait_for(functools.partial(_routed_via, lab, vip, want), 30, 0.02, "the router's route")
            routed = time.monotonic() - started
            wait_for(functools.partial(flows.answered_again, before, 30), 60, 0.1, "the connections to go on")
            print(f"  lb1 {'plugged back in' if up else 'unplugged'}: the router "
                  f"{'uses both LBs again' if up else 'dropped lb1'} after {routed:.1f} s"
                  f"{'' if up else ' (BFD, 100 ms x 3; without it, the BGP hold time: 3 s)'}")
    finally:
        results = flows.stop()
    kept = [r for r in results if r["error"] is None and len(r["nodes"]) == 1]
    stall = max((s[1] for r in kept for s in r["stalls"]), default=0.0)
    print(f"  {len(kept)}/{len(results)} connections went on, each on the node that answered its first request "
          f"(longest wait for an answer {stall:.1f} s): the LBs keep no state for these flows, and every LB picks "
          "the same node for a flow.")
    for r in results:
        if r not in kept:
            why = r["error"] or "answered by more than one node"
            print(f"  lost: source port {r['sourcePort']}: {why}, nodes {r['nodes']}")
    if len(kept) != len(results):
        print("  --- lb1's health and announce events since it was unplugged:")
        lines = [line for line in lab.agent_log("lb1").splitlines()
                 if any(f"event={e}" in line for e in ("health_changed", "vip_announced", "vip_withdrawn",
                                                          "health_cut_off", "health_reconnected"))]
        print("    " + "\n    ".join(lines[-30:]))
    answer = lab.request(f"http://{vip}/")
    if answer is not None:
        print(f"  one more request: {answer['node']} saw the client as {str(answer['client']).rsplit(':', 1)[0]} "
              "and answered it directly, through the router, not through an LB.")
    return len(kept) == len(results) and answer is not None


def _http_get(lab: Lab, path: str, *headers: str, host: str = DEMO_HOST) -> tuple[int, dict[str, object]]:
    """GET http://HOST/path at the listener VIP from the client with curl: the status and the JSON body, if any."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-w", "\n%{http_code}",
            "--resolve", f"{host}:80:{DEMO_LISTENER_VIP}", *(a for h in headers for a in ("-H", h)),
            f"http://{host}{path}"]
    body, _, status = lab.exec("client", argv, check=False).stdout.rpartition("\n")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"body": body.strip()}
    return int(status or 0), answer if isinstance(answer, dict) else {}


def _demo_http(lab: Lab, args: argparse.Namespace) -> bool:
    """The HTTP layer: HAProxy run by both agents on the listener VIP, a canary and a prefix rewrite."""
    vip = DEMO_LISTENER_VIP
    _step(f"HTTP: both agents run HAProxy for listener {vip}:80 and announce it while HAProxy is up")
    wait_for(lambda: _both_lbs_announce(lab, vip), args.timeout, 0.2, f"both LBs as next hops of {vip}")
    print("    " + "\n    ".join(lab.router_route(vip).splitlines()))
    wait_for(lambda: _http_get(lab, "/")[0] == 200, args.timeout, 0.2, f"a first answer from {DEMO_HOST}")
    n = max(args.requests, 50)
    _step(f"{n} requests to http://{DEMO_HOST}/ (canary-weight 20 for shop-v2, by ingress-nginx annotation)")
    versions: Counter[str] = Counter()
    for _ in range(n):
        status, answer = _http_get(lab, "/")
        versions[VERSIONS.get(int(str(answer.get("port", 0))), f"status {status}")] += 1
    print(f"  answers by version: {dict(sorted(versions.items()))}")
    forced = Counter(VERSIONS.get(int(str(_http_get(lab, "/", "X-Canary: always")[1].get("port", 0))), "?")
                     for _ in range(5))
    print(f"  with `X-Canary: always`: {dict(forced)} (the header route always wins)")
    status, answer = _http_get(lab, "/api/items?page=2")
    print(f"  /api/items?page=2 -> {status}, the backend saw path {answer.get('path')} (ReplacePrefixMatch /api/ -> /)")
    missing, _ = _http_get(lab, "/", host="other.example.com")
    print(f"  a host no route serves -> {missing}")
    ok = versions.get("v1", 0) > 0 and versions.get("v2", 0) > 0 and sum(versions.values()) == n \
        and forced == Counter({"v2": 5}) and answer.get("path") == "/items?page=2" and missing == 404
    print("  lbagent turned the routes into HAProxy config, the canary into weights, and sends node health to "
          "HAProxy's runtime API." if ok else "  the HTTP layer did not answer as configured")
    return ok


def _demo_kubernetes(lab: Lab, args: argparse.Namespace) -> bool:
    """The Kubernetes source: both agents restarted to take Nodes and Services from a real kube-apiserver; a
    Service applied with kubectl gets an address, is announced and served; an excluded node leaves; a deleted
    Service is withdrawn."""
    _step("Kubernetes: a real kube-apiserver (built once from k8s.io/kubernetes, cached); both agents restarted "
          "with a `kubernetes` section: the Nodes and Services come from the API")
    workdir = Path(tempfile.mkdtemp(prefix="lbagent-demo-k8s-"))
    try:
        with KubeAPIServer(workdir / "api", log=lambda line: print(f"  {line}", flush=True)) as api:
            for lb in LBS:
                lab.stop_agent(lb)
            kube = KubeLab(lab, api, workdir, {"ingress": {"addresses": [DEMO_INGRESS_ADDRESS]}, "podsRoutable": True})
            try:
                kube.start()
                print("  lbagent.yaml on each LB: " + json.dumps(lab.agent_config("lb1")["kubernetes"]))
                return _demo_kubernetes_steps(kube, args, POOL) and _demo_ingress(kube, args)
            finally:
                kube.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _demo_kubernetes_steps(kube: KubeLab, args: argparse.Namespace, pool: str) -> bool:
    lab, api = kube.lab, kube.api
    _step("the Nodes, written by the demo as each node's kubelet would register them: kubectl get nodes -o wide")
    print("  " + "\n  ".join(api.kubectl("get", "nodes", "-o", "wide").stdout.rstrip().splitlines()))
    print("  (no kubelet runs here, hence STATUS Unknown: lbagent leaves a node's readiness to its own health "
          "checks, as Kubernetes' service controller does)")
    _step(f"kubectl apply -f - (a Service of type LoadBalancer, class lbagent.io/lbagent; pool {pool})")
    print("  " + "\n  ".join(yaml.safe_dump(DEMO_K8S_SERVICE, sort_keys=False).rstrip().splitlines()))
    started = time.monotonic()
    api.kubectl("apply", "-f", "-", input=json.dumps(DEMO_K8S_SERVICE))
    ip = kube.wait_ip("default/web")
    print(f"  kubectl get svc web ({time.monotonic() - started:.1f} s after the apply):")
    print("  " + "\n  ".join(api.kubectl("get", "svc", "web").stdout.rstrip().splitlines()))
    writers = [lb for lb in LBS if kube.status(lb)["source"]["writer"]]
    print(f"  the writer (the Lease kube-system/lbagent): {', '.join(writers)}; the other LB programs the same")
    wait_for(lambda: _both_lbs_announce(lab, ip), args.timeout, 0.2, f"both LBs as next hops of {ip}")
    print("    " + "\n    ".join(lab.router_route(ip).splitlines()))
    everyone = wait_for(lambda: kube.answering_nodes(ip, tries=30) == set(NODES), args.timeout, 0.5,
                        f"answers from every node at {ip}")
    print(f"  requests from the client to http://{ip}/: answered by {', '.join(sorted(NODES))}")

    _step(f"kubectl label node node3 {EXCLUDE_LABEL}=  (Kubernetes' label for nodes an LB must not use)")
    api.kubectl("label", "node", "node3", f"{EXCLUDE_LABEL}=")
    left = wait_for(lambda: kube.answering_nodes(ip, tries=30) == {"node1", "node2"}, args.timeout, 0.5,
                    "answers from node1 and node2 only")
    print("  answered by node1, node2: node3 left rotation on both LBs")
    api.kubectl("label", "node", "node3", f"{EXCLUDE_LABEL}-")

    _step("kubectl delete svc web")
    api.kubectl("delete", "svc", "web")
    gone = wait_for(lambda: not lab.router_nexthops(f"{ip}/32"), args.timeout, 0.2, f"the router to drop {ip}")

    def cleared(lb: str) -> bool:
        bound = lab.exec(lb, ["ip", "-o", "addr", "show", "dev", "lo"]).stdout
        return ip not in bound and ip not in lab.nft_ruleset(lb)

    for lb in LBS:
        wait_for(lambda: cleared(lb), args.timeout, 0.2, f"{ip} unbound and unprogrammed on {lb}")  # noqa: B023
    print(f"  the router holds no route to {ip}, and neither LB binds it or has a rule for it")
    return bool(everyone and left and gone)


def _demo_ingress(kube: KubeLab, args: argparse.Namespace) -> bool:
    """The seeds' canary Ingresses applied as their users wrote them, then the weight moved with kubectl annotate."""
    lab, api = kube.lab, kube.api
    canary = REPO / "configs" / "kubernetes" / "canary"
    _step("Ingress: the seeds' canary (configs/kubernetes/canary), the IngressClass nginx handed to lbagent")
    api.kubectl("apply", "-f", str(REPO / "configs" / "kubernetes" / "ingressclass-nginx.yaml"))
    for name in ("svc-v1.yaml", "svc-v2.yaml"):
        api.kubectl("apply", "-f", str(canary / name))
    # the pods, as the EndpointSlice controller would list them: host-network pods on the lab's nodes, v1 on
    # 30081 and v2 on 30082 (ports the lab's backends answer on)
    kube.apply(pod_slice("svc-v1", {"web-port": 30081}), pod_slice("svc-v2", {"web-port": 30082}))
    for name in ("canary-ingress1.yaml", "canary-ingress2.yaml"):
        print(f"  kubectl apply -f {canary / name}")
        api.kubectl("apply", "-f", str(canary / name))
    wait_for(lambda: all(r["ADDRESS"] == DEMO_INGRESS_ADDRESS for r in table(api.kubectl("get", "ingress").stdout)),
             args.timeout, 0.2, "kubectl get ingress to show the address")
    print("  " + "\n  ".join(api.kubectl("get", "ingress").stdout.rstrip().splitlines()))
    wait_for(lambda: _both_lbs_announce(lab, DEMO_INGRESS_ADDRESS), args.timeout, 0.2,
             f"both LBs as next hops of {DEMO_INGRESS_ADDRESS}")
    def v2_of(n: int) -> int | None:
        """svc-v2's answers of n requests for kans.com; None while some fail (HAProxy not there yet)."""
        try:
            counts = count_by_port(lab, "kans.com", DEMO_INGRESS_ADDRESS, n)
        except AssertionError:
            return None
        return counts.get("30082", 0) if set(counts) <= {"30081", "30082"} else None

    wait_for(lambda: v2_of(10) is not None, args.timeout, 0.2, "kans.com served")
    ok = True
    for weight in ("10", "50"):
        if weight != "10":
            print(f"  kubectl annotate --overwrite ingress ingress-canary-v2 "
                  f"nginx.ingress.kubernetes.io/canary-weight={weight}")
            api.kubectl("annotate", "--overwrite", "ingress", "ingress-canary-v2",
                        f"nginx.ingress.kubernetes.io/canary-weight={weight}")
            wait_for(lambda: 35 <= (v2_of(100) or 0) <= 65, args.timeout, 0.2, "the new weight served")
        counts = count_by_port(lab, "kans.com", DEMO_INGRESS_ADDRESS, 1000)
        v2 = counts.get("30082", 0)
        print(f"  1,000 requests for kans.com at canary-weight {weight}: svc-v1 {counts.get('30081', 0)}, svc-v2 {v2}")
        ok = ok and abs(v2 - int(weight) * 10) <= 60
    return ok


def _both_lbs_announce(lab: Lab, vip: str) -> bool:
    """Whether the router has both LBs as next hops of the VIP; LabError as soon as an agent died."""
    for lb in LBS:
        if not lab.agent_running(lb):
            raise LabError(f"the agent on {lb} exited")
    return lab.router_nexthops(vip) == {address(lb, "uplink") for lb in LBS}


def _uplink_of(cluster_address: str) -> str:
    for lb in LBS:
        if address(lb, "cluster") == cluster_address:
            return address(lb, "uplink")
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="build a lab, print its topology, leave it running")
    p.add_argument("--prefix", help="namespace prefix (default: lab + 4 random hex digits)")
    p.add_argument("--no-agents", action="store_true", help="do not start lbagent on the LBs")
    p.add_argument("--ipv6", action="store_true", help="dual stack: IPv6 addresses, routes and BGP sessions too")
    p.add_argument("--no-return-path", action="store_true",
                   help="no mark-based return path on the nodes (only masquerade mode works then)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("exec", help="run a command in a lab host: exec HOST -- CMD ...")
    p.add_argument("--prefix")
    p.add_argument("host")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("topology", help="print a lab's topology as JSON")
    p.add_argument("--prefix")
    p.set_defaults(func=cmd_topology)

    p = sub.add_parser("down", help="tear a lab down")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prefix")
    group.add_argument("--all", action="store_true", help="every lab found (state dirs, lab<hex>-* namespaces)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("list", help="print the prefix of every lab found")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="build a lab with agents, show ECMP, L4 load balancing, the HTTP layer and "
                                    "the Kubernetes source, tear it down")
    p.add_argument("--prefix")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--timeout", type=float, default=30, help="seconds to wait for BGP and the first answer")
    p.add_argument("--no-kubernetes", action="store_true", help="skip the stage with the kube-apiserver")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _install_signal_handlers()
    try:
        code: int = args.func(args)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
