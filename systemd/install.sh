#!/usr/bin/env bash
# Install lbagent on a Debian/Ubuntu LB node: system packages, a virtualenv in /opt/lbagent, the systemd unit,
# and a config in /etc/lbagent/ (kept if present). Used by the Vagrant lab's provisioning.
#
#   sudo systemd/install.sh [--config FILE] [--start] [--no-packages] [--print-packages]
#
# DESTDIR=/some/root stages everything under that root instead (for tests and packaging); it implies
# --no-packages and never touches systemctl.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# The Debian packages of the agent's own tools (nft, iptables, ipvsadm, conntrack, ip, the HAProxy it runs for HTTP
# listeners, python3-venv): the `agent` rows of the project's table of programs.
agent_packages() {
  awk '!/^#/ && NF >= 3 && $2 !~ /^(pip|build):/ && ("," $3 ",") ~ /,agent,/ { print $2 }' "$here/deps/programs.txt" | sort -u
}
destdir=${DESTDIR:-}
config=""
start=no
packages=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --start) start=yes; shift ;;
    --no-packages) packages=no; shift ;;
    --print-packages) agent_packages; exit 0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$destdir" ] && packages=no && start=no
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

prefix=/opt/lbagent
if [ "$packages" = yes ]; then
  apt-get update -qq
  # FRR is here for the bfdd lbagent runs itself (BFD); its package enables frr.service (zebra, staticd) on install.
  # When this install brings FRR, that service is disabled again: lbagent needs none of its daemons. A site that
  # had FRR before keeps its service as it was (lbagent's bfdd uses its own sockets under agent.runtimeDir).
  frr_before=$(dpkg-query -W -f='${Status}' frr 2>/dev/null || true)
  # shellcheck disable=SC2046 # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(agent_packages)
  # lbagent starts and reloads its own HAProxy; the distribution's instance would only compete for ports.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now haproxy.service >/dev/null 2>&1 || true
    if [ "$frr_before" != "install ok installed" ]; then
      systemctl disable --now frr.service >/dev/null 2>&1 || true
    fi
  fi
fi

python3 -m venv "$destdir$prefix"
"$destdir$prefix/bin/pip" install -q --disable-pip-version-check "$here"
# The virtualenv's scripts name their interpreter by its staged path: fix them for the real root.
if [ -n "$destdir" ]; then
  grep -rl --null "$destdir$prefix" "$destdir$prefix/bin" | xargs -0 -r sed -i "s#$destdir$prefix#$prefix#g"
fi

install -D -m 0644 "$here/systemd/lbagent.service" "$destdir/etc/systemd/system/lbagent.service"
install -d -m 0755 "$destdir/etc/lbagent"
if [ -n "$config" ]; then
  install -m 0600 "$config" "$destdir/etc/lbagent/lbagent.yaml"
elif [ ! -e "$destdir/etc/lbagent/lbagent.yaml" ]; then
  install -m 0600 "$here/configs/lbagent.example.yaml" "$destdir/etc/lbagent/lbagent.yaml"
  echo "install.sh: installed the example config at /etc/lbagent/lbagent.yaml: edit it before starting"
fi

if [ -z "$destdir" ]; then
  "$prefix/bin/lbagent" check -c /etc/lbagent/lbagent.yaml
  systemctl daemon-reload
  systemctl enable lbagent.service
  [ "$start" = yes ] && systemctl restart lbagent.service
fi
echo "install.sh: lbagent $("$destdir$prefix/bin/python" -c 'import lbagent; print(lbagent.__version__)') in ${destdir:-}$prefix"
