"""The per-rule iptables binary of a backend, for tests and benchmarks that change rules one at a
time, as an administrator or the original controller would. The product never runs it: it writes
whole rulesets with iptables-restore."""

from __future__ import annotations

from istio_pod_network_controller.node.backend import Family, Tools


def iptables_command(tools: Tools, family: Family) -> str:
    """``iptables-nft``, ``ip6tables-legacy``, ...: the restore binary's sibling."""
    return tools.restore[family].removesuffix("-restore")
