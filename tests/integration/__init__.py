"""Tests of lbagent's parts against the real programs they drive, in network namespaces (need root)."""
