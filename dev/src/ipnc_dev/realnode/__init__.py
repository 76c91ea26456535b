"""Real Kubernetes nodes for the ``realnode`` test tier and ``dev cluster --real-node``.

``RealCluster`` runs one or two real nodes (containerd, runc, kubelet, kube-proxy, a CNI bridge,
each node in network and mount namespaces of its own) beside the test control plane, plus
kube-controller-manager and kube-scheduler, and leaves the host as it found it. docs/real-node.md
describes the layout and every setting.
"""

from .cluster import HostChanged, RealCluster, RealClusterError, Terminated

__all__ = ["HostChanged", "RealCluster", "RealClusterError", "Terminated"]
