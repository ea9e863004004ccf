"""HTTP from the lab's client, as the lab tests measure it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.lab.lab import Lab, address, wait_for

FLOWS = Path(__file__).resolve().with_name("flows.py")

_COUNTER = """
import http.client, json, sys
host, vip, n, extra, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
counts, failures = {}, 0
conn = http.client.HTTPConnection(vip, 80, timeout=5)
for _ in range(n):
    try:
        conn.request("GET", path, headers={"Host": host, **extra})
        r = conn.getresponse()
        body = r.read()
        port = str(json.loads(body)["port"]) if r.status == 200 else f"status {r.status}"
        counts[port] = counts.get(port, 0) + 1
    except Exception as exc:
        failures += 1
        conn.close()
        conn = http.client.HTTPConnection(vip, 80, timeout=5)
print(json.dumps({"counts": counts, "failures": failures}))
"""


def count_by_port(lab: Lab, host: str, vip: str, n: int, headers: dict[str, str] | None = None,
                  source: str = "client", path: str = "/") -> dict[str, int]:
    """n requests for `host` to vip:80 over one keep-alive connection from the lab host `source` (an LB reaches its
    own HAProxy); the answers by the port the backend served them on (which version, which Service), or by status
    when not 200. No request may fail."""
    out = lab.exec(source, [sys.executable, "-c", _COUNTER, host, vip, str(n), json.dumps(headers or {}), path],
                   timeout=120).stdout
    data = json.loads(out)
    assert data["failures"] == 0, data
    return {k: int(v) for k, v in data["counts"].items()}


class Flows:
    """tests/lab/flows.py run in the client's namespace: `count` long-lived connections to vip:80 from source
    ports base_port.., a request of `path_bytes` every 100 ms each; their latest results."""

    def __init__(self, lab: Lab, vip: str, count: int = 16, base_port: int = 41000, path_bytes: int = 4000) -> None:
        self.lab, self.vip, self.count, self.base_port = lab, vip, count, base_port
        self.dir = lab.state_dir / "client"
        self.ready, self.out = self.dir / "flows.ready", self.dir / "flows.json"
        for path in (self.ready, self.out):
            path.unlink(missing_ok=True)
        lab.spawn("client", "flows", [sys.executable, str(FLOWS), "--vip", vip, "--source", address("client"),
                                      "--count", str(count), "--base-port", str(base_port),
                                      "--path-bytes", str(path_bytes),
                                      "--ready", str(self.ready), "--out", str(self.out)])
        wait_for(lambda: self.ready.exists() and self.out.exists(), 30, message="the connections' first answers")

    def results(self) -> list[dict[str, Any]]:
        return list(json.loads(self.out.read_text()))

    def stop(self) -> list[dict[str, Any]]:
        self.lab.stop_process("client", "flows", signal.SIGTERM, timeout=60)
        return self.results()

    def answered_again(self, since: list[dict[str, Any]], answers: int) -> bool:
        """Every connection alive now has had `answers` more answers than in `since`."""
        return all(n["error"] is not None or n["requests"] >= s["requests"] + answers
                   for n, s in zip(self.results(), since, strict=True))


class RequestLoop:
    """Requests from the client to `url` (at a VIP), one new connection each, one at a time, in a thread until
    stopped: the answers, and when each failed request started."""

    def __init__(self, lab: Lab, url: str) -> None:
        self.lab, self.url = lab, url
        self.answers: list[dict[str, Any]] = []
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            answer = self.lab.request(self.url, timeout=2)
            if answer is None:
                self.failures.append(started)
            else:
                self.answers.append(answer)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# Every failed answer (status 400 or more, what wrk counts as non-2xx or 3xx) by status: how many, the first and
# last second (wall clock, to set beside the agents' logs) and the start of the first body (HAProxy's own error page
# or the backend's answer). Printed by done() as `failed <status> <count> <first> <last> <body>` lines.
_WRK_STATUSES = """
local threads = {}
failed = {}  -- by status: "<count> <first> <last> <body>" (wrk copies flat tables of strings between its states)
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status >= 400 then
    local key = tostring(status)
    local seen = failed[key]
    if seen == nil then
      local head = string.gsub(string.sub(body or "", 1, 60), "%s+", " ")
      failed[key] = string.format("1 %d %d %s", os.time(), os.time(), head)
    else
      local count, first, rest = string.match(seen, "^(%d+) (%d+) %d+ (.*)$")
      failed[key] = string.format("%d %s %d %s", tonumber(count) + 1, first, os.time(), rest)
    end
  end
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, seen in pairs(thread:get("failed")) do io.write("failed " .. status .. " " .. seen .. "\\n") end
  end
end
"""


def _failed_line(line: str) -> str:
    """`failed <status> <count> <first> <last> <body>` as `<count> x <status> at HH:MM:SS-HH:MM:SS (UTC): <body>`."""
    _, status, count, first, last, body = [*line.split(" ", 5), ""][:6]
    when = "-".join(time.strftime("%H:%M:%S", time.gmtime(int(t))) for t in (first, last))
    return f"{count} x {status} at {when} (UTC): {body.strip()}"


class Wrk:
    """wrk in the client against `url` over 8 connections, until stopped: it runs for as long as the changes a test
    makes under it take on a busy machine, and reports when stopped (SIGINT). A context manager, so that it never
    outlives a failed test. `failed` names the failed answers by status once stopped (when and what, to tell
    HAProxy's 503 for a backend with no server up from a backend's own error)."""

    def __init__(self, lab: Lab, url: str, host: str, close: bool = False) -> None:
        script = lab.state_dir / "client" / "wrk-statuses.lua"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(_WRK_STATUSES)
        argv = ["ip", "netns", "exec", lab.ns("client"), "wrk", "-t1", "-c8", "-d3600s", "--timeout", "5s",
                "-s", str(script), "-H", f"Host: {host}", *(["-H", "Connection: close"] if close else []), url]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.result: dict[str, int] | None = None
        self.failed: list[str] = []

    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> dict[str, int]:
        """Stop wrk and return its counts: requests, socket_errors (connect, read, write, timeout) and non_2xx."""
        if self.result is None:
            if self.running():
                self._proc.send_signal(signal.SIGINT)
            out, _ = self._proc.communicate(timeout=60)
            assert self._proc.returncode == 0, out
            errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            total = re.search(r"(\d+) requests in", out)
            assert total is not None, out
            self.result = {"requests": int(total.group(1)),
                           "socket_errors": sum(map(int, errors.groups())) if errors else 0,
                           "non_2xx": int(non2xx.group(1)) if non2xx else 0}
            self.failed = [_failed_line(line) for line in out.splitlines() if line.startswith("failed ")]
        return self.result

    def __enter__(self) -> Wrk:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.communicate()
