#!/usr/bin/env bash
# Every machine of the Vagrant lab: the tools the walk-through uses, and the machine's static routes from
# topology.yaml, applied again at every boot by a small unit (Vagrant's network config knows no routes).
#
#   base.sh ["PREFIX via GATEWAY" ...]
set -euo pipefail

for route in "$@"; do
  if ! [[ $route =~ ^[0-9./]+\ via\ [0-9.]+$ ]]; then
    echo "base.sh: not a route: '$route' (want PREFIX via GATEWAY)" >&2
    exit 2
  fi
done

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl ca-certificates iproute2 tcpdump

[ $# -gt 0 ] || exit 0
printf '%s\n' "$@" >/etc/lab-routes
install -m 0755 /dev/stdin /usr/local/sbin/lab-routes <<'SCRIPT'
#!/bin/sh
# Written by vagrant/provision/base.sh: `ip route replace` each line of /etc/lab-routes. A gateway is reachable
# only once Vagrant's interface is up, so retry for a minute.
attempt=0
while [ "$attempt" -lt 60 ]; do
  ok=yes
  while read -r route; do
    [ -n "$route" ] || continue
    # shellcheck disable=SC2086 # a route is several words
    ip route replace $route || ok=no
  done </etc/lab-routes
  [ "$ok" = yes ] && exit 0
  attempt=$((attempt + 1))
  sleep 1
done
exit 1
SCRIPT
cat >/etc/systemd/system/lab-routes.service <<'UNIT'
[Unit]
Description=Static routes of the lbagent Vagrant lab (/etc/lab-routes)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/lab-routes

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable lab-routes.service
systemctl restart lab-routes.service
ip route show
