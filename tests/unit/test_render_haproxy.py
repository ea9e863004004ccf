"""HAProxy rendering: golden files accepted by the real `haproxy -c`, refusals, and one run of the real HAProxy
against two echo servers that shows the routing, filters, redirects, TLS and forwarded headers doing what the
Gateway API says."""

from __future__ import annotations

import copy
import datetime
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lbagent import model, routing
from lbagent.l7 import render as haproxy
from lbagent.plan.http import HttpBackend, HttpFrontend, ProxyPlan, Server, ServerState, structural
from lbagent.routing import RouteEntry, attempt_timeouts
from lbagent.sources.file import pcre2
from tests import golden
from tests.unit.test_haproxy_apply import Backend
from tests.unit.test_pcre2 import PYTHON_ONLY

SOCKET = "/run/lbagent/haproxy/admin.sock"
PLACEHOLDER = "@TMP@"
TOKEN = 'Bearer t0k%en"x\\y'  # a log-format `%`, and quotes and a backslash HAProxy's tokeniser would eat

V4 = ip_address("192.0.2.80")
V6 = ip_address("2001:db8::80")
READY, DRAIN, MAINT = ServerState.READY, ServerState.DRAIN, ServerState.MAINT
HTTP, HTTPS = model.ListenerProtocol.HTTP, model.ListenerProtocol.HTTPS
EXACT, PREFIX = model.PathMatchType.EXACT, model.PathMatchType.PATH_PREFIX
REGEX = model.PathMatchType.REGULAR_EXPRESSION
FULL, PREFIX_MATCH = model.PathModifierType.REPLACE_FULL_PATH, model.PathModifierType.REPLACE_PREFIX_MATCH


# ---- building plans by hand -----------------------------------------------------------------------------------


def match(path: str = "/", kind: model.PathMatchType = PREFIX, headers: tuple[model.ValueMatch, ...] = (),
          query: tuple[model.ValueMatch, ...] = (), method: str | None = None) -> model.RouteMatch:
    return model.RouteMatch(model.PathMatch(kind, path), headers, query, method)


def entry(backend: str, hostname: str | None = None, m: model.RouteMatch | None = None) -> RouteEntry:
    return RouteEntry(backend, hostname, m or match(), f"routes[0].rules[{backend}].matches[0]")


def server(name: str, address: str, port: int, weight: int = 256, state: ServerState = READY,
           proxy_protocol: bool = False) -> Server:
    return Server(name, ip_address(address), port, weight, state, proxy_protocol, f"default/svc port 80 on {name}")


def backend(name: str, *servers: Server, **filters: object) -> HttpBackend:
    return HttpBackend(name, f"routes[0].rules[{name}]", tuple(servers), **filters)  # type: ignore[arg-type]


NODES = (server("0_node1", "203.0.113.11", 30080), server("0_node2", "203.0.113.12", 30080))


SHOP_RETRY = model.Retry(2, (503, 502, 404))


def routing_plan() -> ProxyPlan:
    """Hosts, every kind of path match, header, query and method matches; servers in every state."""
    shop = "shop.example.com"
    frontend = HttpFrontend(
        listener="web", vips=(V4, V6), port=80, protocol=HTTP, accept_proxy=True,
        entries=(
            entry("default_shop_0", shop, match("/checkout", EXACT)),
            entry("default_shop_1", shop, match("/items/[0-9]+", REGEX)),
            entry("default_shop_2", shop, match(
                "/api/", headers=(model.ValueMatch("X-Env", "canary"),
                                  model.ValueMatch("x-trace", "abc.*", model.ValueMatchType.REGULAR_EXPRESSION)),
                query=(model.ValueMatch("debug", "1 2"), model.ValueMatch("empty", "")), method="POST")),
            entry("default_wild_0", "*.example.com", match("/")),
            entry("default_static_0", None, match("/static")),
        ),
        default_backend="listener_web_default",
    )
    backends = (
        backend("default_shop_0",
                server("0_node1", "203.0.113.11", 30080, 256),
                server("0_node2", "203.0.113.12", 30080, 0, DRAIN),
                server("0_node3", "203.0.113.13", 30080, 0, MAINT),
                server("1_node1", "2001:db8:1::11", 30081, 85, proxy_protocol=True)),
        # timeouts.request with a retry, with retries of connections only, and backendRequest alone
        backend("default_shop_1", *NODES, retry=SHOP_RETRY, timeouts=attempt_timeouts(2.5, None, 5.0, SHOP_RETRY)),
        backend("default_shop_2"),  # no server: 503
        backend("default_wild_0", *NODES, timeouts=attempt_timeouts(2.5, 1.0, 5.0, None)),
        backend("default_static_0", *NODES, timeouts=attempt_timeouts(None, 1.5, 5.0, None)),
        backend("listener_web_default", *NODES),
    )
    return ProxyPlan((frontend,), backends)


def filters_plan() -> ProxyPlan:
    """Every filter: rewrites, header modifiers both ways, redirects of every shape; no default backend (404)."""
    names = ["rw_prefix", "rw_prefix_to", "rw_full", "headers", "redir_scheme", "redir_host_port",
             "redir_keep", "redir_prefix", "redir_prefix_root"]
    frontend = HttpFrontend(listener="api", vips=(V4,), port=8080, protocol=HTTP,
                            entries=tuple(entry(n, None, match(f"/{n}")) for n in names))
    headers = model.HeaderModifier(set=(("Authorization", TOKEN), ("X-Spaced", "a  b"), ("X-Empty", "")),
                                   add=(("X-Tag", "one"), ("X-Tag", "50%")), remove=("X-Internal", "Cookie"))
    backends = (
        backend("rw_prefix", *NODES, prefixes=("/api/httpbin", "/api"),
                rewrite=model.URLRewrite(path=model.PathModifier(PREFIX_MATCH, "/"))),
        backend("rw_prefix_to", *NODES, prefixes=("/foo/", "/"),
                rewrite=model.URLRewrite(path=model.PathModifier(PREFIX_MATCH, "/v2/"))),
        backend("rw_full", *NODES,
                rewrite=model.URLRewrite("internal.example", model.PathModifier(FULL, "/i%20.html"))),
        backend("headers", *NODES, request_headers=headers,
                response_headers=model.HeaderModifier(set=(("Cache-Control", "no-store"),), add=(("X-Via", "lb"),),
                                                      remove=("Server",))),
        backend("redir_scheme", redirect=model.Redirect(scheme="https", status_code=301)),
        backend("redir_host_port", redirect=model.Redirect(hostname="example.org", port=8443)),
        backend("redir_keep", redirect=model.Redirect(path=model.PathModifier(FULL, "/new"), status_code=303)),
        backend("redir_prefix", prefixes=("/old",),
                redirect=model.Redirect(scheme="http", port=80, path=model.PathModifier(PREFIX_MATCH, "/new"))),
        backend("redir_prefix_root", prefixes=("/a/b", "/a"),
                redirect=model.Redirect(scheme="https", port=8443, path=model.PathModifier(PREFIX_MATCH, "/"),
                                        status_code=308),
                response_headers=model.HeaderModifier(add=(("X-Redirected", "yes"),))),
    )
    return ProxyPlan((frontend,), backends)


def tls_plan(default_pem: str, shop_pem: str) -> ProxyPlan:
    """HTTPS on two VIPs with two certificates, HTTP listeners that only redirect, one without a certificate."""
    return ProxyPlan(
        (
            HttpFrontend("secure", (V4, V6), 443, HTTPS, certificates=(default_pem, shop_pem),
                         entries=(entry("default_shop_0", "shop.example.com"),)),
            HttpFrontend("plain", (V4, V6), 80, HTTP, redirect_to_https=443),
            HttpFrontend("plain-alt", (V4,), 8080, HTTP, redirect_to_https=8443),
            HttpFrontend("nocert", (V4,), 9443, HTTPS, entries=(entry("default_shop_0"),)),
        ),
        (backend("default_shop_0", *NODES),),
    )


# ---- certificates and haproxy --------------------------------------------------------------------------------


def write_certificate(path: Path, common_name: str, names: list[str]) -> None:
    """A throwaway self-signed certificate and its key in one PEM, as HAProxy reads them."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    write_certificate(d / "default.pem", "default.test", ["default.test"])
    write_certificate(d / "shop.pem", "shop.test", ["shop.test", "*.shop.test"])
    for name, content in haproxy.error_pages().items():
        (d / name).write_text(content)
    return d


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(found):
        pytest.fail("haproxy is not installed: `make test` installs it (apt package haproxy)")
    return found


def haproxy_check(text: str, directory: Path) -> None:
    """The real HAProxy accepts the file, without a single warning."""
    path = directory / "check.cfg"
    path.write_text(text)
    result = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output


# every field given: the golden files must not follow the model's defaults
PROXY = model.Proxy(haproxy="haproxy", metrics_address="127.0.0.1:9470", connect_timeout=5.0, client_timeout=30.0,
                    server_timeout=60.5, max_connections=20000, certificate_check_interval=5.0,
                    max_request_header_bytes=12288, max_request_headers=80)


# ---- golden files ---------------------------------------------------------------------------------------------


def test_routing_golden_and_valid(tmp_path: Path) -> None:
    text = haproxy.render(routing_plan(), PROXY, SOCKET)
    golden.check("haproxy", "routing.cfg", text)
    haproxy_check(text, tmp_path)


def test_filters_golden_and_valid(tmp_path: Path) -> None:
    text = haproxy.render(filters_plan(), replace(PROXY, metrics_address=None), SOCKET)
    golden.check("haproxy", "filters.cfg", text)
    haproxy_check(text, tmp_path)


def test_tls_golden_and_valid(certs: Path, tmp_path: Path) -> None:
    plan = tls_plan(str(certs / "default.pem"), str(certs / "shop.pem"))
    text = haproxy.render(plan, replace(PROXY, metrics_address="[::1]:9470"), SOCKET, errors_dir=str(certs))
    golden.check("haproxy", "tls.cfg", text.replace(str(certs), PLACEHOLDER))
    haproxy_check(text, tmp_path)


def test_empty_plan_golden_and_valid(tmp_path: Path) -> None:
    text = haproxy.render(ProxyPlan(), replace(PROXY, client_timeout=60.0, server_timeout=60.0), SOCKET)
    golden.check("haproxy", "empty.cfg", text)
    haproxy_check(text, tmp_path)


# ---- properties -----------------------------------------------------------------------------------------------


def test_runtime_differences_render_alike_and_route_changes_do_not() -> None:
    plan = routing_plan()
    shop = plan.backends[0]
    moved = replace(shop, servers=tuple(replace(s, weight=7, state=MAINT) for s in shop.servers))
    other = ProxyPlan(plan.frontends, (moved, *plan.backends[1:]))
    assert haproxy.render(plan, PROXY, SOCKET) != haproxy.render(other, PROXY, SOCKET)
    assert haproxy.render(structural(plan), PROXY, SOCKET) == haproxy.render(structural(other), PROXY, SOCKET)
    front = plan.frontends[0]
    rerouted = ProxyPlan((replace(front, entries=(*front.entries[:-1], entry("default_static_0", None,
                                                                              match("/assets")))),),
                         plan.backends)
    assert haproxy.render(structural(plan), PROXY, SOCKET) != haproxy.render(structural(rerouted), PROXY, SOCKET)


def test_render_is_deterministic() -> None:
    plan = filters_plan()
    first = haproxy.render(plan, PROXY, SOCKET)
    assert first == haproxy.render(copy.deepcopy(plan), PROXY, SOCKET)
    assert first == haproxy.render(plan, copy.deepcopy(PROXY), SOCKET)


@pytest.mark.parametrize("bad", ["it's", "line\nbreak", "tab\there", "nul\x00", "del\x7f"])
def test_unquotable_values_are_refused(bad: str) -> None:
    header_set = backend("headers", request_headers=model.HeaderModifier(set=(("X-Bad", bad),)))
    frontend = HttpFrontend("web", (V4,), 80, HTTP, entries=(entry("headers"),))
    with pytest.raises(ValueError, match="single quote or a control character"):
        haproxy.render(ProxyPlan((frontend,), (header_set,)), PROXY, SOCKET)
    header_match = entry("plain", None, match(headers=(model.ValueMatch("X-Env", bad),)))
    with pytest.raises(ValueError, match="single quote or a control character"):
        haproxy.render(ProxyPlan((replace(frontend, entries=(header_match,)),), (backend("plain"),)), PROXY, SOCKET)
    path_match = entry("plain", None, match(f"/{bad}", EXACT))
    with pytest.raises(ValueError, match="single quote or a control character"):
        haproxy.render(ProxyPlan((replace(frontend, entries=(path_match,)),), (backend("plain"),)), PROXY, SOCKET)


def test_refusals_of_what_haproxy_would_not_load(tmp_path: Path) -> None:
    frontend = HttpFrontend("web", (V4,), 80, HTTP, entries=(entry("missing"),))
    with pytest.raises(ValueError, match="unknown backends: missing"):
        haproxy.render(ProxyPlan((frontend,), ()), PROXY, SOCKET)
    retry = backend("b", retry=model.Retry(2, (418,)))
    with pytest.raises(ValueError, match="cannot retry on status 418"):
        haproxy.render(ProxyPlan((), (retry,)), PROXY, SOCKET)
    clash = (backend("a/b"), backend("a_b"))
    with pytest.raises(ValueError, match="the same for HAProxy"):
        haproxy.render(ProxyPlan((), clash), PROXY, SOCKET)
    crowded = entry("b", None, match(headers=tuple(model.ValueMatch(f"X-{i}", "v") for i in range(62))))
    with pytest.raises(ValueError, match="at most 64 words"):
        haproxy.render(ProxyPlan((HttpFrontend("web", (V4,), 80, HTTP, entries=(crowded,)),), (backend("b"),)),
                       PROXY, SOCKET)
    fits = replace(crowded, match=match(headers=crowded.match.headers[:61]))
    haproxy_check(haproxy.render(ProxyPlan((HttpFrontend("web", (V4,), 80, HTTP, entries=(fits,)),), (backend("b"),)),
                                 PROXY, SOCKET), tmp_path)
    with pytest.raises(ValueError, match="weight 300"):
        haproxy.render(ProxyPlan((), (backend("b", server("s", "203.0.113.1", 80, 300)),)), PROXY, SOCKET)


# Regular expressions lbagent accepts or refuses, each put to `haproxy -c`: what lbagent accepts HAProxy loads, and
# what HAProxy refuses lbagent refuses; the one way they part is a pattern that loads only because the whole-value
# wrapper closes its stray parenthesis (it would mean something else).
QUOTED_REGEX = 'say "hi" \\d+\\\\ #\\$'  # written in haproxy.cfg's strong quotes, as it is
ACCEPTED = ["/v[0-9]+", "/(?<v>[a-z]+)/\\k<v>", "/\\x{41}\\d{1,3}", "[[:alpha:]]+", QUOTED_REGEX,
            "(?i)/CaSe", "a|b", "/\\p{Lu}", "/(.*a){20}"]
REFUSED = [p for p, _ in PYTHON_ONLY] + ["\\Qabc", "(*UTF)a", "[z-a]", "(?<=a+)b", "\\x{100}", "/a(", "\\"]
REFUSED_FOR_MEANING = ["a)|(b"]


def test_lbagent_checks_regexes_with_the_library_haproxy_is_linked_with() -> None:
    ldd = subprocess.run(["ldd", haproxy_binary()], capture_output=True, text=True, check=True).stdout
    assert f"{pcre2.LIBRARY} => " in ldd, ldd


@pytest.mark.parametrize("pattern", ACCEPTED + REFUSED + REFUSED_FOR_MEANING)
def test_regexes_lbagent_accepts_are_the_ones_haproxy_loads(pattern: str, tmp_path: Path) -> None:
    try:
        pcre2.check(pattern)
        accepted = True
    except pcre2.Pcre2Error:
        accepted = False
    assert accepted == (pattern in ACCEPTED)
    regex = entry("b", None, match("/", headers=(model.ValueMatch("X-Re", pattern, model.ValueMatchType(
        "RegularExpression")),)))
    text = haproxy.render(ProxyPlan((HttpFrontend("web", (V4,), 80, HTTP, entries=(regex,)),), (backend("b"),)),
                          PROXY, SOCKET)
    path = tmp_path / "check.cfg"
    path.write_text(text)
    result = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if accepted or pattern in REFUSED_FOR_MEANING:
        assert result.returncode == 0 and "WARNING" not in output and "ALERT" not in output, output
    else:
        assert result.returncode != 0 and "regex" in output, output


def test_durations_and_names() -> None:
    assert [haproxy.duration(s) for s in (5.0, 2.5, 0.1, 0.0001, 3600, 1.0005)] == [
        "5s", "2500ms", "100ms", "1ms", "3600s", "1001ms"]
    with pytest.raises(ValueError):
        haproxy.duration(0)
    assert routing.proxy_name("default/shop v1") == "default_shop_v1"
    assert routing.proxy_name("node-1.example:x_y") == "node-1.example:x_y"


# ---- the real thing ---------------------------------------------------------------------------------------------


class Echo(BaseHTTPRequestHandler):
    """Answers with what it received: the path, the headers, and which server it is."""

    def do_GET(self) -> None:
        name = self.server.server_address[1]  # type: ignore[index]
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            headers[key.lower()] = f"{headers[key.lower()]}, {value}" if key.lower() in headers else value
        body = json.dumps({"server": name, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Running:
    http: int
    https: int
    redirect: int
    metrics: int
    echo_a: int
    echo_b: int
    certs: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


LONG = model.ValueMatch("X-Long", "yes")


def live_plan(r: Running) -> ProxyPlan:
    lo = ip_address("127.0.0.1")
    a = server("0_a", "127.0.0.1", r.echo_a)
    b = server("0_b", "127.0.0.1", r.echo_b)
    web = HttpFrontend("web", (lo,), r.http, HTTP, entries=(
        entry("exact", None, match("/exact", EXACT)),
        entry("canary", "app.test", match("/", headers=(model.ValueMatch("X-Canary", "yes"),))),
        entry("wild", "*.wild.test", match("/")),
        entry("httpbin", None, match("/api/httpbin")),
        entry("canary", None, match("/q", query=(model.ValueMatch("v", "a b"),), method="GET")),
        entry("httpbin", None, match("/api")),
        entry("foo", None, match("/foo/")),
        entry("keep", None, match("/keep", EXACT)),
        entry("down", None, match("/down")),
        entry("moved", None, match("/moved")),
        entry("foo", None, match("/exact")),
        entry("cond", None, match("/c/long", headers=(LONG,))),
        entry("cond", None, match("/c")),
        # quotes, a backslash, a space, `#` and `$` reach PCRE2 as written (haproxy.cfg's strong quotes)
        entry("exact", None, match("/re", headers=(model.ValueMatch("X-Re", QUOTED_REGEX,
                                                                    model.ValueMatchType.REGULAR_EXPRESSION),))),
    ))
    secure = HttpFrontend("secure", (lo,), r.https, HTTPS, entries=(entry("foo", None, match("/")),),
                          certificates=(str(r.certs / "default.pem"), str(r.certs / "shop.pem")))
    plain = HttpFrontend("plain", (lo,), r.redirect, HTTP, redirect_to_https=r.https)
    backends = (
        backend("exact", b),
        backend("canary", b),
        backend("wild", b),
        backend("httpbin", a, prefixes=("/api/httpbin", "/api"),
                rewrite=model.URLRewrite(path=model.PathModifier(PREFIX_MATCH, "/")),
                request_headers=model.HeaderModifier(set=(("Authorization", TOKEN),)),
                response_headers=model.HeaderModifier(add=(("X-Served-By", "lbagent 100%"),))),
        backend("foo", a),
        backend("down", replace(a, state=MAINT), replace(b, state=MAINT)),
        backend("moved", prefixes=("/moved",),
                redirect=model.Redirect(scheme="https", hostname="example.org", port=8443,
                                        path=model.PathModifier(PREFIX_MATCH, "/new"), status_code=301)),
        backend("keep", redirect=model.Redirect(path=model.PathModifier(FULL, "/kept"), status_code=303)),
        # one rule, two prefixes: the longer one only with a header, so a path under it may come by the shorter
        backend("cond", a, prefixes=("/c/long", "/c"), prefix_conditions=(("/c/long", (match("/c/long", headers=(
            LONG,)),)),), rewrite=model.URLRewrite(path=model.PathModifier(PREFIX_MATCH, "/x"))),
    )
    return ProxyPlan((web, secure, plain), backends)


def start_haproxy(cfg: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    """HAProxy in the foreground on `cfg`, once it accepts connections on 127.0.0.1:`port`."""
    with log.open("wb") as out:
        process = subprocess.Popen([haproxy_binary(), "-f", str(cfg), "-db"], stdout=out, stderr=out)
    deadline = time.monotonic() + 5
    while True:
        if process.poll() is not None:
            raise AssertionError(f"haproxy exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"haproxy did not listen in 5 s: {log.read_text()}") from None
            time.sleep(0.02)


@pytest.fixture
def running(request: pytest.FixtureRequest, certs: Path, tmp_path: Path) -> Iterator[Running]:
    """HAProxy on the live plan; parametrize indirectly with a tuple of trusted proxy networks."""
    trusted: tuple[model.IPNetwork, ...] = getattr(request, "param", ())
    echoes = [ThreadingHTTPServer(("127.0.0.1", 0), Echo) for _ in range(2)]
    threads = [threading.Thread(target=e.serve_forever, args=(0.05,), daemon=True) for e in echoes]
    for t in threads:
        t.start()
    process: subprocess.Popen[bytes] | None = None
    log = tmp_path / "haproxy.log"
    short = tempfile.TemporaryDirectory(prefix="lbrender")  # a unix socket's path has room for 107 bytes only
    try:
        r = Running(free_port(), free_port(), free_port(), free_port(), echoes[0].server_address[1],
                    echoes[1].server_address[1], certs)
        # maxconn needs twice as many file descriptors, which HAProxy must be allowed to open (strict-limits)
        proxy = replace(PROXY, metrics_address=f"127.0.0.1:{r.metrics}", max_connections=1000,
                        trusted_proxies=trusted)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy.render(live_plan(r), proxy, f"{short.name}/admin.sock"))
        process = start_haproxy(cfg, log, r.metrics)
        yield r
    finally:
        if process is not None:
            process.kill()
            process.wait()
        for e in echoes:
            e.shutdown()
            e.server_close()
        short.cleanup()


def request(port: int, path: str, host: str, headers: dict[str, str] | None = None, method: str = "GET",
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def echoed(port: int, path: str, host: str = "any.test", **kwargs: Any) -> dict[str, Any]:
    status, _, body = request(port, path, host, **kwargs)
    assert status == 200, (path, host, status, body)
    answer: dict[str, Any] = json.loads(body)
    return answer


def no_verify(alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


def handshake(port: int, server_name: str | None) -> tuple[str, str | None]:
    """The common name of the certificate served for the SNI name, and the protocol chosen by ALPN."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            no_verify(["h2", "http/1.1"]).wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        common_name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return str(common_name), tls.selected_alpn_protocol()


def test_haproxy_serves_what_the_gateway_api_says(running: Running) -> None:
    r = running
    a, b = r.echo_a, r.echo_b
    # PathPrefix matches whole segments; Exact goes before a PathPrefix of the same path
    assert echoed(r.http, "/foo")["server"] == a
    assert echoed(r.http, "/foo/bar?x=1")["path"] == "/foo/bar?x=1"
    assert request(r.http, "/foobar", "any.test")[0] == 404
    assert request(r.http, "/", "any.test")[2] == b"no route\n"
    assert echoed(r.http, "/exact")["server"] == b and echoed(r.http, "/exact/x")["server"] == a
    # hosts: a wildcard takes any deeper name but not the bare domain; ports and case do not matter
    assert echoed(r.http, "/x", "a.b.WILD.test:8080")["server"] == b
    assert request(r.http, "/x", "wild.test")[0] == 404
    # a header decides
    assert echoed(r.http, "/x", "app.test", headers={"x-canary": "yes"})["server"] == b
    assert request(r.http, "/x", "app.test", headers={"X-Canary": "no"})[0] == 404
    # every server down: 503
    assert request(r.http, "/down/x", "any.test")[0] == 503
    # prefix rewrite, header set with an awkward value, and a response header added
    status, headers, body = request(r.http, "/api/httpbin/delay/1?q=%41", "any.test")
    seen = json.loads(body)
    assert (status, seen["path"], seen["headers"]["authorization"]) == (200, "/delay/1?q=%41", TOKEN)
    assert headers["x-served-by"] == "lbagent 100%"
    assert json.loads(request(r.http, "/api/httpbin", "any.test")[2])["path"] == "/"
    # the longest prefix is replaced, once: what it leaves is not rewritten again by a shorter one
    assert echoed(r.http, "/api/httpbin/api/x")["path"] == "/api/x"
    assert echoed(r.http, "/api/x/")["path"] == "/x/"
    # the prefix replaced is the one the request came by, not merely the longest it is under
    assert echoed(r.http, "/c/long/z?q=1", headers={"X-Long": "yes"})["path"] == "/x/z?q=1"
    assert echoed(r.http, "/c/long/z?q=1", headers={"X-Long": "no"})["path"] == "/x/long/z?q=1"
    assert echoed(r.http, "/c/long")["path"] == "/x/long"
    # a query parameter (decoded as a form: `+` is a space) and a method decide
    assert echoed(r.http, "/q?v=a%20b")["server"] == b and echoed(r.http, "/q?x=1&v=a+b")["server"] == b
    assert request(r.http, "/q?v=a%2Bb", "any.test")[0] == 404
    assert request(r.http, "/q?v=a%20b", "any.test", method="POST")[0] == 404
    # forwarded headers
    forwarded = echoed(r.http, "/foo", "Shop.Test:81", headers={"X-Forwarded-Host": "evil", "X-Forwarded-Proto": "x"})
    assert forwarded["headers"] == forwarded["headers"] | {
        "x-forwarded-for": "127.0.0.1", "x-forwarded-proto": "http", "x-forwarded-host": "Shop.Test:81",
        "x-forwarded-port": str(r.http), "host": "Shop.Test:81"}
    # a redirect: its code, and a location with the prefix replaced and the query kept
    status, headers, _ = request(r.http, "/moved/a/b?q=1", "any.test")
    assert (status, headers["location"]) == (301, "https://example.org:8443/new/a/b?q=1")
    # a redirect that keeps the scheme, host and port the client used, with its full path replaced
    status, headers, _ = request(r.http, "/keep?x=1", "Any.Test")
    assert (status, headers["location"]) == (303, f"http://any.test:{r.http}/kept?x=1")
    assert request(r.http, "/keep", "any.test")[1]["location"] == f"http://any.test:{r.http}/kept"
    # an HTTP listener that only redirects to HTTPS
    status, headers, _ = request(r.redirect, "/x?y=1", "Shop.test:1234")
    assert (status, headers["location"]) == (301, f"https://shop.test:{r.https}/x?y=1")
    # HTTPS: forwarded headers, the certificate by SNI (the first one when SNI names none), HTTP/2 by ALPN
    secure = echoed(r.https, "/s", "shop.test", context=no_verify(["http/1.1"]))
    assert (secure["headers"]["x-forwarded-proto"], secure["headers"]["x-forwarded-port"]) == ("https", str(r.https))
    assert handshake(r.https, "shop.test") == ("shop.test", "h2")
    assert handshake(r.https, "www.shop.test")[0] == "shop.test"
    assert handshake(r.https, "default.test")[0] == "default.test"
    assert handshake(r.https, "unknown.test")[0] == "default.test"
    assert handshake(r.https, None)[0] == "default.test"
    # a regex with quotes, a backslash, `#` and `$` matches what PCRE2 says it does
    assert pcre2.matches(QUOTED_REGEX, 'say "hi" 42\\ #$') > 0
    assert echoed(r.http, "/re", headers={"X-Re": 'say "hi" 42\\ #$'})["server"] == b
    assert request(r.http, "/re", "any.test", headers={"X-Re": 'say "hi" 42 #$'})[0] == 404
    # HAProxy's own metrics
    status, _, body = request(r.metrics, "/metrics", "lb")
    assert status == 200 and b"haproxy_process_" in body
    assert request(r.metrics, "/", "lb")[0] == 404


class PeerPort(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: answers with the source port of the connection the request came on."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = str(self.client_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy killed at the end of a test resets its idle connections: not news


@pytest.mark.parametrize(("reuse", "shared"), [("safe", False), ("aggressive", True), ("always", True)])
def test_server_connection_reuse_across_client_connections(
        tmp_path: Path, reuse: model.ServerConnectionReuse, shared: bool) -> None:
    """A client sends two requests over one connection, then two clients one request each: with `safe` every
    client's first request opens a server connection of its own; with `aggressive` (a connection that has carried
    more than one request) or `always` (any idle one) a later client rides a connection an earlier one opened.
    (Not necessarily both: HAProxy keeps idle connections per thread, and on a busy machine a client's request
    may be handled by a thread that does not see the idle one yet.)"""
    echo = QuietServer(("127.0.0.1", 0), PeerPort)
    thread = threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    short = tempfile.TemporaryDirectory(prefix="lbreuse")
    process: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        web = HttpFrontend("web", (ip_address("127.0.0.1"),), port, HTTP, entries=(entry("app", None, match("/")),))
        plan = ProxyPlan((web,), (backend("app", server("0_a", "127.0.0.1", echo.server_address[1])),))
        proxy = replace(PROXY, metrics_address=None, max_connections=100, server_connection_reuse=reuse)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy.render(plan, proxy, f"{short.name}/admin.sock"))
        process = start_haproxy(cfg, tmp_path / "haproxy.log", port)
        first = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        seen = []
        for _ in range(2):
            first.request("GET", "/", headers={"Host": "app.test"})
            seen.append(first.getresponse().read())
        first.close()
        for _ in range(2):
            status, _, body = request(port, "/", "app.test")
            assert status == 200
            seen.append(body)
        assert seen[0] == seen[1]  # keep-alive toward the server within one client connection, whatever the mode
        assert (len(set(seen)) < 3) == shared, seen
    finally:
        if process is not None:
            process.kill()
            process.wait()
        echo.shutdown()
        echo.server_close()
        short.cleanup()


SPOOFED = {"X-Forwarded-For": "203.0.113.66", "X-Real-IP": "203.0.113.66"}


def test_a_clients_forwarded_headers_are_replaced_and_dot_segments_refused(running: Running) -> None:
    r = running
    seen = echoed(r.http, "/foo/x", headers=SPOOFED)["headers"]
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("127.0.0.1", "127.0.0.1")
    for path in ("/foo/../exact", "/foo/%2e%2E/exact", "/foo/.%2e", "/foo/./x", "/foo/..", "/foo%2f..%2fexact",
                 "/foo%2F..%2Fexact", "/%2E%2E/exact", "/foo/%2E"):
        assert request(r.http, path, "any.test")[0] == 400, path
    assert echoed(r.http, "/foo/..x")["server"] == r.echo_a  # a name that starts with dots is no dot segment
    assert echoed(r.http, "/foo/x.../y")["server"] == r.echo_a


@pytest.mark.parametrize("running", [(ip_network("127.0.0.0/8"),)], indirect=True)
def test_a_trusted_proxys_forwarded_headers_are_kept(running: Running) -> None:
    seen = echoed(running.http, "/foo/x", headers=SPOOFED)["headers"]
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("203.0.113.66, 127.0.0.1", "203.0.113.66")
    seen = echoed(running.http, "/foo/x")["headers"]
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("127.0.0.1", "127.0.0.1")


def _timed(port: int, path: str) -> tuple[int, float]:
    """The status the client gets and how long it waited for it, in seconds."""
    begun = time.monotonic()
    status = request(port, path, "app.test")[0]
    return status, time.monotonic() - begun


def test_timeouts_request_bounds_the_whole_request_across_retries(tmp_path: Path) -> None:
    """`timeouts.request: 1s` on a rule that retries 3 times, in front of a server that answers /slow after 3 s:
    the client gets HAProxy's 504 within the second, after all four attempts (each had its share). On a rule
    without `retry` whose only server refuses connections, HAProxy's retries with their turn-around stay within
    the second too, and the client gets 503. (Rendered as `timeout server 1s` per attempt, as before, these took
    4 s and 3 s.) A fast answer passes as usual."""
    budget, slack = 1.0, 1.0  # the ceiling asserted: the budget, and a second for a busy machine
    slow = Backend("slow")
    short = tempfile.TemporaryDirectory(prefix="lbbudget")
    process: subprocess.Popen[bytes] | None = None
    try:
        port, refused = free_port(), free_port()  # nothing listens on `refused`
        lo = ip_address("127.0.0.1")
        retry = model.Retry(3, (503,))
        web = HttpFrontend("web", (lo,), port, HTTP, entries=(
            entry("dead", None, match("/dead")), entry("retried", None, match("/"))))
        plan = ProxyPlan((web,), (
            backend("retried", server("0_slow", "127.0.0.1", slow.port), retry=retry,
                    timeouts=attempt_timeouts(budget, None, PROXY.connect_timeout, retry)),
            backend("dead", server("0_dead", "127.0.0.1", refused),
                    timeouts=attempt_timeouts(budget, None, PROXY.connect_timeout, None)),
        ))
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy.render(plan, replace(PROXY, metrics_address=None, max_connections=100),
                                      f"{short.name}/admin.sock"))
        process = start_haproxy(cfg, tmp_path / "haproxy.log", port)

        assert request(port, "/fast", "app.test")[:3:2] == (200, b"slow")
        status, took = _timed(port, "/slow")
        assert status == 504 and took < budget + slack, (status, took)
        deadline = time.monotonic() + 5
        while slow.slow_requests < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.slow_requests == 4, "the first attempt and three retries"
        status, took = _timed(port, "/dead/x")
        assert status == 503 and took < budget + slack, (status, took)
    finally:
        if process is not None:
            process.kill()
            process.wait()
        slow.close()
        short.cleanup()


def _status(port: int, head: bytes) -> int:
    """Send a request's line and headers as they are; the status of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def _head(host: bytes, headers: list[bytes]) -> bytes:
    return b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def test_header_limits_and_what_a_client_sees(tmp_path: Path) -> None:
    """maxRequestHeaderBytes 4096 and maxRequestHeaders 20 on a listener whose rule adds a 1000-byte header. A
    request just within the bytes (with a Host of the longest kept, 512 bytes) is served, with the rule's header
    and HAProxy's own added: the room for them is kept apart, so it never fails with 500. A request with a byte
    too many, a header too many, or a longer Host gets HAProxy's 400 (it has no 431 of its own in 2.6)."""
    limit, count = 4096, 20
    added = ("X-Added", "a" * 1000)
    echo = QuietServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    short = tempfile.TemporaryDirectory(prefix="lbheaders")
    process: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        web = HttpFrontend("web", (ip_address("127.0.0.1"),), port, HTTP, entries=(entry("app", None, match("/")),))
        plan = ProxyPlan((web,), (backend("app", server("0_echo", "127.0.0.1", echo.server_address[1]),
                                          request_headers=model.HeaderModifier(add=(added,))),))
        proxy = replace(PROXY, metrics_address=None, max_connections=100, max_request_header_bytes=limit,
                        max_request_headers=count)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy.render(plan, proxy, f"{short.name}/admin.sock"))
        process = start_haproxy(cfg, tmp_path / "haproxy.log", port)

        host = b"h" * 512
        # HAProxy stores a request's line and headers with about 80 bytes, and 4 bytes a header, more than sent
        fill = limit - len(_head(host, [b"X-Fill: "])) - 80 - 4 * 2 - 8
        within = _head(host, [b"X-Fill: " + b"f" * fill])
        assert len(within) > limit - 100
        status, _, body = request(port, "/h", host.decode(), headers={"X-Fill": "f" * (fill - 40)})
        assert status == 200, (status, body[:200])
        seen = json.loads(body)["headers"]
        assert seen["x-added"] == added[1] and seen["x-forwarded-host"] == host.decode()
        assert _status(port, within) == 200
        assert _status(port, _head(host, [b"X-Fill: " + b"f" * (limit - len(within) + fill + 1)])) == 400
        many = [b"X-N%d: v" % i for i in range(count - 1)]
        assert _status(port, _head(b"app.test", many)) == 200, "Host and 19 others: 20 headers"
        assert _status(port, _head(b"app.test", [*many, b"X-Last: v"])) == 400
        assert _status(port, _head(b"h" * 513, [])) == 400
    finally:
        if process is not None:
            process.kill()
            process.wait()
        echo.shutdown()
        echo.server_close()
        short.cleanup()
