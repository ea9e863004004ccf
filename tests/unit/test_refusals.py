"""The refusal watcher (lbagent.l4.refusals): NFLOG messages read back, and the real kernel's log of a reset in a
network namespace the test makes."""

from __future__ import annotations

import struct
from ipaddress import ip_address

from lbagent.l4 import refusals
from lbagent.netlinkmsg import NLA_HDR, NLMSG_HDR
from tests.netns import run_python, throwaway_netns


def _message(payload: bytes, family: int = 2) -> bytes:
    attribute = NLA_HDR.pack(NLA_HDR.size + len(payload), refusals.NFULA_PAYLOAD) + payload
    attribute += b"\0" * (-len(attribute) % 4)
    body = struct.pack("=BBH", family, 0, 0) + attribute
    kind = (refusals.NFNL_SUBSYS_ULOG << 8) | refusals.NFULNL_MSG_PACKET
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, 0, 0, 0) + body


def test_the_source_of_logged_tcp_packets_is_read_from_both_families() -> None:
    four = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + bytes([203, 0, 113, 12]) + bytes([192, 0, 2, 10])
    four += struct.pack(">HH", 30080, 40000)
    six = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + ip_address("2001:db8:1::12").packed + ip_address("2001:db8::10").packed
    six += struct.pack(">HH", 30443, 40001)
    udp = bytearray(four)
    udp[9] = 17
    data = _message(four) + _message(six, 10) + _message(bytes(udp)) + _message(b"\x45")
    assert refusals.refusals(data) == [(ip_address("203.0.113.12"), 30080), (ip_address("2001:db8:1::12"), 30443)]


STEP = r"""
import asyncio, json, socket, subprocess
from lbagent.l4 import refusals

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["nft", "-f", "-"], check=True, text=True, input=
    "table inet t {\n chain out {\n  type filter hook output priority 0;\n"
    f"  tcp flags & rst == rst log group {refusals.REFUSED_LOG_GROUP}\n }}\n}}\n")

async def main():
    seen = []
    watcher = refusals.RefusalWatcher(lambda address, port: seen.append([str(address), port]))
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0)  # bound in open(), before the first await of run()
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family)
        try:
            s.connect((host, 9))  # nothing listens: the kernel answers with a reset
        except ConnectionRefusedError:
            pass
        finally:
            s.close()
    async with asyncio.timeout(10):
        while len(seen) < 2:
            await asyncio.sleep(0.01)
    task.cancel()
    print(json.dumps(seen))

asyncio.run(main())
"""


def test_a_reset_logged_by_nftables_reaches_the_watcher_at_once() -> None:
    with throwaway_netns("refused") as (name,):
        assert run_python(name, STEP, timeout=60) == [["127.0.0.1", 9], ["::1", 9]]
