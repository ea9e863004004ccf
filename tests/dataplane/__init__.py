"""One behaviour suite for every L4 data plane (nftables, iptables, iptables-legacy, later IPVS), with real packets."""
