"""Send crafted TCP SYNs out of an interface to one MAC (run in the lab's router): JSON on stdin."""

from __future__ import annotations

import json
import sys

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.sendrecv import sendp


def main() -> int:
    """stdin: {"mac": "02:00:...", "iface": "uplink", "vip": "192.0.2.10", "port": 80, "flows": [[src, sport], ...]}"""
    doc = json.load(sys.stdin)
    packets: list[Packet] = [
        Ether(dst=doc["mac"]) / IP(src=src, dst=doc["vip"]) / TCP(sport=int(sport), dport=int(doc["port"]),
                                                                   flags="S", seq=1000 + i)
        for i, (src, sport) in enumerate(doc["flows"])
    ]
    sendp(packets, iface=doc["iface"], verbose=False)
    print(len(packets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
