"""The IPVS data plane: IPVS services over netlink, beside a small companion nftables table."""
