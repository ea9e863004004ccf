"""What HAProxy's configuration can hold, checked on the routes lbagent makes from API objects (the file's routes
are checked by its schema and lbagent check): every text a rule carries into haproxy.cfg, and every regular
expression as HAProxy's PCRE2 compiles it. A rule that fails is left out (the object says why, by Event or
condition); one bad object never keeps HAProxy from taking every other change."""

from __future__ import annotations

import re

from lbagent import model
from lbagent.sources.file import pcre2

_UNWRITABLE = re.compile(r"['\x00-\x1f\x7f]")  # HAProxy's config has no way to write these in a word
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&*+.^_`|~-]{1,256}$")  # an HTTP header name


def rule_problems(rule: model.RouteRule) -> list[str]:
    """Why HAProxy could not take the rule (empty: it can)."""
    texts: list[tuple[str, str]] = []
    names: list[tuple[str, str]] = []
    regexes: list[tuple[str, str, bool]] = []  # (where, pattern, capturing)
    for k, match in enumerate(rule.matches):
        texts.append((f"matches[{k}].path", match.path.value))
        if match.path.type is model.PathMatchType.REGULAR_EXPRESSION:
            regexes.append((f"matches[{k}].path", match.path.value, False))
        for kind, values in (("headers", match.headers), ("queryParams", match.query_params)):
            for n, vm in enumerate(values):
                texts += [(f"matches[{k}].{kind}[{n}]", vm.name), (f"matches[{k}].{kind}[{n}]", vm.value)]
                if kind == "headers":
                    names.append((f"matches[{k}].headers[{n}].name", vm.name))
                if vm.type is model.ValueMatchType.REGULAR_EXPRESSION:
                    regexes.append((f"matches[{k}].{kind}[{n}]", vm.value, False))
        if match.method is not None:
            texts.append((f"matches[{k}].method", match.method))
    for where, modifier in (("requestHeaderModifier", rule.request_headers),
                            ("responseHeaderModifier", rule.response_headers)):
        for name, text in (*modifier.set, *modifier.add):
            texts += [(where, name), (where, text)]
            names.append((where, name))
        for name in modifier.remove:
            names.append((where, name))
    for where, path in (("urlRewrite", rule.rewrite.path if rule.rewrite else None),
                        ("requestRedirect", rule.redirect.path if rule.redirect else None)):
        if path is not None:
            texts.append((where, path.value))
            if path.pattern is not None:
                texts.append((where, path.pattern))
                regexes.append((where, path.pattern, True))
    for where, host in (("urlRewrite.hostname", rule.rewrite.hostname if rule.rewrite else None),
                        ("requestRedirect.hostname", rule.redirect.hostname if rule.redirect else None)):
        if host is not None:
            texts.append((where, host))
    problems = [f"{where}: {value!r} holds a single quote or a control character, which HAProxy's configuration "
                "cannot hold" for where, value in texts if _UNWRITABLE.search(value)]
    problems += [f"{where}: {name!r} is not a header name" for where, name in names if not _TOKEN.match(name)]
    for where, pattern, capturing in regexes:
        if _UNWRITABLE.search(pattern):
            continue
        try:
            pcre2.check_capturing(pattern) if capturing else pcre2.check(pattern)
        except pcre2.Pcre2Error as exc:
            problems.append(f"{where}: invalid regular expression for HAProxy (PCRE2): {exc}")
        except OSError as exc:
            problems.append(f"{where}: cannot check this regular expression: {exc}")
    return problems
