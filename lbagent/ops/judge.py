"""The real tools judge what `run` would write: every artifact of a config is rendered (lbagent.ops.artifacts) into a
private temporary directory and handed to the program that reads it at run time, in its checking mode: `nft -c`,
`iptables-restore --test`, `haproxy -c`, `exabgp validate`. `lbagent check` and the fuzz test use this, so what
check accepts is what the tools accept.

A tool that is not installed, or cannot check here (nft and iptables need CAP_NET_ADMIN even to check), gives
"not checked": said, never an error. A refusal carries the tool's words and, where the artifact line it points at
can be traced, the config fields that line comes from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from lbagent import model, tls
from lbagent.files import write_private
from lbagent.l3 import render as exabgp
from lbagent.l3 import speaker
from lbagent.l4.iptables import apply as apply_iptables
from lbagent.l7 import process as haproxy_process
from lbagent.l7.runtime import ProxyError, haproxy_words
from lbagent.ops import artifacts

TIMEOUT = 60.0  # seconds one tool may take
MAX_DETAIL_LINES = 12
_CAP_NET_ADMIN = 12


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    NOT_CHECKED = "not checked"


@dataclass(frozen=True)
class Verdict:
    judge: str  # the command, as an operator would type it: "nft -c -f lbagent.nft"
    outcome: Outcome
    detail: tuple[str, ...] = ()  # refused: the tool's words; not checked: why
    artifact_line: str | None = None  # refused: the artifact's line the tool points at ("haproxy.cfg:57: ...")
    origins: tuple[str, ...] = ()  # refused: the config fields that line comes from ("listeners[1]")


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set (what nft and iptables need to check)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def judge(m: model.Model) -> list[Verdict]:
    """Render what `run` would write for `m` and let each real tool judge its part. Raises ValueError when lbagent's
    own renderers refuse the model (then check accepted something run cannot write)."""
    with tempfile.TemporaryDirectory(prefix="lbagent-check-") as tmp:  # 0700: certificates and keys go in it
        work = Path(tmp)
        doc = artifacts.plan_document(m, _combined_certificates(m, work / "certs"))
        return list(_judge_all(m, doc, work))


def _combined_certificates(m: model.Model, directory: Path) -> dict[str, tuple[str, ...]]:
    """The combined PEM files as `run` writes them (CertificateStore), here in `directory`; one that cannot be
    made is left out, as `run` leaves it out."""
    directory.mkdir(mode=0o700)
    out: dict[str, tuple[str, ...]] = {}
    for listener, paths in artifacts.certificate_paths(m, str(directory)).items():
        sources = next(lst for lst in m.listeners if lst.name == listener).certificates
        made = []
        for path, cert in zip(paths, sources, strict=True):
            try:
                write_private(path, tls.combined_pem(cert.cert_file, cert.key_file))
            except (tls.TlsError, OSError):
                continue
            made.append(path)
        if made:
            out[listener] = tuple(made)
    return out


def _judge_all(m: model.Model, doc: dict[str, object], work: Path) -> Iterator[Verdict]:
    if isinstance(doc["nftables"], str):
        yield _nft(work, "lbagent.nft", doc["nftables"], m)
    if isinstance(doc["nftablesDsr"], dict):
        yield _dsr(work, doc["nftablesDsr"], m)
    if isinstance(doc["iptables"], dict):
        for family, text in doc["iptables"].items():
            yield _iptables(work, family, str(text), m)
    if isinstance(doc["ipvs"], dict):
        yield _nft(work, "lbagent-ipvs.nft", str(doc["ipvs"]["nftables"]), m)
        yield Verdict(f"ipvs ({doc['ipvs']['services']} services)", Outcome.NOT_CHECKED,
                      ("no tool checks IPVS services without creating them",))
    if isinstance(doc["haproxy"], str):
        yield _haproxy(work, doc["haproxy"], m)
    yield _exabgp(work, str(doc["exabgp"]), m)


# ---- running one tool ------------------------------------------------------------------------------------------


def _run(argv: list[str], work: Path, stdin: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str] | str:
    """The finished tool, or why it could not be run."""
    try:
        with open(stdin, "rb") if stdin is not None else open(os.devnull, "rb") as source:
            return subprocess.run(argv, stdin=source, capture_output=True, text=True, errors="replace", check=False,
                                  timeout=TIMEOUT, cwd=work, env=env)
    except FileNotFoundError:
        return f"{argv[0]} is not installed"
    except PermissionError as exc:
        return f"cannot run {argv[0]}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not finish within {TIMEOUT:g} s"


def _words(output: str, work: Path) -> list[str]:
    """The tool's output lines, with the temporary directory taken out of paths."""
    text = output.replace(f"{work}/", "")
    lines = [_short(line.rstrip(), 240, strip=False) for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_DETAIL_LINES:
        lines = [*lines[:MAX_DETAIL_LINES], f"... ({len(lines) - MAX_DETAIL_LINES} more lines)"]
    return lines


def _line(text: str, number: int | None) -> str | None:
    lines = text.splitlines()
    if number is None or not 0 < number <= len(lines):
        return None
    return lines[number - 1]


def _short(line: str, limit: int = 160, strip: bool = True) -> str:
    line = line.strip() if strip else line
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _found_line(pattern: str, output: str) -> int | None:
    found = re.findall(pattern, output)
    return int(found[-1]) if found else None


# ---- the judges ------------------------------------------------------------------------------------------------

_NOT_PERMITTED = re.compile(r"Operation not permitted|Permission denied \(you must be root\)")


def _nft(work: Path, name: str, script: str, m: model.Model) -> Verdict:
    what = f"nft -c -f {name}"
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(nft):
        return Verdict(what, Outcome.NOT_CHECKED, ("nft is not installed (Debian package nftables)",))
    if not has_net_admin():
        return Verdict(what, Outcome.NOT_CHECKED, ("nft needs CAP_NET_ADMIN even to check: run check as root",))
    (work / name).write_text(script)
    done = _run([nft, "-c", "-f", name], work)
    return _ruleset_verdict(what, done, work, name, script, rf"{re.escape(name)}:(\d+):", m)


def _dsr(work: Path, dsr: dict[str, Any], m: model.Model) -> Verdict:
    """The dsr netdev table as `run` would write it on this host; not checked where it cannot be made here."""
    name = "lbagent-dsr.nft"
    why = []
    if dsr["missingInterfaces"]:
        why.append(f"dataplane.dsrInterfaces {', '.join(dsr['missingInterfaces'])}: not on this host (run check on "
                   "the LB node; run logs dsr_interface_missing and NATs that traffic)")
    if dsr["notOnLink"]:
        why.append("not on-link from this host, left out of dsr frontends: "
                   + ", ".join(f"{node} {address}" for node, address in dsr["notOnLink"].items()))
    if not dsr["text"]:
        return Verdict(f"nft -c -f {name}", Outcome.NOT_CHECKED, tuple(why) or ("nothing to write",))
    verdict = _nft(work, name, str(dsr["text"]), m)
    return replace(verdict, detail=(*verdict.detail, *why)) if why else verdict


def _iptables(work: Path, family: str, text: str, m: model.Model) -> Verdict:
    number_of = 4 if family == "ipv4" else 6
    restore = apply_iptables.tool(number_of, m.dataplane.iptables_variant, "restore")
    name = f"iptables-{family}.rules"
    what = f"{os.path.basename(restore)} --test --noflush < {name}"
    if not os.path.exists(restore):
        return Verdict(what, Outcome.NOT_CHECKED, (f"{os.path.basename(restore)} is not installed (Debian package "
                                                  f"iptables)",))
    if not has_net_admin():
        return Verdict(what, Outcome.NOT_CHECKED, ("iptables-restore needs CAP_NET_ADMIN even to test: "
                                                  "run check as root",))
    (work / name).write_text(text)
    done = _run([restore, "--test", "--noflush"], work, stdin=work / name)
    return _ruleset_verdict(what, done, work, name, text, r"\bline:? (\d+)", m)


def _ruleset_verdict(what: str, done: subprocess.CompletedProcess[str] | str, work: Path, name: str, text: str,
                     line_pattern: str, m: model.Model) -> Verdict:
    """A ruleset tool's answer: refused with the line of `name` it names (traced to the config's services by
    address), or not checked when it could not judge (no permission, no answer)."""
    if isinstance(done, str):
        return Verdict(what, Outcome.NOT_CHECKED, (done,))
    if done.returncode == 0:
        return Verdict(what, Outcome.ACCEPTED)
    output = done.stdout + done.stderr
    if _NOT_PERMITTED.search(output):
        return Verdict(what, Outcome.NOT_CHECKED, tuple(_words(output, work)))
    number = _found_line(line_pattern, output)
    line = _line(text, number)
    return Verdict(what, Outcome.REFUSED, tuple(_words(output, work)),
                   f"{name}:{number}: {_short(line)}" if line is not None else None,
                   _by_address(m, line) if line is not None else ())


def _haproxy(work: Path, config: str, m: model.Model) -> Verdict:
    what = "haproxy -c -f haproxy.cfg"
    try:
        executable = haproxy_process.resolve(m.proxy.haproxy)
    except ProxyError as exc:
        return Verdict(what, Outcome.NOT_CHECKED, (str(exc),))
    (work / "haproxy.cfg").write_text(config)
    done = _run([executable, "-c", "-f", "haproxy.cfg"], work)
    if isinstance(done, str):
        return Verdict(what, Outcome.NOT_CHECKED, (done,))
    if done.returncode == 0:
        return Verdict(what, Outcome.ACCEPTED)
    output = done.stdout + done.stderr
    alerts = [line for line in output.splitlines() if "[ALERT]" in line] or output.splitlines()
    number = _found_line(r"\[haproxy\.cfg:(\d+)\]", output)
    line = _line(config, number)
    return Verdict(what, Outcome.REFUSED, tuple(_words(haproxy_words(alerts).replace(" | ", "\n"),
                                                       work)),
                   f"haproxy.cfg:{number}: {_short(line)}" if line is not None else None,
                   _haproxy_origins(m, config, number) if number is not None else ())


def _exabgp(work: Path, config: str, m: model.Model) -> Verdict:
    what = "exabgp validate exabgp.conf"
    try:
        executable = speaker.resolve(m.bgp.exabgp)
    except FileNotFoundError as exc:
        return Verdict(what, Outcome.NOT_CHECKED, (str(exc),))
    (work / "exabgp.conf").write_text(config)
    (work / exabgp.ENV_FILE).write_text("# written by lbagent check\n")
    # The environment `run` gives ExaBGP (its own settings file, here in the temporary directory).
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
    env.update(exabgp.environment(str(work)))
    done = _run([executable, "validate", "--neighbor", "exabgp.conf"], work, env=env)
    if isinstance(done, str):
        return Verdict(what, Outcome.NOT_CHECKED, (done,))
    if done.returncode == 0:
        return Verdict(what, Outcome.ACCEPTED)
    output = done.stdout + done.stderr
    detail = [line for line in output.splitlines() if not line.startswith("configuration ")]
    # ExaBGP quotes the line it refuses (`line 10: hold-time 2 ;`) but counts lines its own way: find it by text.
    quoted = re.findall(r"^line \d+: (.*?)\s*;?\s*$", output, re.MULTILINE)
    number = _exabgp_line(config, quoted[-1]) if quoted else None
    line = _line(config, number)
    return Verdict(what, Outcome.REFUSED, tuple(_words("\n".join(detail), work)),
                   f"exabgp.conf:{number}: {_short(line)}" if line is not None else None,
                   _exabgp_origins(m, config, number) if number is not None else ())


def _exabgp_line(config: str, quoted: str) -> int | None:
    want = " ".join(quoted.replace(";", " ").split())
    for i, line in enumerate(config.splitlines(), 1):
        if want and " ".join(line.replace(";", " ").split()) == want:
            return i
    return None


# ---- from an artifact's line back to the config ---------------------------------------------------------------

_ADDRESS = re.compile(r"[0-9a-fA-F:.]*[:.][0-9a-fA-F:.]+")


def _by_address(m: model.Model, line: str) -> tuple[str, ...]:
    """The services, listeners and nodes whose addresses the line names (a data plane rule has no other trace)."""
    named = set()
    for word in _ADDRESS.findall(line):
        try:
            named.add(ip_address(word.strip(".:")))
        except ValueError:
            continue
    out: list[str] = []
    for i, svc in enumerate(m.services):
        if named & set(svc.vips):
            out.append(f"services[{i}]")
    for i, lst in enumerate(m.listeners):
        if named & set(lst.vips):
            out.append(f"listeners[{i}]")
    for i, node in enumerate(m.nodes):
        if named & set(node.addresses):
            out.append(f"nodes[{i}]")
    return tuple(out[:5])


_CONFIG_PATH = re.compile(r"^\s*# ((?:routes|listeners|backends)\[\d+\][\w\[\].]*)\s*$")
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen)\b\s*(\S*)")


def _haproxy_origins(m: model.Model, config: str, number: int) -> tuple[str, ...]:
    """The nearest config path haproxy.cfg names in a comment above the line, within its section; else the section:
    a frontend is a listener, global and defaults are the `proxy` settings."""
    lines = config.splitlines()[:number]
    for text in reversed(lines):
        if (found := _CONFIG_PATH.match(text)) is not None:
            return (found[1],)
        if (section := _SECTION.match(text)) is not None:
            kind, name = section[1], section[2]
            if kind == "frontend":
                index = next((i for i, lst in enumerate(m.listeners) if lst.name == name), None)
                return (f"listeners[{index}]",) if index is not None else ("proxy",)
            return ("proxy",)
    return ()


def _exabgp_origins(m: model.Model, config: str, number: int) -> tuple[str, ...]:
    for text in reversed(config.splitlines()[:number]):
        if (found := re.match(r"^neighbor (\S+) \{", text)) is not None:
            index = next((i for i, p in enumerate(m.bgp.peers) if str(p.address) == found[1]), None)
            return (f"bgp.peers[{index}]",) if index is not None else ("bgp",)
        if text.startswith("process "):
            return ("agent.runtimeDir",)
    return ("bgp",)


def where(origins: tuple[str, ...], line_of: Callable[[str], int | None]) -> str:
    """`listeners[1] (line 40)`, for the origins of a refusal."""
    return ", ".join(f"{o} (line {n})" if (n := line_of(o)) is not None else o for o in origins)
