"""Render HAProxy's configuration (2.6 syntax) from the HTTP plan: pure text, the same bytes for the same input.

One `frontend` per listener holds the routing table (Gateway API HTTPRoute matching, first match wins, as the plan
ordered it) and one `backend` per route rule holds its filters and servers. Server weights and states are written
as the plan has them, so a reload starts from the current runtime state; the runtime API changes them in between.

Every value that comes from the config file is written inside HAProxy's strong quotes ('...': no escape, no
variable expansion), which is why a value may hold neither a single quote nor a control character: the renderer
refuses them (ValueError) rather than write a file HAProxy would read differently. Values used as log-format
strings (header values, paths of rewrites and redirects) have their `%` doubled.

Regular expressions (PCRE2) match the whole path, header value or query parameter value, as in Envoy-based Gateway
API implementations: `/v[0-9]+` matches `/v1` but not `/v1/x`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lbagent import model, routing
from lbagent.plan.http import HttpBackend, HttpFrontend, ProxyPlan, Server, ServerState
from lbagent.routing import (
    DEFAULT_RETRIES,
    MAX_HOST_BYTES,
    REWRITE_RESERVE,
    AttemptTimeouts,
    RouteEntry,
    milliseconds,
    proxy_name,
    rewrite_growth,
)

NOT_FOUND_BACKEND = "lbagent_404"  # answers requests no route takes on a listener without a default backend
METRICS_FRONTEND = "lbagent_metrics"  # HAProxy's own Prometheus exporter (listener names cannot contain `_`)
HARD_STOP_AFTER = "5m"  # the longest an old process keeps serving its connections after a reload
HTTP_REQUEST_TIMEOUT = "10s"  # for a client to send a complete request's headers
TUNNEL_TIMEOUT = "1h"  # idle time of a WebSocket (or other upgraded) connection

# Mozilla's "intermediate" TLS configuration.
TLS_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
TLS_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# The answers HAProxy makes itself; with `errors_dir`, read from `<errors_dir>/<code>.http` (see error_pages()).
ERROR_CODES = (400, 403, 408, 500, 502, 503, 504)
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_ERROR_TEXT = {400: "bad request", 403: "forbidden", 408: "request timeout", 500: "internal error",
               502: "bad response from the backend", 503: "no server is available for this request",
               504: "the backend did not answer in time"}

_RETRY_CODES = frozenset({401, 403, 404, 408, 425, 500, 501, 502, 503, 504})  # what 2.6's `retry-on` accepts
_BARE = re.compile(r"[A-Za-z0-9_.:/@+=,~()\[\]-]+")  # written as is; anything else goes inside single quotes
_FORBIDDEN = re.compile(r"['\x00-\x1f\x7f]")
_INDENT = "    "
ERROR_SHARE_SCALE = 1_000_000  # rand()'s range for the share of requests answered 500
MAX_WORDS = 64  # HAProxy's limit of words on a config line (MAX_LINE_ARGS)


# ---- words ----------------------------------------------------------------------------------------------------




def _word(value: str) -> str:
    """One word of a config line, strongly quoted unless it is plain. Empty words end a line in HAProxy's parser,
    so they are refused here: callers express emptiness otherwise."""
    if not value:
        raise ValueError("an empty value cannot be written as a HAProxy word")
    if _FORBIDDEN.search(value):
        raise ValueError(f"a single quote or a control character cannot be written in HAProxy's config: {value!r}")
    return value if _BARE.fullmatch(value) else f"'{value}'"


def _text(value: str) -> str:
    """A literal inside a log-format string."""
    if _FORBIDDEN.search(value):
        raise ValueError(f"a single quote or a control character cannot be written in HAProxy's config: {value!r}")
    return value.replace("%", "%%")


def _fmt(value: str) -> str:
    """A whole log-format argument (already escaped). An empty one is a lone separator: HAProxy drops it."""
    return _word(value) if value else "' '"


def _comment(text: str) -> str:
    return " ".join(_FORBIDDEN.sub("?", text).split())


def duration(seconds: float) -> str:
    """A timeout: whole seconds as `5s`, else milliseconds (HAProxy's resolution, rounded up) as `1500ms`."""
    ms = milliseconds(seconds)
    if ms <= 0 or ms >= 2**31:
        raise ValueError(f"a timeout must be between 1 ms and 24 days (got {seconds} s)")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _regex(pattern: str) -> str:
    """A pattern that must match the whole value (the config check compiled exactly this with PCRE2)."""
    return routing.whole_value(pattern)


def _prefix(value: str) -> str:
    """A PathPrefix as it matches whole segments: without its trailing slash; "" for `/` (every path)."""
    return value.rstrip("/")


# ---- document ---------------------------------------------------------------------------------------------------


def render(plan: ProxyPlan, proxy: model.Proxy, runtime_socket: str, errors_dir: str | None = None) -> str:
    """The complete haproxy.cfg. `runtime_socket`: the admin socket the runtime API uses. `errors_dir`: a directory
    holding `<code>.http` for each of ERROR_CODES (write them from error_pages()); None: HAProxy's own pages."""
    backends = {b.name: b for b in plan.backends}
    _check_names(plan)
    for f in plan.frontends:
        missing = sorted({e.backend for e in f.entries} - set(backends)
                         | ({f.default_backend} - set(backends) if f.default_backend else set()))
        if missing:
            raise ValueError(f"listener {f.listener} routes to unknown backends: {', '.join(missing)}")
    lines = ["# Written by lbagent: every change is overwritten. Routes and filters follow the Gateway API.", ""]
    lines += _global(proxy, runtime_socket, rewrite_reserve(plan))
    lines += _defaults(proxy, errors_dir)
    if proxy.metrics_address is not None:
        lines += _metrics(proxy.metrics_address)
    for f in plan.frontends:
        lines += _frontend(f, proxy.trusted_proxies)
    if any(_serves(f) and f.redirect_to_https is None and f.default_backend is None for f in plan.frontends):
        lines += [
            f"backend {NOT_FOUND_BACKEND}",
            f"{_INDENT}# what no route takes on a listener without a default backend",
            f'{_INDENT}http-request return status 404 content-type text/plain string "no route\\n"',
            "",
        ]
    for b in plan.backends:
        lines += _backend(b)
    for line in lines:
        if _word_count(line) > MAX_WORDS:
            raise ValueError(f"HAProxy reads at most {MAX_WORDS} words a line (too many conditions?): {line[:200]}")
    return "\n".join(lines).rstrip("\n") + "\n"


def _word_count(line: str) -> int:
    """Words of a line as HAProxy splits them: at blanks outside single quotes; a comment is none."""
    if line.lstrip().startswith("#"):
        return 0
    return len(re.findall(r"(?:'[^']*'|[^\s'])+", line))


def error_pages() -> dict[str, str]:
    """The files `errors_dir` must hold: name -> complete HTTP/1.0 response HAProxy sends as is."""
    out = {}
    for code in ERROR_CODES:
        body = _ERROR_TEXT[code] + "\n"
        out[f"{code}.http"] = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nCache-Control: no-cache\r\nConnection: close\r\n"
                               f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    return out


def _check_names(plan: ProxyPlan) -> None:
    """Distinct names stay distinct once made valid for HAProxy (frontends and backends are apart)."""
    groups: list[tuple[str, Iterable[str]]] = [
        ("frontend", [f.listener for f in plan.frontends] + [METRICS_FRONTEND]),
        ("backend", [b.name for b in plan.backends] + [NOT_FOUND_BACKEND]),
    ]
    groups += [(f"server of backend {b.name}", [s.name for s in b.servers]) for b in plan.backends]
    for kind, names in groups:
        seen: dict[str, str] = {}
        for name in names:
            clean = proxy_name(name)
            if clean in seen:
                raise ValueError(f"{kind} names {seen[clean]!r} and {name!r} are the same for HAProxy ({clean})")
            seen[clean] = name


# An IPv4 literal, or anything with a colon (an IPv6 literal; no DNS name has one).
SNI_ADDRESS = r"^[0-9.]+$|:"


def rewrite_reserve(plan: ProxyPlan) -> int:
    """HAProxy's `tune.maxrewrite`: room for what the frontends' rules and the most demanding rule add to headers."""
    return REWRITE_RESERVE + max((rewrite_growth(b.request_headers, b.response_headers, b.rewrite)
                                  for b in plan.backends), default=0)


def _global(proxy: model.Proxy, runtime_socket: str, reserve: int) -> list[str]:
    """No `log`: HAProxy's own alerts and warnings go to its standard error, which the agent logs line by line;
    a traffic log there would cost the agent a log line per request (or per failed one, in an outage).

    The buffer holds a request's line and headers (maxRequestHeaderBytes) and the `reserve` its rules may add;
    `tune.http.maxhdr` counts the request line too. HAProxy halves a reserve larger than half the buffer, which would
    take it from the request: refused (the config check names the rule)."""
    if reserve > proxy.max_request_header_bytes:
        raise ValueError(f"the headers rules add ({reserve} bytes) would not fit beside maxRequestHeaderBytes "
                         f"{proxy.max_request_header_bytes} in HAProxy's buffer")
    return [
        "global",
        f"{_INDENT}stats socket {_word(runtime_socket)} mode 600 level admin expose-fd listeners",
        f"{_INDENT}maxconn {proxy.max_connections}",
        f"{_INDENT}tune.bufsize {proxy.max_request_header_bytes + reserve}",
        f"{_INDENT}tune.maxrewrite {reserve}",
        f"{_INDENT}tune.http.maxhdr {proxy.max_request_headers + 1}",
        f"{_INDENT}hard-stop-after {HARD_STOP_AFTER}",
        f"{_INDENT}ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        f"{_INDENT}ssl-default-bind-ciphers {TLS_CIPHERS}",
        f"{_INDENT}ssl-default-bind-ciphersuites {TLS_CIPHERSUITES}",
        "",
    ]


def _defaults(proxy: model.Proxy, errors_dir: str | None) -> list[str]:
    lines = [
        "defaults",
        f"{_INDENT}mode http",
        f"{_INDENT}option http-keep-alive",
        f"{_INDENT}http-reuse {proxy.server_connection_reuse}",
        # A reload's old worker answers an idle keep-alive client's next request (with `Connection: close`)
        # instead of closing under it: no client sees its request dropped by a reload.
        f"{_INDENT}option idle-close-on-response",
        f"{_INDENT}option forwardfor",
        f"{_INDENT}option redispatch 1",
        f"{_INDENT}retries {DEFAULT_RETRIES}",
        f"{_INDENT}maxconn {proxy.max_connections}",
        f"{_INDENT}timeout connect {duration(proxy.connect_timeout)}",
        f"{_INDENT}timeout client {duration(proxy.client_timeout)}",
        f"{_INDENT}timeout server {duration(proxy.server_timeout)}",
        f"{_INDENT}timeout http-request {HTTP_REQUEST_TIMEOUT}",
        f"{_INDENT}timeout http-keep-alive {duration(proxy.client_timeout)}",
        f"{_INDENT}timeout tunnel {TUNNEL_TIMEOUT}",
    ]
    if errors_dir is not None:
        base = errors_dir.rstrip("/")
        lines += [f"{_INDENT}errorfile {code} {_word(f'{base}/{code}.http')}" for code in ERROR_CODES]
    return [*lines, ""]


def _metrics(address: str) -> list[str]:
    return [
        f"frontend {METRICS_FRONTEND}",
        f"{_INDENT}bind {_word(address)}",
        f"{_INDENT}http-request use-service prometheus-exporter if {{ path /metrics }}",
        f'{_INDENT}http-request return status 404 content-type text/plain string "not found\\n"',
        "",
    ]


# ---- frontends --------------------------------------------------------------------------------------------------


def _serves(f: HttpFrontend) -> bool:
    """Whether the frontend is written at all: an HTTPS listener with no certificate file cannot be."""
    return f.protocol is not model.ListenerProtocol.HTTPS or bool(f.certificates)


# A dot segment (`.` or `..`, also percent-encoded, also between encoded slashes): refused before routing, so
# `/public/../admin` can neither take a route meant for /public nor reach a server that would resolve it.
DOT_SEGMENT = r"(^|/|%2f)(\.|%2e){1,2}(/|%2f|$)"


def _frontend(f: HttpFrontend, trusted_proxies: tuple[model.IPNetwork, ...] = ()) -> list[str]:
    name = proxy_name(f.listener)
    if not _serves(f):
        return [f"# listener {_comment(f.listener)}: HTTPS without a usable certificate file, not served", ""]
    https = f.protocol is model.ListenerProtocol.HTTPS
    lines = [f"frontend {name}", f"{_INDENT}# listener {_comment(f.listener)}"]
    options = " transparent"  # binds a VIP before it is on an interface (IP_TRANSPARENT, else IP_FREEBIND)
    if f.accept_proxy:
        options += " accept-proxy"
    if https:
        options += " ssl" + "".join(f" crt {_word(c)}" for c in f.certificates) + " alpn h2,http/1.1"
    lines += [f"{_INDENT}bind {model.Endpoint(vip, f.port)}{options}" for vip in f.vips]
    # the request's host, as routes match it: without a port, lowercase (IPv6 literals keep their brackets)
    lines.append(f"{_INDENT}http-request set-var(txn.host) req.hdr(host),host_only,lower")
    if https:
        # a request for another host than the TLS server name it came by (a browser reusing a connection for a
        # name the certificate also covers): 421, and the client opens a connection for that name (RFC 9110).
        # An address as server name is no name (RFC 6066 forbids it; OpenSSL-based clients such as wrk and
        # `openssl s_client` send one when given an address): such a connection is taken as one without SNI.
        lines.append(f"{_INDENT}http-request return status 421 content-type text/plain string "
                     f"{_word('misdirected request: the Host is not the TLS server name')} "
                     "if { ssl_fc_sni -m found } !{ ssl_fc_sni,lower,strcmp(txn.host) eq 0 } "
                     f"!{{ ssl_fc_sni -m reg {SNI_ADDRESS} }}")
        if f.hsts is not None:
            lines.append(f"{_INDENT}http-after-response set-header Strict-Transport-Security {_word(f.hsts)}")
    if f.redirect_to_https is not None:
        port = "" if f.redirect_to_https == 443 else f":{f.redirect_to_https}"
        lines.append(f"{_INDENT}http-request redirect location {_fmt(f'https://%[var(txn.host)]{port}%[pathq]')}"
                     " code 301")
        return [*lines, ""]
    lines.append(f"{_INDENT}http-request deny deny_status 400 if {{ path -m reg -i {_word(DOT_SEGMENT)} }}")
    # X-Forwarded-Host copies the Host header into the room HAProxy keeps for rewrites (see REWRITE_RESERVE)
    lines.append(f"{_INDENT}http-request deny deny_status 400 if {{ req.hdr(host),length gt {MAX_HOST_BYTES} }}")
    # The client's own X-Forwarded-For and X-Real-IP are not believed (option forwardfor then adds the address
    # HAProxy sees), unless it is a trusted proxy: then its X-Forwarded-For gets that address appended.
    trusted = kept_real_ip = ""
    if trusted_proxies:
        lines.append(f"{_INDENT}acl trusted_proxy src {' '.join(str(n) for n in trusted_proxies)}")
        trusted, kept_real_ip = " unless trusted_proxy", " { req.hdr(x-real-ip) -m found }"
    lines += [
        f"{_INDENT}http-request del-header X-Forwarded-For{trusted}",
        f"{_INDENT}http-request set-header X-Real-IP %[src]{trusted}{kept_real_ip}",
        f"{_INDENT}http-request set-header X-Forwarded-Proto {'https' if https else 'http'}",
        f"{_INDENT}http-request set-header X-Forwarded-Port {f.port}",
        f"{_INDENT}http-request del-header X-Forwarded-Host",
        f"{_INDENT}http-request set-header X-Forwarded-Host %[req.hdr(host)] if {{ req.hdr(host) -m found }}",
    ]
    for i, entry in enumerate(f.entries):
        lines += _route(i, entry)
    lines.append(f"{_INDENT}default_backend {proxy_name(f.default_backend or NOT_FOUND_BACKEND)}")
    return [*lines, ""]


def _route(i: int, entry: RouteEntry) -> list[str]:
    """A routing table line: its ACLs (lines of one name OR together, names AND together) and its use_backend."""
    acls: list[tuple[str, str]] = []
    if entry.hostname is not None:
        if entry.hostname.startswith("*."):
            acls.append((f"r{i}_host", f"var(txn.host) -m end -- {_word(entry.hostname[1:].lower())}"))
        else:
            acls.append((f"r{i}_host", f"var(txn.host) -m str -- {_word(entry.hostname.lower())}"))
    path = entry.match.path
    if path.type is model.PathMatchType.EXACT:
        acls.append((f"r{i}_path", f"path -m str -- {_word(path.value)}"))
    elif path.type is model.PathMatchType.REGULAR_EXPRESSION:
        acls.append((f"r{i}_path", f"path -m reg -- {_word(_regex(path.value))}"))
    elif prefix := _prefix(path.value):
        acls.append((f"r{i}_path", f"path -m str -- {_word(prefix)}"))
        acls.append((f"r{i}_path", f"path -m beg -- {_word(prefix + '/')}"))
    acls += _condition_acls(f"r{i}", entry.match)
    names = list(dict.fromkeys(name for name, _ in acls))
    condition = f" if {' '.join(names)}" if names else ""
    return [f"{_INDENT}# {_comment(entry.where)}"] + [f"{_INDENT}acl {name} {test}" for name, test in acls] + [
        f"{_INDENT}use_backend {proxy_name(entry.backend)}{condition}"]


def _condition_acls(stem: str, match: model.RouteMatch) -> list[tuple[str, str]]:
    """ACLs (name, test) for what a match tests besides the host and the path: method, headers, query."""
    acls: list[tuple[str, str]] = []
    if match.method is not None:
        acls.append((f"{stem}_method", f"method {_word(match.method)}"))
    for j, header in enumerate(match.headers):
        acls.append((f"{stem}_h{j}", _value_match(f"req.fhdr({header.name})", header)))
    for j, param in enumerate(match.query_params):
        acls.append((f"{stem}_q{j}", _value_match(f"url_param({param.name}),url_dec(1)", param)))
    return acls


def _value_match(fetch: str, match: model.ValueMatch) -> str:
    if match.type is model.ValueMatchType.REGULAR_EXPRESSION:
        return f"{_word(fetch)} -m reg -- {_word(_regex(match.value))}"
    if not match.value:
        return f"{_word(fetch)} -m len 0"  # present and empty
    return f"{_word(fetch)} -m str -- {_word(match.value)}"


# ---- backends ---------------------------------------------------------------------------------------------------


def _backend(b: HttpBackend) -> list[str]:
    lines = [f"backend {proxy_name(b.name)}", f"{_INDENT}# {_comment(b.where)}", f"{_INDENT}balance roundrobin"]
    lines += _timeouts(b.timeouts)
    if b.session_cookie is not None:  # each server's own name is its cookie value
        attrs = f" attr {_word(f'Max-Age={b.session_cookie.max_age}')}" if b.session_cookie.max_age else ""
        lines.append(f"{_INDENT}cookie {_word(b.session_cookie.name)} insert indirect nocache httponly{attrs}")
    if b.max_body_bytes is not None:  # the size a request declares: HAProxy 2.6 cannot count a chunked body
        lines.append(f"{_INDENT}http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt "
                     f"{b.max_body_bytes} }}")
    if b.source_ranges:  # the peer HAProxy sees (the client, or a trusted proxy in front)
        lines.append(f"{_INDENT}http-request deny deny_status 403 unless {{ src "
                     f"{' '.join(str(n) for n in b.source_ranges)} }}")
    if b.error_share > 0:  # the share of invalid backendRefs: 500, as the Gateway API says (not the others' share)
        chance = round(b.error_share * ERROR_SHARE_SCALE)
        condition = "" if b.error_share >= 1 else f" if {{ rand({ERROR_SHARE_SCALE}) lt {chance} }}"
        lines.append(f"{_INDENT}http-request return status 500 content-type text/plain string "
                     f"{_word(('invalid backendRef: ' + b.error_reason)[:200])}{condition}")
    if b.retry is not None:
        lines += _retry(b.retry)
    lines += _headers("http-request", b.request_headers)
    if b.rewrite is not None:
        if b.rewrite.hostname is not None:
            lines.append(f"{_INDENT}http-request set-header Host {_fmt(_text(b.rewrite.hostname))}")
        if b.rewrite.path is not None:
            lines += _rewrite_path(b.rewrite.path, b)
    if b.redirect is not None:
        lines += _redirect(b.redirect, b)
    # a redirect is HAProxy's own answer: only http-after-response rules see it
    lines += _headers("http-response" if b.redirect is None else "http-after-response", b.response_headers)
    for s in b.servers:
        lines += _server(s, cookie=b.session_cookie is not None)
    return [*lines, ""]


def _timeouts(t: AttemptTimeouts) -> list[str]:
    lines = []
    if t.budget is not None and t.connect is not None and t.server is not None:
        n, connect, answer = t.retries + 1, duration(t.connect), duration(t.server)
        lines.append(f"{_INDENT}# timeouts.request {duration(t.budget)}: " + (
            f"up to {n} attempts, each connect {connect} + answer {answer}" if t.response_retries
            else f"up to {n} connection attempts of {connect}, then answer {answer}"))
    if t.connect is not None:
        lines.append(f"{_INDENT}timeout connect {duration(t.connect)}")
    if t.server is not None:
        lines.append(f"{_INDENT}timeout server {duration(t.server)}")
    return lines


def _retry(retry: model.Retry) -> list[str]:
    bad = sorted(set(retry.codes) - _RETRY_CODES)
    if bad:
        raise ValueError(f"HAProxy cannot retry on status {', '.join(map(str, bad))}")
    if retry.attempts < 0:
        raise ValueError(f"retry attempts must not be negative (got {retry.attempts})")
    codes = "".join(f" {c}" for c in sorted(set(retry.codes)))
    return [f"{_INDENT}retries {retry.attempts}",
            f"{_INDENT}retry-on conn-failure empty-response response-timeout{codes}"]


def _headers(directive: str, modifier: model.HeaderModifier) -> list[str]:
    lines = [f"{_INDENT}{directive} set-header {_word(n)} {_fmt(_text(v))}" for n, v in modifier.set]
    lines += [f"{_INDENT}{directive} add-header {_word(n)} {_fmt(_text(v))}" for n, v in modifier.add]
    lines += [f"{_INDENT}{directive} del-header {_word(n)}" for n in modifier.remove]
    return lines


_CHOSEN = "var(txn.lb_prefix)"


@dataclass(frozen=True)
class _Choice:
    """One outcome of choosing a rule's prefix for a request: `prefix` ("" for `/`), whether the path is the prefix
    itself (None: either way), and the condition that says so."""

    prefix: str
    whole: bool | None
    condition: str


def _choose_prefix(b: HttpBackend, split: bool) -> tuple[list[str], list[_Choice]]:
    """Lines that note in txn.lb_prefix which of the rule's prefixes (longest first) the request came by: the
    longest the path is under, segment-wise, whose match's other conditions hold; before anything changes the path.
    And the choices. `split`: tell a path that is the prefix from one below it."""
    lines: list[str] = []
    choices: list[_Choice] = []
    conditions = dict(b.prefix_conditions)
    for k, raw in enumerate(b.prefixes):
        prefix = _prefix(raw)
        unset = f" !{{ {_CHOSEN} -m found }}" if k else ""
        if not prefix:  # `/`: every path, so nothing after it counts
            choices.append(_Choice("", None, unset.strip()))
            break
        tests = [(f"p{k}_eq", "str", prefix), (f"p{k}_sub", "beg", prefix + "/")] if split else [
            (f"p{k}", "str", prefix), (f"p{k}", "beg", prefix + "/")]
        lines += [f"{_INDENT}acl {name} path -m {how} -- {_word(value)}" for name, how, value in tests]
        # the prefix's matches that test more than the path: one of them must hold too (any, when none is given)
        alternatives = [_condition_acls(f"p{k}_m{j}", m) for j, m in enumerate(conditions.get(raw, ()))] or [[]]
        lines += [f"{_INDENT}acl {name} {test}" for acls in alternatives for name, test in acls]
        for name in dict.fromkeys(name for name, _, _ in tests):
            for acls in alternatives:
                also = "".join(f" {acl}" for acl, _ in acls)
                lines.append(f"{_INDENT}http-request set-var(txn.lb_prefix) str({name}) if {name}{also}{unset}")
            whole = None if not split else name.endswith("_eq")
            choices.append(_Choice(prefix, whole, f"{{ {_CHOSEN} -m str {name} }}"))
    return lines, choices


def _rewrite_path(modifier: model.PathModifier, b: HttpBackend) -> list[str]:
    if modifier.type is model.PathModifierType.REPLACE_FULL_PATH:
        return [f"{_INDENT}http-request set-path {_fmt(_text(modifier.value))}"]  # the query stays
    if modifier.type is model.PathModifierType.REGEX_REPLACE:
        # HAProxy replaces the whole path by the format when the pattern matches anywhere in it, \N being the
        # pattern's groups: nginx's `rewrite` (the query stays)
        assert modifier.pattern is not None
        return [f"{_INDENT}http-request replace-path {_word(modifier.pattern)} {_fmt(_text(modifier.value))}"]
    replacement = _prefix(modifier.value)
    lines, choices = _choose_prefix(b, split=not replacement)
    for c in choices:
        cond = f" if {c.condition}" if c.condition else ""
        rest = f"%[path,bytes({len(c.prefix)})]" if c.prefix else "%[path]"
        if replacement:
            lines.append(f"{_INDENT}http-request set-path {_fmt(_text(replacement) + rest)}{cond}")
        elif c.prefix:  # replaced by `/`: what follows the prefix, or `/` when nothing does
            lines.append(f"{_INDENT}http-request set-path {'/' if c.whole else _fmt(rest)}{cond}")
    return lines


def _origins(redirect: model.Redirect) -> list[tuple[str, str]]:
    """(scheme://host[:port], condition) for a redirect. The scheme is the request's when not given, the host the
    request's (without its port), the port the given one, else the scheme's own when the scheme is given, else
    the one the client connected to; a port is left out when it is the scheme's default."""
    host = _text(redirect.hostname) if redirect.hostname is not None else "%[var(txn.host)]"
    default = {"http": 80, "https": 443}
    schemes = [(redirect.scheme, "")] if redirect.scheme is not None else [("https", "{ ssl_fc }"), ("http", "")]
    out: list[tuple[str, str]] = []
    for scheme, condition in schemes:
        if redirect.scheme is not None and redirect.port is None:
            out.append((f"{_text(scheme)}://{host}", condition))
        elif redirect.port is not None:
            port = "" if default.get(scheme) == redirect.port else f":{redirect.port}"
            out.append((f"{_text(scheme)}://{host}{port}", condition))
        else:
            out.append((f"{scheme}://{host}", " ".join(filter(None, [condition, f"{{ dst_port {default[scheme]} }}"]))))
            out.append((f"{scheme}://{host}:%[dst_port]", condition))
    return out


def _redirect(redirect: model.Redirect, b: HttpBackend) -> list[str]:
    """`http-request redirect` lines, the first that applies answers. The query always stays."""
    code = redirect.status_code
    lines: list[str] = []
    paths: list[tuple[str, str]] = []  # (path and query as a log-format, condition)
    modifier = redirect.path
    if modifier is None:
        paths.append(("%[pathq]", ""))
    elif modifier.type is model.PathModifierType.REPLACE_FULL_PATH:
        paths.append((_text(modifier.value) + "%[pathq,regsub(^[^?]*,)]", ""))
    else:
        replacement = _text(_prefix(modifier.value))
        choice_lines, choices = _choose_prefix(b, split=not replacement)
        lines += choice_lines
        for c in choices:
            rest = f"%[pathq,bytes({len(c.prefix)})]" if c.prefix else "%[pathq]"
            paths.append((("/" if c.whole and not replacement else replacement) + rest, c.condition))
        if not choices or choices[-1].prefix:  # no prefix matched (the rule's other matches): the path stays
            paths.append(("%[pathq]", ""))
    for origin, origin_condition in _origins(redirect):
        for path, path_condition in paths:
            condition = " ".join(filter(None, [origin_condition, path_condition]))
            lines.append(f"{_INDENT}http-request redirect location {_fmt(origin + path)} code {code}"
                         + (f" if {condition}" if condition else ""))
    return lines


def _server(s: Server, cookie: bool = False) -> list[str]:
    weight = 0 if s.state is ServerState.DRAIN else s.weight
    if not 0 <= weight <= 256:
        raise ValueError(f"server {s.name}: weight {weight} is out of HAProxy's 0..256")
    line = f"{_INDENT}server {proxy_name(s.name)} {model.Endpoint(s.address, s.port)} weight {weight}"
    if s.state is ServerState.MAINT:
        line += " disabled"
    if s.proxy_protocol:
        line += " send-proxy-v2"
    if s.tls:  # ingress-nginx's backend-protocol HTTPS: encrypted, the server's certificate not verified
        line += " ssl verify none"
    if cookie:
        line += f" cookie {proxy_name(s.name)}"
    return ([f"{_INDENT}# {_comment(s.source)}"] if s.source else []) + [line]
