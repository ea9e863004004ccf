"""The daemon: the Agent sequencing source, health, plan and one reconciler per subsystem (VIPs, data plane, BGP,
HAProxy), each with its runner; what it reports through (the status socket, Prometheus metrics, systemd
notifications)."""
