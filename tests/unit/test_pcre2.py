"""lbagent.sources.file.pcre2: regular expressions checked by the PCRE2 library HAProxy is linked with, as HAProxy
compiles them.
(tests/unit/test_render_haproxy.py runs `haproxy -c` on what it accepts and refuses.)"""

from __future__ import annotations

import re
import subprocess

import pytest

from lbagent.l7 import render as haproxy
from lbagent.sources.file import pcre2

# Python's `re` takes these; PCRE2 (HAProxy) does not, or not once the pattern must match the whole value.
PYTHON_ONLY = [
    ("/\\u0041", "PCRE2 does not support \\F, \\L, \\l, \\N{name}, \\U, or \\u at offset 3"),
    ("/\\N{DIGIT ONE}", "PCRE2 does not support \\F, \\L, \\l, \\N{name}, \\U, or \\u at offset 3"),
    ("(?x)/a#", "missing closing parenthesis at offset 13 of '^(?:(?x)/a#)$', the whole-value match HAProxy is given"),
    ("/(a)\\1", "reference to non-existent subpattern at offset 5"),  # ACLs compile with PCRE2_NO_AUTO_CAPTURE
]


def test_the_library_loads() -> None:
    assert pcre2.available() is None  # and it is the one HAProxy loads: see test_render_haproxy.py


@pytest.mark.parametrize(("pattern", "message"), PYTHON_ONLY, ids=[p for p, _ in PYTHON_ONLY])
def test_what_python_takes_and_pcre2_refuses(pattern: str, message: str) -> None:
    re.compile(pattern)
    with pytest.raises(pcre2.Pcre2Error) as refused:
        pcre2.check(pattern)
    assert str(refused.value) == message


@pytest.mark.parametrize("pattern", ["/v[0-9]+", "/(?<v>[a-z]+)/\\k<v>", "/\\x{41}\\d{1,3}", "[[:alpha:]]+",
                                     'say "hi" \\d+\\\\ #\\$', "(?i)/CaSe", "a|b", "/\\p{Lu}"])
def test_what_pcre2_takes(pattern: str) -> None:
    pcre2.check(pattern)


def test_a_pattern_that_would_escape_its_whole_value_wrapper_is_refused() -> None:
    """`a)|(b` wrapped is `^(?:a)|(b)$`: it compiles, and matches anything that starts with an a."""
    with pytest.raises(pcre2.Pcre2Error, match="unmatched closing parenthesis at offset 1"):
        pcre2.check("a)|(b")
    assert pcre2.matches("a)|(b", "a, and then anything") > 0
    with pytest.raises(pcre2.Pcre2Error, match=r"missing closing parenthesis at offset 11 of '\^\(\?:\\\\Qabc\)\$'"):
        pcre2.check("\\Qabc")


def test_the_renderers_own_regexes() -> None:
    pcre2.check_raw(haproxy.DOT_SEGMENT, caseless=True)
    pcre2.check_raw("^[^?]*")  # the redirect's regsub()
    with pytest.raises(pcre2.Pcre2Error):
        pcre2.check_raw("^(?:a")


def test_matching_as_haproxy_does_with_pcre2s_default_limit() -> None:
    """HAProxy matches without a match context: PCRE2's default match limit ends a pathological match, which then
    counts as no match (the route is not taken). lbagent leaves that limit alone (docs/configuration.md)."""
    assert pcre2.matches("/v[0-9]+", "/v12") > 0
    assert pcre2.matches("/v[0-9]+", "/v12/x") == pcre2.ERROR_NOMATCH
    assert pcre2.matches("/(.*a){20}", "/" + "a" * 20) > 0
    assert pcre2.matches("/(.*a){20}", "/" + "a" * 50 + "b") == pcre2.ERROR_MATCHLIMIT


def test_debian_installs_the_library_with_grep_and_haproxy() -> None:
    """No row in deps/programs.txt: it is no program, and it comes with Debian's base (grep, Priority required,
    pre-depends on it) and with haproxy (which depends on it)."""
    def field(package: str, name: str) -> str:
        return subprocess.run(["dpkg-query", "-W", f"-f=${{{name}}}", package], capture_output=True, text=True,
                              check=True).stdout

    assert field("grep", "Priority") == "required"
    assert pcre2.PACKAGE in field("grep", "Pre-Depends")
    assert pcre2.PACKAGE in field("haproxy", "Depends")
