"""What the kernel's routing table says about reaching the nodes, as the data planes' direct server return needs it:
a node is reachable by MAC address only when the route to it has no gateway. Shared by the nftables and IPVS data
planes."""

from __future__ import annotations

from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


def on_link_paths(addresses: Iterable[str], interfaces: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The kernel's answer, for each address, to "which interface reaches it on-link (no gateway)?"; and which of
    `interfaces` exist. Blocking netlink calls: run in a thread."""
    paths: dict[str, str] = {}
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for address in addresses:
            try:
                route = ipr.route("get", dst=address)[0]
            except (NetlinkError, OSError):  # no route: not reachable, which is what is asked
                continue
            if route.get_attr("RTA_GATEWAY") is None and route.get_attr("RTA_OIF") in names:
                paths[address] = names[route.get_attr("RTA_OIF")]
    return paths, [i for i in interfaces if i in names.values()]
