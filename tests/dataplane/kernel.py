"""Kernel-side test helpers: throwaway network namespaces, a forwarder in one, conntrack and iptables listings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lbagent import model
from lbagent.plan.services import Frontend
from tests import programs
from tests.dataplane.frontends import to_dict

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
TOOLS = ("ip", "conntrack", "nft", "iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore",
         "ip6tables-legacy-restore", "iptables-nft-save", "iptables-legacy-save")


def require_root_and_tools(tools: Iterable[str] = TOOLS) -> None:
    """Fail (never skip) when the kernel tests cannot run: they are part of `make test`, which runs as root."""
    problems = [] if os.geteuid() == 0 else ["needs root (network namespaces): run as root, as `make test` does"]
    problems += programs.missing(tools)
    if problems:
        raise RuntimeError("; ".join(problems))


class Netns:
    """A throwaway network namespace with `lo` up; deleted (with whatever runs in it) on exit."""

    def __init__(self, prefix: str = "dpt") -> None:
        self.name = f"{prefix}{secrets.token_hex(3)}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.exec(["ip", "link", "set", "lo", "up"])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for pid in subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True,
                                  check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def exec(self, argv: Sequence[str], stdin: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            command = " ".join(argv)
            raise RuntimeError(f"{command[:300]} in {self.name} exited {proc.returncode}: {proc.stderr.strip()}\n"
                               f"{(stdin or '')[:3000]}")
        return proc


class ForwarderError(RuntimeError):
    """The forwarder in the namespace answered with an error (or died)."""


class ForwarderProcess:
    """`tests.dataplane.apply` running in a namespace: one forwarder object for the life of the process."""

    def __init__(self, netns: str, kind: str, size: int | None = None, timeout: float = 60) -> None:
        self.netns, self.kind, self.timeout = netns, kind, timeout
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the process
        argv = ["ip", "netns", "exec", netns, PYTHON, "-m", "tests.dataplane.apply", "--kind", kind]
        if size is not None:
            argv += ["--size", str(size)]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1)

    def request(self, request: dict[str, Any], check: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise ForwarderError(f"{self.kind} forwarder in {self.netns} is gone: {self._errors()}") from exc
        deadline = time.monotonic() + self.timeout
        while not select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                raise ForwarderError(f"{self.kind} forwarder in {self.netns}: no answer in {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise ForwarderError(f"{self.kind} forwarder in {self.netns} exited: {self._errors()}")
        answer: dict[str, Any] = json.loads(line)
        if check and not answer.get("ok"):
            raise ForwarderError(f"{self.kind} forwarder in {self.netns}: {answer.get('error')}")
        return answer

    def apply(self, frontends: Sequence[Frontend], vips: Iterable[model.IPAddress], force: bool = False,
              changed: Iterable[str] | None = None) -> dict[str, Any]:
        return self.request({"op": "apply", "frontends": [to_dict(f) for f in frontends],
                             "vips": [str(v) for v in vips], "force": force,
                             "changed": None if changed is None else list(changed)})

    def cleanup(self) -> None:
        self.request({"op": "cleanup"})

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def _errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-3000:]


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: the original direction, and where the reply comes from (the DNAT target)."""

    protocol: str
    source: str
    destination: str
    source_port: int
    destination_port: int
    reply_source: str
    reply_source_port: int
    mark: int


_FLOW = re.compile(
    r"^(tcp|udp)\s+\d+\s+\d+\s+(?:[A-Z_]+\s+)?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) (?:\[\w+\] )?"
    r"src=(\S+) dst=\S+ sport=(\d+) dport=\d+ .*?mark=(\d+)"
)


def parse_conntrack(text: str) -> list[Flow]:
    flows = []
    for line in text.splitlines():
        m = _FLOW.match(line)
        if m:
            proto, src, dst, sport, dport, rsrc, rsport, mark = m.groups()
            flows.append(Flow(proto, str(ip_address(src)), str(ip_address(dst)), int(sport), int(dport),
                              str(ip_address(rsrc)), int(rsport), int(mark)))
    return flows


def iptables_listing(ns: Netns, family: int, variant: str) -> dict[str, dict[str, list[str]]]:
    """`iptables-save` of lbagent's chains and of the built-in chains: table -> chain -> rules, chain order
    ignored (it differs between a fresh apply and one grown by deltas), rule order kept."""
    tool = f"{'ip' if family == 4 else 'ip6'}tables-{variant}-save"
    out: dict[str, dict[str, list[str]]] = {}
    table = ""
    for line in ns.exec([tool]).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out[table] = {}
        elif line.startswith(":"):
            out[table].setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            out[table].setdefault(chain, []).append(rule)
    return out


def lbagent_chains(listing: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """Every LBAGENT chain and every rule mentioning one (the jumps), as `table chain` -> rules."""
    found: dict[str, list[str]] = {}
    for table, chains in listing.items():
        for chain, rules in chains.items():
            if chain.startswith("LBAGENT-"):
                found[f"{table} {chain}"] = rules
            elif any("LBAGENT-" in r for r in rules):
                found[f"{table} {chain}"] = [r for r in rules if "LBAGENT-" in r]
    return found
