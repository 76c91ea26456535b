"""The node agent in native nftables mode (``run --native-nftables``) against a real API server
and real sandboxes: pods are marked with the mode, their namespaces hold Istio's nft tables and
no iptables rule of ours, traffic is redirected, and a restarted agent rewrites nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent import (  # noqa: F401 -- fixtures shared with the agent's other tests
    ELSEWHERE,
    Cluster,
    agent_kubeconfig,
    cluster,
    detail,
    lab,
    meshed_pod,
    status,
    wait_for,
)

from ipnc_dev.agentproc import AgentProcess
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller import names
from istio_pod_network_controller.node.netns import Netns

pytestmark = pytest.mark.cluster

NATIVE = ("--native-nftables",)


@pytest.fixture
def nft_agent(agent_kubeconfig: Path, cluster: Cluster) -> Iterator[AgentProcess]:  # noqa: F811
    proc = AgentProcess(agent_kubeconfig, cluster.node, extra=NATIVE)
    try:
        proc.start().wait_ready()
        yield proc
        assert proc.stop() == 0, proc.logs()[-3000:]
    finally:
        proc.close()


def nft_listing(path: str) -> str:
    """The sandbox's nftables ruleset with handles, counters taken out."""
    with Netns(path) as ns:
        listed = ns.run(["nft", "-a", "list", "ruleset"])
        assert listed.ok, listed.reason()
        return re.sub(r"counter packets \d+ bytes \d+", "counter", listed.stdout)


def test_pods_are_programmed_in_nftables_mode_and_a_restart_rewrites_nothing(
    cluster: Cluster,  # noqa: F811
    nft_agent: AgentProcess,
    agent_kubeconfig: Path,  # noqa: F811
    lab: Netlab,  # noqa: F811
) -> None:
    meshed = [f"nft-{i}" for i in range(8)]
    for name in meshed:
        cluster.create(meshed_pod(name, cluster.node))
    wait_for("8 pods initialized", lambda: cluster.initialized(meshed), timeout=120)
    pods = cluster.pods()
    paths = {name: cluster.boxes.by_uid[pods[name]["metadata"]["uid"]].path for name in meshed}
    for name in meshed:
        info = detail(pods[name])
        assert (info["mode"], info["backend"]) == ("nftables", "nftables"), info
        assert "table inet istio-proxy-nat" in nft_listing(paths[name])
        assert "ISTIO" not in cluster.boxes.iptables_save(pods[name]["metadata"]["uid"])
    exposed = nft_agent.get("/metrics")[1]
    assert 'ipnc_agent_info{backend="nftables",mode="nftables"} 1.0' in exposed

    # Real traffic from two of them: the app's connection reaches the proxy, destination intact.
    sample = [paths[meshed[0]], paths[meshed[5]]]
    lab.stub_proxy(sample, tcp=(15001,))
    for index, path in enumerate(sample):
        answer = lab.probe([path], user=1000).tcp(ELSEWHERE, 80)
        assert answer["ok"], answer
        reply = answer["reply"]
        assert isinstance(reply, dict)
        assert (reply["netns"], reply["port"], reply["orig"]) == (index, 15001, [ELSEWHERE, 80])

    # A new agent process re-checks every marked pod: same tables, same handles, same marks.
    before = {name: nft_listing(path) for name, path in paths.items()}
    assert nft_agent.stop() == 0
    second = AgentProcess(agent_kubeconfig, cluster.node, extra=NATIVE)
    try:
        second.start().wait_ready()
        after_restart = cluster.pods()
        assert {name: nft_listing(path) for name, path in paths.items()} == before
        for name in meshed:
            assert status(after_restart[name]) == names.STATUS_INITIALIZED
            assert detail(after_restart[name])["appliedAt"] == detail(pods[name])["appliedAt"]
        assert second.stop() == 0, second.logs()[-3000:]
    finally:
        second.close()


def test_an_agent_restarted_in_the_other_mode_moves_every_pod_to_it(
    cluster: Cluster,  # noqa: F811
    agent_kubeconfig: Path,  # noqa: F811
) -> None:
    meshed = [f"switch-{i}" for i in range(4)]
    first = AgentProcess(agent_kubeconfig, cluster.node)
    try:
        first.start().wait_ready()
        for name in meshed:
            cluster.create(meshed_pod(name, cluster.node))
        wait_for("4 pods initialized", lambda: cluster.initialized(meshed), timeout=120)
        assert first.stop() == 0
    finally:
        first.close()
    uids = {name: pod["metadata"]["uid"] for name, pod in cluster.pods().items() if name in meshed}
    assert all("ISTIO" in cluster.boxes.iptables_save(uid) for uid in uids.values())

    second = AgentProcess(agent_kubeconfig, cluster.node, extra=NATIVE)
    try:
        second.start().wait_ready()

        def all_moved() -> bool:
            pods = cluster.pods()
            return all(detail(pods[name]).get("mode") == "nftables" for name in meshed)

        wait_for("every pod re-marked in nftables mode", all_moved, timeout=120)
        for name, uid in uids.items():
            path = cluster.boxes.by_uid[uid].path
            assert "table inet istio-proxy-nat" in nft_listing(path), name
            assert "ISTIO" not in cluster.boxes.iptables_save(uid), name
        assert second.stop() == 0, second.logs()[-3000:]
    finally:
        second.close()
