#!/usr/bin/env bash
# An LB node of the Vagrant lab: lbagent installed by the project's own systemd/install.sh (packages, the
# virtualenv in /opt/lbagent, the hardened unit) with this node's config configs/lab/NAME.yaml, started. Its
# Services and Nodes come from the k3s API (the config's kubernetes section), so first this writes
# /etc/lbagent/kubeconfig: lbagent's token (vagrant/.lbagent-token, which k3s-server.sh gave the API server) and
# the cluster's CA, fetched from the server's /cacerts. Trusting that first answer is fine on the lab's isolated
# network; a site copies the CA from the server instead (docs/kubernetes.md).
# `vagrant provision lbN` runs it again: the config from the repository replaces /etc/lbagent/lbagent.yaml.
#
#   lb.sh NAME SERVER_IP       (lb1, lb2; the k3s server's address on the cluster network)
set -euo pipefail

name=${1:?usage: lb.sh NAME SERVER_IP}
server_ip=${2:?usage: lb.sh NAME SERVER_IP}
src=${LAB_SRC:-/opt/lbagent-src}
config="$src/configs/lab/$name.yaml"
kubeconfig=/etc/lbagent/kubeconfig
if [ ! -r "$config" ]; then
  echo "lb.sh: no config for $name: $config" >&2
  exit 1
fi

# k3s serves its CA unauthenticated at /cacerts once the server is up. With the libvirt provider the machines come
# up in parallel, so an LB node may get here first: wait.
ca=$(mktemp)
trap 'rm -f "$ca"' EXIT
echo "lb.sh: waiting for the k3s API at $server_ip:6443"
for attempt in $(seq 300); do
  if curl -sfk --max-time 5 "https://$server_ip:6443/cacerts" -o "$ca" && grep -q "BEGIN CERTIFICATE" "$ca"; then
    break
  fi
  if [ "$attempt" -eq 300 ]; then
    echo "lb.sh: no CA from https://$server_ip:6443/cacerts after 10 minutes" >&2
    exit 1
  fi
  sleep 2
done

# lbagent check refuses a kubeconfig that others can read: written 0600 from the start.
install -d -m 0755 /etc/lbagent
(
  umask 077
  cat >"$kubeconfig.new" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: lab
    cluster:
      server: https://$server_ip:6443
      certificate-authority-data: $(base64 -w0 <"$ca")
users:
  - name: lbagent
    user:
      token: $(tr -d '[:space:]' <"$src/vagrant/.lbagent-token")
contexts:
  - name: lbagent@lab
    context: {cluster: lab, user: lbagent}
current-context: lbagent@lab
KUBECONFIG
)
mv "$kubeconfig.new" "$kubeconfig"

bash "$src/systemd/install.sh" --config "$config" --start
ln -sf /opt/lbagent/bin/lbagent /usr/local/sbin/lbagent   # `sudo lbagent status -c ...` without the path
systemctl is-active lbagent.service
