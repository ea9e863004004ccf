#!/usr/bin/env bash
# The k3s server of the Vagrant lab (node1, also a worker): no servicelb and no traefik (lbagent is the load
# balancer, and the demo needs no ingress), node IP and flannel on the cluster network, the join token the
# Vagrantfile made (vagrant/.k3s-token, synced with the repository). The API server also knows lbagent's token
# (vagrant/.lbagent-token) as the user `lbagent`, whose rights are deploy/kubernetes/rbac.yaml: the LB nodes take
# the demo's Services from this API (configs/lab/lbN.yaml, kubernetes section). Then the demo app.
#
#   k3s-server.sh NODE_IP
# Environment: K3S_VERSION (e.g. v1.31.4+k3s1) or K3S_CHANNEL (default stable) pick the k3s release.
set -euo pipefail

node_ip=${1:?usage: k3s-server.sh NODE_IP}
src=${LAB_SRC:-/opt/lbagent-src}
token=/etc/rancher/k3s/lab-token

iface=$(ip -o -4 addr show | awk -v ip="$node_ip" '{ split($4, a, "/") } a[1] == ip { print $2; exit }')
if [ -z "$iface" ]; then
  echo "k3s-server.sh: no interface has $node_ip" >&2
  exit 1
fi
install -d -m 0755 /etc/rancher/k3s
install -m 0600 "$src/vagrant/.k3s-token" "$token"
# The API server's static token file: token,user,uid (kube-apiserver --token-auth-file).
lbagent_tokens=/etc/rancher/k3s/lbagent-tokens.csv
(umask 077 && printf '%s,lbagent,lbagent\n' "$(tr -d '[:space:]' <"$src/vagrant/.lbagent-token")" \
  >"$lbagent_tokens.new")
mv "$lbagent_tokens.new" "$lbagent_tokens"

curl -sfL https://get.k3s.io -o /root/k3s-install.sh
INSTALL_K3S_CHANNEL=${K3S_CHANNEL:-stable} INSTALL_K3S_VERSION=${K3S_VERSION:-} sh /root/k3s-install.sh server \
  --node-ip "$node_ip" --advertise-address "$node_ip" --flannel-iface "$iface" --token-file "$token" \
  --disable servicelb --disable traefik --kube-apiserver-arg "token-auth-file=$lbagent_tokens"

echo "k3s-server.sh: waiting for the API server"
for attempt in $(seq 150); do
  if k3s kubectl get --raw /readyz >/dev/null 2>&1; then
    break
  fi
  if [ "$attempt" -eq 150 ]; then
    echo "k3s-server.sh: the API server is not ready after 5 minutes" >&2
    exit 1
  fi
  sleep 2
done
# Pods that find no node yet (node2 and node3 join later) stay Pending until they do: see the manifest.
k3s kubectl apply -f "$src/deploy/kubernetes/rbac.yaml"
k3s kubectl apply -f "$src/vagrant/manifests/demo.yaml"
k3s kubectl get nodes -o wide
