"""The waiter in front of native nftables rules: `--verify` proves the redirect NftApplier wrote,
and the exit line names the mode the agent's mark gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipnc_dev.netlab import Pod
from istio_pod_network_controller.node.netns import Netns
from istio_pod_network_controller.node.nft import NftApplier
from istio_pod_network_controller.spec import parse_flags

from .conftest import SIDECAR, _needs_root
from .test_waiter_kernel import agents_plan, mark, pod, run_waiter, volume  # noqa: F401 -- fixtures

pytestmark = pytest.mark.kernel


def test_verify_proves_the_nftables_redirect_and_names_the_mode(pod: Pod, volume: Path) -> None:  # noqa: F811
    _needs_root()
    applier = NftApplier()
    with Netns(pod.path) as ns:
        result = applier.apply(ns, applier.render(parse_flags(list(SIDECAR))))
        path = mark(volume, ns.inode, detail={"verify": agents_plan(), "mode": result.mode})
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "(nftables mode, ruleset ffffffffffff" in line
    assert line.endswith("outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001"), line
