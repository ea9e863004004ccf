"""HTTP from the lab's client, as the lab tests measure it."""

from __future__ import annotations

import json
import sys

from tests.lab.lab import Lab

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
