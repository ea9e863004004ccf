"""The network-namespace lab shared by the end-to-end tests and `make demo`."""

from tests.lab.lab import (
    HOSTS,
    LBS,
    NODES,
    CommandError,
    Lab,
    LabError,
    LabTimeout,
    address,
    check_requirements,
    wait_for,
)

__all__ = [
    "HOSTS",
    "LBS",
    "NODES",
    "CommandError",
    "Lab",
    "LabError",
    "LabTimeout",
    "address",
    "check_requirements",
    "wait_for",
]
