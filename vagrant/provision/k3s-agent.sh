#!/usr/bin/env bash
# A k3s agent of the Vagrant lab (node2, node3): joins the server with the token the Vagrantfile made
# (vagrant/.k3s-token, synced with the repository), node IP and flannel on the cluster network.
#
#   k3s-agent.sh NODE_IP SERVER_IP
# Environment: K3S_VERSION or K3S_CHANNEL, as for k3s-server.sh (use the same).
set -euo pipefail

node_ip=${1:?usage: k3s-agent.sh NODE_IP SERVER_IP}
server_ip=${2:?usage: k3s-agent.sh NODE_IP SERVER_IP}
src=${LAB_SRC:-/opt/lbagent-src}
token=/etc/rancher/k3s/lab-token

iface=$(ip -o -4 addr show | awk -v ip="$node_ip" '{ split($4, a, "/") } a[1] == ip { print $2; exit }')
if [ -z "$iface" ]; then
  echo "k3s-agent.sh: no interface has $node_ip" >&2
  exit 1
fi
install -d -m 0755 /etc/rancher/k3s
install -m 0600 "$src/vagrant/.k3s-token" "$token"

# With providers that start machines in parallel (libvirt), the server may still be installing.
echo "k3s-agent.sh: waiting for the k3s server at $server_ip:6443"
for attempt in $(seq 450); do
  if timeout 2 bash -c "exec 3<>/dev/tcp/$server_ip/6443" 2>/dev/null; then
    break
  fi
  if [ "$attempt" -eq 450 ]; then
    echo "k3s-agent.sh: the k3s server at $server_ip:6443 did not answer in 15 minutes" >&2
    exit 1
  fi
  sleep 2
done

curl -sfL https://get.k3s.io -o /root/k3s-install.sh
INSTALL_K3S_CHANNEL=${K3S_CHANNEL:-stable} INSTALL_K3S_VERSION=${K3S_VERSION:-} sh /root/k3s-install.sh agent \
  --server "https://$server_ip:6443" --token-file "$token" --node-ip "$node_ip" --flannel-iface "$iface"
