"""L4: forwarding VIP:port to healthy nodes in the kernel. One sub-package per data plane (nftables, iptables, ipvs),
each with a pure `render` and an `apply` that runs the tools; shared here: the forwarder interface, Maglev and jhash,
the one `nft` runner, nftables drift watching and conntrack clearing."""
