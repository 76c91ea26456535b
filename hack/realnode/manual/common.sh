# Shared by hack/realnode/manual/{up,down,smoke}: paths, process bookkeeping, namespace entry.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
ST=${IPNC_REALNODE_STATE:-/tmp/ipnc-realnode}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/istio-pod-network-controller
BIN=${IPNC_REALNODE_CACHE:-$cache/realnode}/current
TB=${IPNC_TESTBIN_CACHE:-$cache/testbin}/current
IMG=${IPNC_IMAGES_CACHE:-$cache/images}/current
VIP=10.250.0.1            # the API server as nodes and pods see it: on each node's lo, /32
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.0.0.0/24  # the ControlPlane's --service-cluster-ip-range
node_ip() { echo "10.250.0.1$1"; }
pod_cidr() { echo "10.244.$1.0/24"; }

log() { printf '[realnode] %s\n' "$*"; }
# bg NAME CMD...: start in its own session, log to $ST/NAME.log, pid in $ST/NAME.pid
bg() { local name=$1; shift; setsid "$@" >"$ST/$name.log" 2>&1 </dev/null & echo "$!" >"$ST/$name.pid"; }
pid_of() { cat "$ST/$1.pid" 2>/dev/null; }
# innode I CMD...: run in node I's network and mount namespaces
innode() { local i=$1; shift; nsenter -t "$(pid_of "node-$i-holder")" -m -n -- "$@"; }
kubectl_() { "$TB/kubectl" --kubeconfig "$(cat "$ST/workdir")/kubeconfig" --cache-dir "$ST/kube-cache" "$@"; }
token_of() { grep ",$1," "$ST/tokens.csv" | cut -d, -f1; }
# kubeconfig FILE SERVER TOKEN: the API server's certificate has no SAN for the VIP: name it
kubeconfig() {
  cat >"$1" <<K
apiVersion: v1
kind: Config
clusters:
- name: ipnc
  cluster: {server: "$2", certificate-authority: $(cat "$ST/workdir")/pki/ca.crt, tls-server-name: kubernetes}
users:
- name: u
  user: {token: $3}
contexts:
- name: c
  context: {cluster: ipnc, user: u}
current-context: c
K
  chmod 600 "$1"
}
