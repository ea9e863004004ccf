#!/usr/bin/env bash
# The Vagrant lab's router: BIRD 2 with configs/lab/bird.conf (AS 64500, a BGP session with each LB node, the
# VIP routes into the kernel table with one next hop per LB), IP forwarding, and a multipath hash over the
# 5-tuple so the flows of one client spread over both LB nodes, as in the namespace lab.
set -euo pipefail

src=${LAB_SRC:-/opt/lbagent-src}
conf="$src/configs/lab/bird.conf"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends bird2

cat >/etc/sysctl.d/60-lbagent-lab-router.conf <<'SYSCTL'
# The lbagent Vagrant lab's router (vagrant/provision/router.sh).
net.ipv4.ip_forward = 1
# ECMP by the 5-tuple (addresses, protocol, ports), as a hardware router hashes.
net.ipv4.fib_multipath_hash_policy = 3
net.ipv4.fib_multipath_hash_fields = 0x0037
SYSCTL
sysctl -q -p /etc/sysctl.d/60-lbagent-lab-router.conf

bird -p -c "$conf"   # refuse a config BIRD cannot parse before replacing the running one
install -m 0640 -o bird -g bird "$conf" /etc/bird/bird.conf
systemctl enable bird.service
systemctl restart bird.service
# BIRD runs in the foreground under systemd (Type=simple): its control socket appears a moment after the start.
for attempt in $(seq 30); do
  if birdc show protocols; then
    break
  fi
  if [ "$attempt" -eq 30 ]; then
    echo "router.sh: BIRD does not answer on its control socket" >&2
    exit 1
  fi
  sleep 1
done
