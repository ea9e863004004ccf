"""HTTP routing rules every source checks a model against and planning and rendering obey, so that what a source
accepts is what HAProxy serves. Pure: no I/O.

- Gateway API precedence: the order in which a listener's route matches are tried (ranked_entries), and the matches
  that can never match because an earlier one takes every request they would (unreachable: a source refuses them).
- HAProxy's limits on a rule: the room its header filters need within `tune.maxrewrite` (rewrite_growth), and the
  per-attempt timeouts that keep all of a request's attempts within its `timeouts.request` (attempt_timeouts).
- Regular expressions as haproxy.cfg holds them (whole_value): the file source checks them with HAProxy's PCRE2 in
  that form, the renderer writes them in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from lbagent import model

DEFAULT_RETRIES = 3  # HAProxy's retries of a rule without `retry`: connection failures only, each on another server


# HAProxy refuses (400) a request whose line and headers do not fit its buffer less `tune.maxrewrite` bytes, which
# stay free for what its rules add; a rule that finds no room fails the request with 500. The base reserve holds the
# frontend's own additions: X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and -Port, and X-Forwarded-Host, a copy
# of a Host header of at most MAX_HOST_BYTES (a longer one is refused with 400): at most 725 bytes as HAProxy stores
# them. A rule's filters need their own room on top (rewrite_growth).
REWRITE_RESERVE = 1024
MAX_HOST_BYTES = 512
HEADER_OVERHEAD = 8  # what HAProxy stores with each header besides its name and value (an HTX block's head)


def rewrite_growth(request_headers: model.HeaderModifier, response_headers: model.HeaderModifier,
                   rewrite: model.URLRewrite | None) -> int:
    """The most a rule's filters add to a request's or a response's headers as HAProxy stores them, in bytes."""
    def added(modifier: model.HeaderModifier) -> int:
        return sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in (*modifier.set, *modifier.add))

    request = added(request_headers)
    if rewrite is not None:
        request += len("Host") + len(rewrite.hostname) + HEADER_OVERHEAD if rewrite.hostname is not None else 0
        request += len(rewrite.path.value) if rewrite.path is not None else 0
    return max(request, added(response_headers))


@dataclass(frozen=True)
class AttemptTimeouts:
    """What bounds a rule's requests in HAProxy 2.6, which has no deadline for a whole request: each attempt's
    `timeout connect` and `timeout server` (None: the proxy's), chosen so that every attempt together stays within
    `budget` (the rule's `timeouts.request`; None: no such bound). HAProxy makes at most `retries` + 1 attempts:
    with `response_retries` (a rule's `retry`) any attempt may wait for an answer; without, only connection
    failures are tried again."""

    connect: float | None = None
    server: float | None = None
    retries: int = DEFAULT_RETRIES
    response_retries: bool = False
    budget: float | None = None

    def longest(self, proxy_connect: float) -> float:
        """The longest a request can take in HAProxy with these timeouts, from when it has the request to its
        answer's headers (or its own 503/504), in seconds (whole milliseconds, as HAProxy counts).

        A failed connection takes at most 2 * connect: its timeout, or a refusal within it followed by HAProxy's
        turn-around of min(connect, 1 s) before it tries the same server again (backend.c). An attempt that
        connects takes at most connect + server (the answer's headers; `timeout server` is the longest silence)."""
        connect = _ms(self.connect if self.connect is not None else proxy_connect)
        server = _ms(self.server) if self.server is not None else None
        if server is None:
            raise ValueError("no bound: the attempts use the proxy's own `timeout server`")
        full = connect + max(server, connect)
        # with response retries every attempt may be a full one; else all but the last are failed connections
        total = (self.retries + 1) * full if self.response_retries else self.retries * 2 * connect + full
        return total / 1000


def milliseconds(seconds: float, rounding: str = ROUND_CEILING) -> int:
    """A duration in HAProxy's resolution: whole milliseconds, rounded up (as timeouts are written) or `rounding`."""
    return int((Decimal(str(seconds)) * 1000).to_integral_value(rounding))


def _ms(seconds: float) -> int:
    return max(1, milliseconds(seconds))


def attempt_timeouts(request: float | None, backend_request: float | None, connect: float,
                     retry: model.Retry | None) -> AttemptTimeouts:
    """The timeouts of a rule's attempts. `request` (the whole request) is shared out so that the worst case of
    AttemptTimeouts.longest() stays within it; `backend_request` (one attempt) caps what an attempt waits for its
    answer; `connect` is the proxy's connect timeout, an attempt's connection never gets longer.

    With `retry`, each of the 1 + retries attempts gets an equal share, a quarter of it at most to connect. Without,
    only failed connections are retried: they get a quarter of the budget between them (2 * connect each, see
    longest()), the one attempt that connects the rest. ValueError when the budget is too small to share out."""
    retries = retry.attempts if retry is not None else DEFAULT_RETRIES
    if request is None:
        return AttemptTimeouts(None, backend_request, retries, retry is not None)
    budget = milliseconds(request, ROUND_FLOOR)
    if retry is not None:
        share = budget // (retries + 1)
        connect_ms = min(_ms(connect), share // 4)
        server_ms = share - connect_ms
    else:
        connect_ms = min(_ms(connect), budget // (4 * (2 * retries + 1)))
        server_ms = budget - (2 * retries + 1) * connect_ms
    if backend_request is not None:
        server_ms = min(server_ms, _ms(backend_request))
    if connect_ms < 1 or server_ms < 1:
        if retry is not None:
            raise ValueError(f"too short to share out over {retries + 1} attempts (the first and retry.attempts "
                             f"{retries}): give at least {4 * (retries + 1)} ms")
        raise ValueError(f"too short for up to {retries + 1} connection attempts (HAProxy tries a failed connection "
                         f"{retries} more times) and the answer: give at least {4 * (2 * retries + 1)} ms")
    out = AttemptTimeouts(connect_ms / 1000, server_ms / 1000, retries, retry is not None, request)
    assert out.longest(connect) <= budget / 1000
    return out


def whole_value(pattern: str) -> str:
    """The pattern as haproxy.cfg holds it: it must match the whole path, header or query value."""
    return f"^(?:{pattern})$"


# ---- Gateway API precedence ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteEntry:
    """One line of a listener's routing table: a hostname (None: any) and a match, to a backend."""

    backend: str
    hostname: str | None
    match: model.RouteMatch
    where: str  # the match's field path in the config file


def segments_prefix(prefix: str) -> str:
    """A PathPrefix value as it matches: whole segments, a trailing slash ignored ("/" stays "/")."""
    return prefix.rstrip("/") or "/"


def path_has_prefix(path: str, prefix: str) -> bool:
    """Gateway API PathPrefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, never `/foobar`."""
    p = segments_prefix(prefix)
    return p in ("/", path) or path.startswith(p + "/")


def _host_rank(hostname: str | None) -> tuple[int, int]:
    if hostname is None:
        return (2, 0)
    return (1 if hostname.startswith("*.") else 0, -len(hostname))


def _match_rank(match: model.RouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API precedence, most specific first: Exact path, then (our choice, documented) regular
    expressions, then the longest PathPrefix; then a method; then more headers; then more query params."""
    path = match.path
    kind = {model.PathMatchType.EXACT: 0, model.PathMatchType.REGULAR_EXPRESSION: 1,
            model.PathMatchType.PATH_PREFIX: 2}[path.type]
    length = len(segments_prefix(path.value)) if path.type is model.PathMatchType.PATH_PREFIX else len(path.value)
    if path.type is model.PathMatchType.PATH_PREFIX and segments_prefix(path.value) == "/":
        length = 0
    return (kind, -length, 0 if match.method else 1, -len(match.headers), -len(match.query_params))


_INVALID_NAME = re.compile(r"[^A-Za-z0-9_.:-]")


def proxy_name(name: str) -> str:
    """A frontend, backend or server name as HAProxy allows it (the config and the runtime API use the same)."""
    return _INVALID_NAME.sub("_", name) or "_"


def backend_name(route: model.Route, index: int) -> str:
    """The rule's HAProxy backend: a name HAProxy takes as it is, so the runtime API addresses it by the same."""
    return proxy_name(f"{route.namespace}_{route.name}_{index}")


def ranked_entries(m: model.Model, listener: model.Listener) -> list[tuple[tuple[object, ...], RouteEntry]]:
    """The listener's routing table with its sort keys (precedence, then config order)."""
    ranked: list[tuple[tuple[object, ...], RouteEntry]] = []
    for ri, route in enumerate(m.routes):
        if listener.name not in route.listeners:
            continue
        for k, rule in enumerate(route.rules):
            for mi, match in enumerate(rule.matches):
                for hostname in route.hostnames or (None,):
                    where = f"{rule.where}.matches[{mi}]"
                    ranked.append(((_host_rank(hostname), _match_rank(match), ri, k, mi),
                                   RouteEntry(backend_name(route, k), hostname, match, where)))
    ranked.sort(key=lambda item: item[0])
    return ranked


# ---- checks: rules that can never match ---------------------------------------------------------------------


def _host_covers(first: str | None, then: str | None) -> bool:
    if first is None:
        return True
    if then is None:
        return False
    if first.startswith("*."):
        return then.removeprefix("*.").endswith(first[1:]) or (then.startswith("*.") and then == first)
    return first == then


def _path_covers(first: model.PathMatch, then: model.PathMatch) -> bool:
    if first.type is model.PathMatchType.PATH_PREFIX:
        if then.type is model.PathMatchType.REGULAR_EXPRESSION:
            return segments_prefix(first.value) == "/"
        return path_has_prefix(segments_prefix(then.value), first.value)
    return first == then


def _conditions(values: tuple[model.ValueMatch, ...]) -> set[tuple[str, str, str]]:
    return {(v.name.lower(), v.value, v.type.value) for v in values}


def covers(first: RouteEntry, then: RouteEntry) -> bool:
    """Every request `then` matches, `first` matches too (so `then`, coming after, never gets one)."""
    a, b = first.match, then.match
    return (_host_covers(first.hostname, then.hostname) and _path_covers(a.path, b.path)
            and (a.method is None or a.method == b.method)
            and _conditions(a.headers) <= _conditions(b.headers)
            and _conditions(a.query_params) <= _conditions(b.query_params))


def _index_key(entry: RouteEntry) -> tuple[str | None, str, str]:
    """Where an entry is filed for unreachable(): its hostname and the path it can cover."""
    path = entry.match.path
    if path.type is model.PathMatchType.PATH_PREFIX:
        return entry.hostname, "prefix", segments_prefix(path.value)
    return entry.hostname, path.type.value, path.value


def _covering_keys(entry: RouteEntry) -> Iterator[tuple[str | None, str, str]]:
    """Every index key under which an entry that covers this one can be filed (what covers() can accept)."""
    hostnames: list[str | None] = [None]
    if entry.hostname is not None:
        hostnames.append(entry.hostname)
        labels = entry.hostname.removeprefix("*.").split(".")
        hostnames += ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
    path = entry.match.path
    if path.type is model.PathMatchType.REGULAR_EXPRESSION:
        prefixes = ["/"]
    else:
        segments = segments_prefix(path.value).split("/")
        prefixes = ["/"] + ["/".join(segments[:i]) for i in range(2, len(segments) + 1)]
    for hostname in hostnames:
        yield hostname, path.type.value, path.value
        for prefix in prefixes:
            yield hostname, "prefix", prefix


def unreachable(m: model.Model) -> list[tuple[str, str, str]]:
    """(where, listener, shadowed by where) for each route match that another always takes first.

    Each entry is compared only with the earlier ones filed under a key that could cover it (its hostname or a
    wildcard or none; its path, a prefix of it, or "/"), so a thousand routes take milliseconds, not minutes."""
    out: dict[str, tuple[str, str, str]] = {}
    for listener in m.listeners:
        if listener.redirect_to_https:
            continue
        index: dict[tuple[str | None, str, str], list[tuple[int, RouteEntry]]] = {}
        for position, (_, entry) in enumerate(ranked_entries(m, listener)):
            first: tuple[int, RouteEntry] | None = None
            for key in set(_covering_keys(entry)):
                for earlier_position, earlier in index.get(key, ()):
                    if first is not None and earlier_position > first[0]:
                        break
                    if earlier.where != entry.where and covers(earlier, entry):
                        first = (earlier_position, earlier)
                        break
            if first is not None:
                out.setdefault(entry.where, (entry.where, listener.name, first[1].where))
            index.setdefault(_index_key(entry), []).append((position, entry))
    return list(out.values())
