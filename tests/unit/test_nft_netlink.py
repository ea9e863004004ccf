"""Element changes over netlink (lbagent.l4.nftables.netlink): what goes that way, and that the kernel's refusal of
any part refuses the whole transaction and is reported. That they leave the kernel as nft does: test_plan_render."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pyroute2.netlink.nfnetlink import nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg
from pyroute2.netns import popns, pushns

from lbagent.l4.nft import NftError
from lbagent.l4.nftables import netlink
from tests.netns import nft, throwaway_netns


def test_parse_reads_the_element_changes_the_renderer_writes_and_nothing_else() -> None:
    changes = netlink.parse(
        "delete element inet lbagent node_ports_v4 { 192.0.2.10 . tcp . 80 : 30080 }\n"
        "add element inet lbagent_shard2 dispatch_v6 { 2001:db8::10 . udp . 53 : goto mg6_ab_c, "
        "2001:db8::10 . tcp . 443 : goto mg6_cd }\n")
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
    assert changes == [
        netlink.ElementChange(False, "lbagent", "node_ports_v4",
                              ((bytes([192, 0, 2, 10, 6, 0, 0, 0, 0, 80, 0, 0]), 30080),)),
        netlink.ElementChange(True, "lbagent_shard2", "dispatch_v6",
                              ((v6 + bytes([17, 0, 0, 0, 0, 53, 0, 0]), "mg6_ab_c"),
                               (v6 + bytes([6, 0, 0, 0, 1, 187, 0, 0]), "mg6_cd"))),
    ]
    for other in ("add chain inet lbagent mg4_ab", "add rule inet lbagent mg4_ab meta l4proto tcp accept",
                  "add element inet lbagent ranged_v4 { 192.0.2.12 . tcp . 22 }",
                  "add element inet lbagent vips_v4 { 192.0.2.12 }",
                  "delete map inet lbagent mg4_ab", ""):
        script = "add element inet lbagent dispatch_v4 { 192.0.2.1 . tcp . 80 : goto c }\n" + other
        assert netlink.parse(script if other else "") is None, other
    many = ", ".join(f"192.0.2.{i % 250 + 1} . tcp . {1000 + i} : goto c" for i in range(3000))
    assert netlink.parse(f"add element inet lbagent dispatch_v4 {{ {many} }}\n") is None  # a whole table's worth


def _pyroute2(change: netlink.ElementChange, seq: int) -> bytes:
    """The same message by pyroute2's definitions of nf_tables' messages."""
    msg = nft_set_elem_list_msg()
    msg["nfgen_family"] = netlink.NFPROTO_INET
    kind = netlink.NFT_MSG_NEWSETELEM if change.add else netlink.NFT_MSG_DELSETELEM
    msg["header"]["type"] = (netlink.NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = netlink.NLM_F_REQUEST | netlink.NLM_F_ACK | (netlink.NLM_F_CREATE if change.add else 0)
    msg["header"]["sequence_number"] = seq
    elements = []
    for key, value in change.elements:
        attrs: list[tuple[str, object]] = [("NFTA_SET_ELEM_KEY", {"attrs": [("NFTA_DATA_VALUE", key)]})]
        if change.add:
            data = (("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", netlink.NFT_GOTO),
                                                     ("NFTA_VERDICT_CHAIN", value)]})
                    if isinstance(value, str) else ("NFTA_DATA_VALUE", value.to_bytes(2, "big")))
            attrs.append(("NFTA_SET_ELEM_DATA", {"attrs": [data]}))
        elements.append({"attrs": attrs})
    msg["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", change.table), ("NFTA_SET_ELEM_LIST_SET", change.map),
                    ("NFTA_SET_ELEM_LIST_ELEMENTS", elements)]
    msg.encode()
    return bytes(msg.data)


def _marker(kind: int, seq: int) -> bytes:
    msg = nfgen_msg()
    msg["res_id"] = netlink.NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = kind
    msg["header"]["flags"] = netlink.NLM_F_REQUEST
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def test_the_batch_is_packed_as_pyroute2_packs_nf_tables_messages() -> None:
    """lbagent packs the messages itself (pyroute2's generic encoder costs as much as the kernel's work): byte for
    byte what pyroute2's message definitions make of the same changes."""
    changes = netlink.parse(
        "delete element inet lbagent_shard3 dispatch_v4 { 192.0.2.10 . tcp . 80 : goto mg4_a_m, "
        "192.0.2.10 . tcp . 443 : goto mg4_a_m }\n"
        "add element inet lbagent_shard3 dispatch_v4 { 192.0.2.10 . tcp . 80 : goto mg4_bc_m, "
        "192.0.2.10 . tcp . 443 : goto mg4_bc_m }\n"
        "delete element inet lbagent node_ports_v6 { 2001:db8::10 . udp . 53 : 30053 }\n"
        "add element inet lbagent node_ports_v6 { 2001:db8::10 . udp . 53 : 31053 }\n")
    assert changes is not None
    sock = netlink.ElementSocket.__new__(netlink.ElementSocket)  # packing only: no socket
    sock._seq = 41
    batch, sent = sock._batch(changes)
    expected = (_marker(netlink.NFNL_MSG_BATCH_BEGIN, 42)
                + b"".join(_pyroute2(c, 43 + i) for i, c in enumerate(changes))
                + _marker(netlink.NFNL_MSG_BATCH_END, 47))
    assert sent == {43, 44, 45, 46}
    assert batch == expected


TABLE = """table inet t {
  map dispatch_v4 { type ipv4_addr . inet_proto . inet_service : verdict; }
  map node_ports_v4 { type ipv4_addr . inet_proto . inet_service : inet_service; }
  chain loop { ip daddr . meta l4proto . th dport vmap @dispatch_v4; }
  chain c { }
  chain prerouting { type nat hook prerouting priority dstnat; ip daddr . meta l4proto . th dport vmap @dispatch_v4; }
}
"""


@pytest.fixture
def element_socket() -> Iterator[tuple[str, netlink.ElementSocket]]:
    with throwaway_netns("nftnl") as (name,):
        nft(name, "-f", "-", script=TABLE)
        pushns(name)
        try:
            sock = netlink.ElementSocket()
        finally:
            popns()
        try:
            yield name, sock
        finally:
            sock.close()


def _apply(sock: netlink.ElementSocket, script: str) -> None:
    changes = netlink.parse(script)
    assert changes is not None
    sock.apply(changes)


def test_a_refused_part_refuses_the_whole_transaction_and_says_why(
        element_socket: tuple[str, netlink.ElementSocket]) -> None:
    name, sock = element_socket
    good = "add element inet t dispatch_v4 { 192.0.2.1 . tcp . 80 : goto c }\n"
    for bad, why in (("add element inet t dispatch_v4 { 192.0.2.2 . tcp . 80 : goto nosuch }", "ENOENT"),
                     ("add element inet nosuch dispatch_v4 { 192.0.2.2 . tcp . 80 : goto c }", "ENOENT"),
                     # refused when the kernel checks the table at commit: a jump back into the dispatch
                     ("add element inet t dispatch_v4 { 192.0.2.2 . tcp . 80 : goto loop }", "EMLINK")):
        with pytest.raises(NftError, match=why):
            _apply(sock, good + bad)
        assert "192.0.2.1" not in nft(name, "list", "map", "inet", "t", "dispatch_v4")
    _apply(sock, good + "add element inet t node_ports_v4 { 192.0.2.1 . tcp . 80 : 30080 }\n")
    assert "192.0.2.1 . tcp . 80 : goto c" in nft(name, "list", "map", "inet", "t", "dispatch_v4")
    assert "192.0.2.1 . tcp . 80 : 30080" in nft(name, "list", "map", "inet", "t", "node_ports_v4")
    _apply(sock, "delete element inet t node_ports_v4 { 192.0.2.1 . tcp . 80 : 30080 }\n")
    assert "30080" not in nft(name, "list", "map", "inet", "t", "node_ports_v4")


def test_the_tables_listed_over_netlink_are_the_ones_nft_lists() -> None:
    """`table_names` (what a starting forwarder asks, instead of `nft list tables`): every table of the family asked
    for, through a dump longer than one read, and none of another family's."""
    with throwaway_netns("nfttabs") as (name,):
        many = "".join(f"add table inet many{i}\n" for i in range(1500))
        nft(name, "-f", "-", script=many + "add table ip other\nadd table netdev other\n" + TABLE)
        listed = {line.split()[-1] for line in nft(name, "list", "tables", "inet").splitlines() if line.strip()}
        pushns(name)
        try:
            inet, ip = netlink.table_names(), netlink.table_names(2)  # NFPROTO_IPV4
        finally:
            popns()
    assert len(listed) == 1501
    assert inet == listed
    assert ip == {"other"}
