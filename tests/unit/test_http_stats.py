"""HAProxy's `show stat` answer summed by the backendRef each server serves (lbagent_http_responses_total). The
answer below has the shape HAProxy 2.6 gives (a `# ` header line, CSV); the lab reads the real one."""

from __future__ import annotations

from lbagent.l7 import stats

SHOW_STAT = """# pxname,svname,qcur,qmax,scur,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,
ingress-http,FRONTEND,,,0,0,990,0,10,0,0,
default_kans.0_0,0_ep0,0,0,0,0,300,0,0,0,0,
default_kans.0_0,0_ep1,0,0,0,0,300,0,0,0,0,
default_kans.0_0,1_ep0,0,0,0,0,100,0,0,1,0,
default_kans.0_0,BACKEND,0,0,0,0,700,0,0,1,0,
default_other_0,0_node1,0,0,0,0,5,0,0,0,0,
"""


def test_responses_are_summed_by_the_service_each_server_serves() -> None:
    targets = {("default_kans.0_0", "0_ep0"): "default/svc-v1:9001",
               ("default_kans.0_0", "0_ep1"): "default/svc-v1:9001",
               ("default_kans.0_0", "1_ep0"): "default/svc-v2:9001"}
    counts = stats.responses_by_target(SHOW_STAT, targets)
    assert counts[("default/svc-v1:9001", "2xx")] == 600
    assert counts[("default/svc-v2:9001", "2xx")] == 100 and counts[("default/svc-v2:9001", "5xx")] == 1
    assert not any(target == "default_other_0" for target, _ in counts)  # servers lbagent does not know
