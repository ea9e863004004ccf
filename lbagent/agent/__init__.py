"""The daemon: the Agent sequencing health, plan and the layers; its runners; what it reports through (the status
socket, Prometheus metrics, systemd notifications)."""
