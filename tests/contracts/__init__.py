"""Contracts: what the agent relies on from a layer that runs a daemon, written once as test functions over a
`World` (the layer, and a way to see what its daemon did). The same functions run against the fake the agent's unit
tests use (tests/unit/test_contracts.py) and against the real layer with its real programs (tests/integration), so
a fake cannot promise what the real one does not keep."""
