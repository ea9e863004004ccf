#!/usr/bin/env bash
# An LB node of the Vagrant lab: lbagent installed by the project's own systemd/install.sh (packages, the
# virtualenv in /opt/lbagent, the hardened unit) with this node's config configs/lab/NAME.yaml, started.
# `vagrant provision lbN` runs it again: the config from the repository replaces /etc/lbagent/lbagent.yaml.
#
#   lb.sh NAME        (lb1, lb2)
set -euo pipefail

name=${1:?usage: lb.sh NAME}
src=${LAB_SRC:-/opt/lbagent-src}
config="$src/configs/lab/$name.yaml"
if [ ! -r "$config" ]; then
  echo "lb.sh: no config for $name: $config" >&2
  exit 1
fi

bash "$src/systemd/install.sh" --config "$config" --start
ln -sf /opt/lbagent/bin/lbagent /usr/local/sbin/lbagent   # `sudo lbagent status -c ...` without the path
systemctl is-active lbagent.service
