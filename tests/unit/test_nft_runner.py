"""lbagent.l4.nft against the real kernel, in a network namespace the test makes: small scripts go through the
in-process libnftables context, whole tables through an `nft` process, and a refused script names its line and
leaves the table as it was, whichever way it went."""

from __future__ import annotations

import socket

from lbagent.l4 import nft
from lbagent.l4.drift import NETLINK_NETFILTER
from tests.netns import run_python, throwaway_netns

# Inside the snippets: `started` records each nft process lbagent.l4.nft runs (its script's length).
COUNT_NFT_PROCESSES = r"""
started = []
real_run_nft = nft.run_nft
async def counting_run_nft(args, script=None):
    started.append(len(script or ""))
    return await real_run_nft(args, script)
nft.run_nft = counting_run_nft
"""

STEP = r"""
import asyncio, json, subprocess
from lbagent.l4 import nft
from lbagent.l4.drift import NETLINK_NETFILTER

""" + COUNT_NFT_PROCESSES + r"""
def elements():
    out = subprocess.run(["nft", "-j", "list", "set", "inet", "t", "s"], capture_output=True, text=True, check=True)
    return sorted(e for x in json.loads(out.stdout)["nftables"] if "set" in x for e in x["set"].get("elem", []))

async def main():
    result = {}
    await nft.apply_script("table inet t {\n set s { type ipv4_addr; }\n}\n")
    await nft.apply_script("add element inet t s { 192.0.2.1 }\n")
    result["small"] = {"processes": list(started), "elements": elements()}
    try:
        await nft.apply_script("add element inet t s { 192.0.2.2 }\nadd element inet t nosuchset { 192.0.2.3 }\n")
    except nft.NftError as exc:
        result["refused"] = str(exc)
    result["after_refusal"] = elements()
    many = ", ".join(f"198.51.100.{i % 250 + 1}" for i in range(nft.IN_PROCESS_LIMIT // 10))
    big = "add element inet t s { " + many + " }\n"
    await nft.apply_script(big)
    result["big"] = {"processes": list(started), "count": len(elements())}
    print(json.dumps(result))

asyncio.run(main())
"""


def test_small_scripts_run_in_process_large_ones_in_nft_and_refusals_change_nothing() -> None:
    with throwaway_netns("nftrun") as (name,):
        result = run_python(name, STEP)
    assert result["small"] == {"processes": [], "elements": ["192.0.2.1"]}  # no nft process for a small script
    # the message names the line it refused and what in it
    assert ":2:" in result["refused"] and "nosuchset" in result["refused"], result["refused"]
    assert result["after_refusal"] == ["192.0.2.1"]  # all or nothing: 192.0.2.2 did not go in either
    assert len(result["big"]["processes"]) == 1 and result["big"]["processes"][0] > 256 * 1024
    assert result["big"]["count"] == 251


def test_only_an_unbound_netfilter_socket_is_taken_for_the_contexts() -> None:
    """Finding libnftables' socket binds nothing else: a routing socket another thread has just opened (pyroute2's)
    must stay unbound for its owner to bind."""
    with (socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as route,
          socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as netfilter):
        assert nft._bind_netfilter(route.fileno()) == 0
        assert route.getsockname()[0] == 0
        port = nft._bind_netfilter(netfilter.fileno())
        assert port != 0 and netfilter.getsockname()[0] == port


BUSY = r"""
import sys, asyncio, json, resource, socket, subprocess
from lbagent.l4 import nft

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
early = sys.argv[1] == "early"
if early:
    nft.prepare()
held = [socket.socket() for _ in range(1100)]  # a busy agent: a probe connection each
""" + COUNT_NFT_PROCESSES + r"""
asyncio.run(nft.apply_script("table inet t {\n  set s {\n    type ipv4_addr; elements = { 192.0.2.1 }\n  }\n}\n"))
out = subprocess.run(["nft", "-j", "list", "set", "inet", "t", "s"], capture_output=True, text=True, check=True)
print(json.dumps({"processes": len(started), "in_process": nft._library() is not None,
                  "listed": "192.0.2.1" in out.stdout}))
"""


def test_a_busy_agent_never_hands_libnftables_a_descriptor_select_cannot_take() -> None:
    """libnftables waits with select(): from descriptor 1024 up, glibc aborts the process. A context made early
    keeps a low descriptor and serves a busy agent in process; one that would be made late is not made (an nft
    process applies the script), and nothing aborts."""
    with throwaway_netns("nftbusy") as (name,):
        assert run_python(name, BUSY, "early") == {"processes": 0, "in_process": True, "listed": True}
        assert run_python(name, BUSY, "late") == {"processes": 1, "in_process": False, "listed": True}
