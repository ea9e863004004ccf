"""lbagent: the load-balancer node agent (L3 BGP VIPs, L4 kernel forwarding, L7 HAProxy)."""

__version__ = "0.1.0"
