"""Tests of lbagent's parts against the real programs they drive: ExaBGP with BIRD in network namespaces (need root),
HAProxy on loopback; among them the real side of the contracts in tests/contracts."""
