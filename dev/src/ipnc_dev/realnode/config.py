"""What a real node is told, as text: addresses, containerd's, the kubelet's and kube-proxy's
configurations, the CNI bridge, kubeconfigs, tokens and the API server's egress selector.

Pure: values in, file contents out; ``cluster.py`` writes them and starts the programs. Every
setting here is one docs/real-node.md explains (why it is needed on a machine with cgroup v1, no
systemd, no CAP_SYS_RESOURCE, and with no packet allowed to leave the namespaces the harness made).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The API server as nodes and pods see it: an address on each node's own loopback, forwarded to
# the API server on the host's loopback (the host gets no address, link or route).
API_VIP = "10.250.0.1"
NODE_NETWORK = "10.250.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
MAX_NODES = 2
# The kubelet writes these global (not per network namespace) sysctls when they differ, and
# refuses to start with protectKernelDefaults when they do: each node's mount namespace gets a file
# with the wanted value bound over the /proc/sys file, so the kubelet reads what it wants and the
# host's values never change (kernel.panic=10 would make an oops reboot the machine).
KUBELET_SYSCTLS: Mapping[str, str] = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Plugins of containerd 2.x a node does not need, and that would otherwise touch host paths
# (/opt/containerd, NRI's socket) or look for snapshotters this machine lacks.
CONTAINERD_DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.nri.v1.nri",
    "io.containerd.image-verifier.v1.bindir",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
    "io.containerd.mount-handler.v1.erofs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


@dataclass(frozen=True)
class NodePlan:
    """Names, addresses and folders of node ``index`` (1 or 2) of run ``run_id``."""

    index: int
    run_id: str
    state: Path

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_NODES:
            raise ValueError(f"node index must be 1..{MAX_NODES}, not {self.index}")

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_network(NODE_NETWORK)[10 + self.index])

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def dir(self) -> Path:
        return self.state / self.name

    @property
    def cgroup_name(self) -> str:
        """The node's cgroupRoot, a top-level cgroup in every hierarchy: named after the run, so
        that two runs (or a leftover of one) never share it."""
        return f"ipnc-rn-{self.run_id}-{self.name}"

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def lab_link(self) -> str:
        """The lab bridge's end of the node's veth pair (the node's end is ``eth0``)."""
        return f"n{self.index}"


def containerd_config(node: NodePlan, *, runc: Path, pause_image: str) -> str:
    """containerd 2.x (config version 4): state, sockets and the CNI setup under the node's
    folder, runc with the cgroupfs driver, no OOM score below ours (no CAP_SYS_RESOURCE)."""
    base = node.dir / "containerd"
    disabled = ", ".join(f"'{p}'" for p in CONTAINERD_DISABLED_PLUGINS)
    return f"""version = 4
root = '{base / "root"}'
state = '{base / "state"}'
disabled_plugins = [{disabled}]
[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = '{node.containerd_socket}'
  [plugins.'io.containerd.server.v1.ttrpc']
    address = '{node.containerd_socket}.ttrpc'
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause_image}'
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{node.dir / "cni" / "net.d"}'
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
"""


def cni_conflist(node: NodePlan) -> str:
    """A bridge (cni0, the pods' gateway, masquerading) with host-local addresses from the
    node's pod CIDR, and portmap."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "ipnc",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.dir / "cni" / "ipam"),
                    "ranges": [[{"subnet": node.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def kubelet_config(
    node: NodePlan, *, client_ca: Path, settings: Mapping[str, Any] | None = None
) -> str:
    """KubeletConfiguration for cgroup v1 with the cgroupfs driver under the node's own
    cgroupRoot; nothing that writes host sysctls, OOM scores below zero or host paths.
    ``settings`` are top-level fields set over ours (e.g. ``syncFrequency`` for a test that
    needs the kubelet's periodic sync slow)."""
    conf: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{node.cgroup_name}",
        "cgroupsPerQOS": True,
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "address": node.ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "resolvConf": str(node.dir / "resolv.conf"),
        "podLogsDirectory": str(node.dir / "logs" / "pods"),
        "volumePluginDir": str(node.dir / "volume-plugins"),
        "oomScoreAdj": 0,
        "protectKernelDefaults": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
        "shutdownGracePeriodCriticalPods": "0s",
        "serializeImagePulls": False,
    }
    conf.update(settings or {})
    return yaml.safe_dump(conf, sort_keys=False)


def kube_proxy_config(node: NodePlan, *, kubeconfig: Path) -> str:
    """iptables mode, leaving the global conntrack table size and route_localnet alone."""
    conf: dict[str, Any] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node.name,
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "bindAddress": node.ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
        "nodePortAddresses": ["primary"],
    }
    return yaml.safe_dump(conf, sort_keys=False)


def crictl_config(node: NodePlan) -> str:
    endpoint = f"unix://{node.containerd_socket}"
    return f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 20\n"


def token_kubeconfig(server: str, *, ca_cert: Path, token: str, tls_server_name: str | None = None) -> str:
    """A kubeconfig for a static token. ``tls_server_name``: the name to check the serving
    certificate against when ``server`` is an address it has no SAN for (the VIP)."""
    cluster: dict[str, Any] = {"server": server, "certificate-authority": str(ca_cert)}
    if tls_server_name:
        cluster["tls-server-name"] = tls_server_name
    conf = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ipnc", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "ipnc", "user": "u"}}],
        "current-context": "c",
    }
    return yaml.safe_dump(conf, sort_keys=False)


@dataclass(frozen=True)
class Identity:
    """A static-token user of the API server (``--token-auth-file``)."""

    user: str
    token: str
    groups: tuple[str, ...] = ()


def node_identity(node: NodePlan, token: str) -> Identity:
    """The Node authorizer and NodeRestriction know a kubelet as ``system:node:<name>`` in
    ``system:nodes``."""
    return Identity(f"system:node:{node.name}", token, ("system:nodes",))


def token_auth_file(identities: Sequence[Identity]) -> str:
    """``token,user,uid[,"group1,group2"]`` per line."""
    lines = []
    for ident in identities:
        if "," in ident.user or '"' in ident.user or not ident.token.isalnum():
            raise ValueError(f"unusable static identity {ident.user!r}")
        line = f"{ident.token},{ident.user},{ident.user}"
        if ident.groups:
            line += ',"' + ",".join(ident.groups) + '"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def egress_selector_config(socket_path: Path) -> str:
    """The API server's ``cluster`` traffic (kubelets, pods, Services: logs, exec, the service
    proxy, webhooks behind Services) as HTTP CONNECT over a unix socket, to the relay that dials
    from inside node-1's network namespace -- konnectivity's role in real clusters."""
    conf = {
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [
            {
                "name": "cluster",
                "connection": {
                    "proxyProtocol": "HTTPConnect",
                    "transport": {"uds": {"udsName": str(socket_path)}},
                },
            }
        ],
    }
    return yaml.safe_dump(conf, sort_keys=False)


def apiserver_args(*, tokens_file: Path, egress_config: Path) -> list[str]:
    """kube-apiserver flags a real node needs on top of the ControlPlane's own."""
    return [
        f"--advertise-address={API_VIP}",
        f"--token-auth-file={tokens_file}",
        f"--egress-selector-config-file={egress_config}",
        "--enable-admission-plugins=NodeRestriction",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
    ]
