"""A node stand-in: what a kubelet does for the pods bound to one node name, for real, on this machine."""

from .node import ContainerView, NodeStandIn, PodView

__all__ = ["ContainerView", "NodeStandIn", "PodView"]
