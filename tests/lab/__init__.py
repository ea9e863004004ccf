"""The network-namespace lab shared by the end-to-end tests and `make demo`."""

from tests.lab.lab import (
    HOSTS,
    KUBE_PROXY_PORT,
    LBS,
    NODES,
    CommandError,
    Lab,
    LabError,
    LabTimeout,
    address,
    address6,
    check_requirements,
    wait_for,
)

__all__ = [
    "HOSTS",
    "KUBE_PROXY_PORT",
    "LBS",
    "NODES",
    "CommandError",
    "Lab",
    "LabError",
    "LabTimeout",
    "address",
    "address6",
    "check_requirements",
    "wait_for",
]
