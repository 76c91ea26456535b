"""The real-node harness's pure parts: what nodes are told, what the relay dials, how the host is
compared, and how Istio's injected workloads are made runnable (without running anything)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipnc_dev.commands import dev
from ipnc_dev.realnode import artifacts, config, hoststate, install, processes, relay, settled, workload
from istio_pod_network_controller import names

ALLOWED = [ipaddress.ip_network(n) for n in (config.NODE_NETWORK, config.CLUSTER_CIDR, "10.0.0.0/24")]


def node(index: int = 1) -> config.NodePlan:
    return config.NodePlan(index, "abc123", Path("/tmp/ipnc-rn-abc123"))


# -- what nodes are told -------------------------------------------------------------------------------


def test_nodes_get_their_own_address_pod_range_and_cgroup_root() -> None:
    one, two = node(1), node(2)
    assert (one.ip, two.ip) == ("10.250.0.11", "10.250.0.12")
    assert (one.pod_cidr, two.pod_cidr) == ("10.244.1.0/24", "10.244.2.0/24")
    assert (one.cgroup_name, two.cgroup_name) == ("ipnc-rn-abc123-node-1", "ipnc-rn-abc123-node-2")
    assert one.containerd_socket != two.containerd_socket
    assert ipaddress.ip_address(one.ip) in ipaddress.ip_network(config.NODE_NETWORK)
    with pytest.raises(ValueError, match="node index"):
        config.NodePlan(3, "abc123", Path("/tmp"))


def test_kubelet_never_writes_host_sysctls_or_oom_scores_and_stays_in_its_cgroup_root() -> None:
    conf = yaml.safe_load(config.kubelet_config(node(2), client_ca=Path("/ca.crt")))
    assert conf["cgroupRoot"] == "/ipnc-rn-abc123-node-2"
    assert conf["cgroupDriver"] == "cgroupfs" and conf["failCgroupV1"] is False
    assert conf["protectKernelDefaults"] is False and conf["oomScoreAdj"] == 0
    assert conf["address"] == "10.250.0.12"
    assert conf["authentication"]["anonymous"]["enabled"] is False
    assert not {"kubeletCgroups", "systemCgroups", "runtimeCgroups"} & set(conf), "they move processes"
    assert set(config.KUBELET_SYSCTLS) <= set(hoststate.WATCHED_SYSCTLS)


def test_containerd_and_cni_keep_their_state_under_the_node_folder() -> None:
    n = node(1)
    text = config.containerd_config(n, runc=Path("/bin/runc"), pause_image="localhost/ipnc/pause:1")
    assert f"address = '{n.containerd_socket}'" in text
    assert "restrict_oom_score_adj = true" in text and "SystemdCgroup = false" in text
    assert "netns_mounts_under_state_dir = true" in text
    assert "sandbox = 'localhost/ipnc/pause:1'" in text
    cni = yaml.safe_load(config.cni_conflist(n))
    assert cni["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]
    assert cni["plugins"][0]["ipam"]["dataDir"].startswith(str(n.dir))
    proxy = yaml.safe_load(config.kube_proxy_config(n, kubeconfig=Path("/k")))
    assert proxy["conntrack"]["maxPerCore"] == 0 and proxy["iptables"]["localhostNodePorts"] is False


def test_static_tokens_name_the_node_group_and_refuse_odd_identities() -> None:
    text = config.token_auth_file(
        [config.node_identity(node(1), "t0k3n"), config.Identity("system:kube-proxy", "p")]
    )
    assert text.splitlines() == [
        't0k3n,system:node:node-1,system:node:node-1,"system:nodes"',
        "p,system:kube-proxy,system:kube-proxy",
    ]
    with pytest.raises(ValueError):
        config.token_auth_file([config.Identity("a,b", "t")])
    with pytest.raises(ValueError):
        config.token_auth_file([config.Identity("a", "t,x")])


def test_api_server_sends_cluster_traffic_through_the_egress_socket() -> None:
    conf = yaml.safe_load(config.egress_selector_config(Path("/s/egress.sock")))
    (selection,) = conf["egressSelections"]
    assert selection["name"] == "cluster"
    assert selection["connection"]["transport"]["uds"]["udsName"] == "/s/egress.sock"
    args = config.apiserver_args(tokens_file=Path("/t"), egress_config=Path("/e"))
    assert f"--advertise-address={config.API_VIP}" in args


# -- the relay -----------------------------------------------------------------------------------------


def test_relay_dials_only_addresses_of_the_cluster() -> None:
    assert relay.parse_connect(b"CONNECT 10.244.2.7:9443 HTTP/1.1\r\nHost: x\r\n\r\n", ALLOWED) == (
        "10.244.2.7",
        9443,
    )
    assert relay.parse_connect(b"CONNECT 10.250.0.12:10250 HTTP/1.1\r\n\r\n", ALLOWED) == (
        "10.250.0.12",
        10250,
    )
    for head, why in [
        (b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n", "outside"),
        (b"CONNECT 127.0.0.1:2379 HTTP/1.1\r\n\r\n", "outside"),
        (b"CONNECT webhook.ns.svc:443 HTTP/1.1\r\n\r\n", "not an IP"),
        (b"GET / HTTP/1.1\r\n\r\n", "not a CONNECT"),
        (b"CONNECT 10.244.1.1:0 HTTP/1.1\r\n\r\n", "host:port"),
        (b"CONNECT 10.244.1.1 HTTP/1.1\r\n\r\n", "host:port"),
        (b"CONNECT 10.244.1.1:1 HTTP/1.1\r\n" + b"x" * relay.HEADER_LIMIT, "too long"),
    ]:
        with pytest.raises(relay.Refused, match=why):
            relay.parse_connect(head, ALLOWED)


# -- the host comparison -------------------------------------------------------------------------------


def test_host_difference_names_each_change() -> None:
    before = hoststate.HostState(
        sysctls={"kernel/panic": "1"},
        rulesets={"iptables-save": ("*filter", "COMMIT")},
        mounts=("proc /proc proc",),
        cgroups=("pids/a",),
        netns=("x",),
        processes=("10:5 sleep",),
    )
    after = hoststate.HostState(
        sysctls={"kernel/panic": "10"},
        rulesets={"iptables-save": ("*filter", "-A INPUT -j KUBE-FIREWALL", "COMMIT")},
        mounts=("proc /proc proc", "proc /proc proc"),
        cgroups=("pids/a", "pids/ipnc-rn-abc123-node-1"),
        netns=(),
        processes=(),
    )
    assert before.diff(after) == [
        "sysctl kernel.panic: 1 -> 10",
        "iptables-save rule added: -A INPUT -j KUBE-FIREWALL",
        "mount added: proc /proc proc",
        "cgroup added: pids/ipnc-rn-abc123-node-1",
        "netns gone: x",
        "process gone: 10:5 sleep",
    ]
    assert before.diff(before) == []


def test_only_other_runs_and_other_tiers_are_foreign() -> None:
    foreign = hoststate.foreign_to("abc123")
    assert not foreign("cgroup added: memory/ipnc-rn-abc123-node-1")
    assert foreign("cgroup added: memory/ipnc-rn-def456-node-1")
    assert foreign("netns added: ipnc1a2b3c-node")
    assert foreign("cgroup added: pids/ipnc-test-0a1b2c")
    assert foreign("mount added: nsfs /run/netns/ipnc-nft-2244-150fc16de9 nsfs")
    assert not foreign("cgroup added: memory/node-1")
    assert not foreign("sysctl kernel.panic: 1 -> 10")
    assert not foreign("mount added: overlay /tmp/ipnc-rn-abc123/node-1/x overlay")


def test_rulesets_compare_without_counters_and_comments() -> None:
    a = hoststate.normalize_ruleset("# Generated at 10:00\n*nat\n:PREROUTING ACCEPT [5:300]\nCOMMIT\n")
    b = hoststate.normalize_ruleset("# Generated at 11:00\n*nat\n:PREROUTING ACCEPT [9:999]\nCOMMIT\n")
    assert a == b == ("*nat", ":PREROUTING ACCEPT [0:0]", "COMMIT")


def test_a_killed_child_is_reaped_and_no_longer_counts_as_ours() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert hoststate.process_start(child.pid) in hoststate.descendants()
        assert processes.kill_pids([child.pid]) == []
        assert hoststate.process_start(child.pid) is None
        assert all(not p.startswith(f"{child.pid}:") for p in hoststate.descendants())
    finally:
        child.kill()
        child.wait()


# -- artifacts and the chart's image -------------------------------------------------------------------


def test_images_list_is_read_and_missing_images_name_the_script(tmp_path: Path) -> None:
    assert artifacts.parse_images_list("pause.tar localhost/ipnc/pause:1\n\n") == {
        "pause.tar": "localhost/ipnc/pause:1"
    }
    for bad in ("pause.tar", "../x.tar a:1", "x.tar Bad Name"):
        with pytest.raises(ValueError):
            artifacts.parse_images_list(bad)
    (tmp_path / "current").mkdir()
    (tmp_path / "current" / "IMAGES").write_text("pause.tar localhost/ipnc/pause:1\n")
    (tmp_path / "current" / "pause.tar").write_bytes(b"")
    with pytest.raises(artifacts.ArtifactError, match="scripts/build-images"):
        artifacts.images({"IPNC_IMAGES_CACHE": str(tmp_path)})
    found = artifacts.images({"IPNC_IMAGES_CACHE": str(tmp_path)}, required=(artifacts.PAUSE_ARCHIVE,))
    assert found.pause == "localhost/ipnc/pause:1"
    with pytest.raises(artifacts.ArtifactError, match="scripts/build-realnode"):
        artifacts.node_binaries({"IPNC_REALNODE_CACHE": str(tmp_path)})


def test_chart_values_run_everything_from_the_local_image_never_pulled() -> None:
    assert install.split_image("localhost/istio-pod-network-controller:dev") == (
        "localhost/istio-pod-network-controller",
        "dev",
    )
    assert install.split_image("registry:5000/a/b:1.2") == ("registry:5000/a/b", "1.2")
    with pytest.raises(ValueError):
        install.split_image("registry:5000/a/b")
    values = install.image_values("localhost/istio-pod-network-controller:dev")
    assert values["image.pullPolicy"] == values["waiter.image.pullPolicy"] == "Never"


# -- Istio's workloads ---------------------------------------------------------------------------------


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("source", [s for s, _ in workload.SOURCES])
def test_injected_workloads_change_only_images_app_security_and_replicas(
    source: str, injected_dir: Path
) -> None:
    original = workload.load(injected_dir / source)
    images = workload.Images(app="localhost/busybox:1", proxy="localhost/stub:1")
    out = workload.runnable(original, images=images, replicas=3, namespace="ns")
    spec = _pod_spec(out)
    proxy = next(c for c in spec["initContainers"] if c["name"] == workload.ISTIO_PROXY)
    init = next(c for c in spec["initContainers"] if c["name"] == workload.ISTIO_INIT)
    app = spec["containers"][0]
    assert (proxy["image"], proxy["imagePullPolicy"]) == ("localhost/stub:1", "Never")
    assert init == next(c for c in _pod_spec(original)["initContainers"] if c["name"] == workload.ISTIO_INIT)
    assert app["image"] == "localhost/busybox:1" and app["command"][:2] == ["sh", "-c"]
    assert app["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert out["spec"]["replicas"] == 3 and out["metadata"]["namespace"] == "ns"
    # Everything else is istiod's output as it was.
    o = _pod_spec(original)
    assert out["spec"]["template"]["metadata"] == original["spec"]["template"]["metadata"]
    assert {k: v for k, v in spec.items() if k != "securityContext"} == {
        **{k: v for k, v in o.items() if k != "securityContext"},
        "initContainers": spec["initContainers"],
        "containers": spec["containers"],
    }
    for mine, theirs in zip(spec["initContainers"], o["initContainers"], strict=True):
        changed = {"image", "imagePullPolicy"} if theirs["name"] == workload.ISTIO_PROXY else set()
        assert _without(mine, changed) == _without(theirs, changed)
    app_changes = {"image", "imagePullPolicy", "command", "args", "env", "securityContext"}
    assert _without(app, app_changes) == _without(o["containers"][0], app_changes)
    assert original == workload.load(injected_dir / source), "the source is not modified in place"


def _without(container: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in container.items() if k not in keys}


def test_namespace_enforces_restricted_and_opts_in() -> None:
    ns, ca, service = workload.namespace_objects("PEM", namespace="ns")
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels[names.OPT_IN] == names.OPT_IN_VALUE
    assert ca["data"] == {"root-cert.pem": "PEM"} and service["metadata"]["name"] == workload.SERVICE
    probe = workload.webhook_probe("ns")
    assert probe["spec"]["schedulingGates"], "the probe pod is never scheduled"


def test_an_intercepted_reply_names_the_sidecar_the_service_and_the_pod() -> None:
    reply = {
        "server": "istio-proxy",
        "pod": "hello-1",
        "port": 15001,
        "orig": ["10.0.0.9", 80],
        "token": "app:hello-1",
    }
    log = "something\nclient: " + json.dumps(reply) + "\n"
    parsed = workload.client_reply(log)
    assert parsed is not None and workload.intercepted(parsed, pod="hello-1", service_ip="10.0.0.9")
    assert not workload.intercepted({**reply, "orig": None}, pod="hello-1", service_ip="10.0.0.9")
    assert not workload.intercepted({**reply, "port": 80}, pod="hello-1", service_ip="10.0.0.9")
    assert not workload.intercepted({**reply, "token": "app:other"}, pod="hello-1", service_ip="10.0.0.9")
    assert workload.client_reply("client: no reply\n") is None


# -- dev cluster ---------------------------------------------------------------------------------------


def test_dev_cluster_nodes_needs_real_node(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dev.main(["cluster", "--nodes", "2"])
    assert "--nodes needs --real-node" in capsys.readouterr().err
    args = dev.build_parser().parse_args(["cluster", "--real-node", "--nodes", "2"])
    assert args.real_node and args.nodes == 2


# -- what the scenarios end with (realnode/settled.py) ---------------------------------------------

POD_SAVE = """# Generated by iptables-nft-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:CNI-abc - [0:0]
-A PREROUTING -p tcp -m comment --comment istio-pod-network-controller -j ISTIO_INBOUND
-A OUTPUT -p tcp -m comment --comment istio-pod-network-controller -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_OUTPUT -o lo -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A CNI-abc -d 10.244.1.0/24 -j ACCEPT
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
"""

NFT_RULESET = """table ip nat {
\tchain OUTPUT {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp counter jump ISTIO_OUTPUT
\t}
}
table inet istio-proxy-nat {
\tchain output {
\t\ttype nat hook output priority dstnat; policy accept;
\t\tmeta l4proto tcp jump istio-output
\t}
\tchain istio-output {
\t\toifname "lo" return
\t\tmeta l4proto tcp redirect to :15001
\t}
}
"""


def test_own_rules_are_counted_in_iptables_save_and_nft_text() -> None:
    assert settled.own_iptables_rules(POD_SAVE) == 5
    doubled = POD_SAVE.replace("-A ISTIO_INBOUND", "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_INBOUND", 1)
    assert settled.own_iptables_rules(doubled) == 6, "an untagged second jump is a second copy"
    assert settled.own_iptables_rules("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n") == 0
    assert settled.own_nft_rules(NFT_RULESET) == 3
    assert settled.own_nft_rules("table ip nat {\n}\n") == 0
    assert settled.place_of({"mode": "iptables", "backend": "nft"}) == {"iptables/nft", "ip6tables/nft"}
    assert settled.place_of({"mode": "nftables", "backend": "nftables"}) == {"nftables"}


def _pod(uid: str, *, node: str = "node-1", inode: int = 4026532001, rules: int = 5, **detail: Any) -> Any:
    from ipnc_dev.realnode import mesh

    mark = {"netnsInode": inode, "rules": rules, "mode": "iptables", "backend": "nft", "node": node,
            "appliedAt": "2026-01-01T10:00:05.500000Z", **detail}  # fmt: skip
    return mesh.PodView(
        name=f"hello-{uid}", uid=uid, node=node, ip="10.244.1.5", phase="Running", ready=True,
        annotations={names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: json.dumps(mark)},
        init_containers={}, containers={},
    )  # fmt: skip


def _event(uid: str, inode: int, *, reason: str = "Initialized", kind: str = "Normal", count: int = 1,
           at: str = "2026-01-01T10:00:06Z") -> dict[str, Any]:  # fmt: skip
    message = (
        f"redirect rules applied and verified: 5 rules in network namespace {inode} (iptables mode, nft)"
    )
    return {
        "reason": reason, "type": kind, "count": count, "message": message, "lastTimestamp": at,
        "involvedObject": {"uid": uid, "name": f"hello-{uid}"},
        "source": {"component": "istio-pod-network-controller", "host": "node-1"},
    }  # fmt: skip


def _facts(
    pods: list[tuple[Any, int, dict[str, int]]],
    events: list[dict[str, Any]],
    *,
    agent_log: str | None = None,
    counted: int | None = None,
    agent_started: str = "2026-01-01T10:00:00Z",
    processes: int = 1,
    unmeshed: dict[str, dict[str, int]] | None = None,
) -> settled.Facts:
    facts = [
        settled.PodFacts(pod, inode, "", rules, f"pod initialized for network namespace {inode}; proven")
        for pod, inode, rules in pods
    ]
    if agent_log is None:
        agent_log = "\n".join(
            json.dumps({"msg": "pod initialized", "uid": p.uid, "netnsInode": inode}) for p, inode, _ in pods
        )
    if counted is None:
        counted = len(pods)
    agent = settled.AgentFacts(
        "agent-x", "node-1", agent_started, agent_log, f"ipnc_pods_initialized_total {counted}.0\n"
    )
    return settled.Facts(
        pods=facts, agents=[agent], events=events, agent_processes={"node-1": processes},
        nodes=("node-1",), unmeshed=unmeshed or {},
    )  # fmt: skip


def test_a_pod_programmed_once_for_its_sandbox_is_settled() -> None:
    facts = _facts([(_pod("a"), 4026532001, {"iptables/nft": 5})], [_event("a", 4026532001)])
    assert settled.judge(facts, expected_pods=1) == []
    assert settled.judge(facts, expected_pods=2) == ["1 meshed pods, not 2"]


def test_a_mark_for_an_earlier_sandbox_is_not_settled() -> None:
    facts = _facts(
        [(_pod("a", inode=4026532001), 4026532999, {"iptables/nft": 5})], [_event("a", 4026532001)]
    )
    (problem, *_) = settled.judge(facts)
    assert "mark names network namespace 4026532001, its sandbox's is 4026532999" in problem


def test_two_copies_of_the_rules_or_rules_elsewhere_are_not_settled() -> None:
    for rules in ({"iptables/nft": 10}, {"iptables/nft": 5, "iptables/legacy": 5}, {"iptables/legacy": 5}):
        facts = _facts([(_pod("a"), 4026532001, rules)], [_event("a", 4026532001)])
        problems = settled.judge(facts)
        assert len(problems) == 1 and "5 rules of ours wanted" in problems[0], (rules, problems)


def test_initialized_events_one_per_sandbox_unless_its_agent_died_before_posting() -> None:
    pod = (_pod("a"), 4026532001, {"iptables/nft": 5})
    missing = settled.judge(_facts([pod], [], agent_log="", counted=0))
    assert missing == ["hello-a: 0 Initialized Events for network namespace 4026532001, not one"]
    # Marked at 10:00:05.5 by a process that is gone: the agent now running started after that.
    assert (
        settled.judge(_facts([pod], [], agent_log="", counted=0, agent_started="2026-01-01T10:00:09Z")) == []
    )
    doubled = settled.judge(_facts([pod], [_event("a", 4026532001, count=2)]))
    assert any("2 Initialized Events" in p for p in doubled)
    # A pod that is gone is not judged (its Events outlive it).
    gone = [_event("a", 4026532001), _event("z", 4026532001, count=2)]
    assert settled.judge(_facts([pod], gone)) == []


def test_warnings_of_ours_count_from_the_scenario_start() -> None:
    pod = (_pod("a"), 4026532001, {"iptables/nft": 5})
    warning = _event("a", 1, reason="ApplyFailed", kind="Warning", at="2026-01-01T10:00:03Z")
    events = [_event("a", 4026532001), warning]
    since = datetime(2026, 1, 1, 10, 0, 4, tzinfo=UTC)
    assert settled.judge(_facts([pod], events), warnings_since=since) == []
    earlier = datetime(2026, 1, 1, 10, 0, 2, tzinfo=UTC)
    (problem,) = settled.judge(_facts([pod], events), warnings_since=earlier)
    assert problem.startswith("Warning ApplyFailed on hello-a")


def test_agent_counter_processes_and_unmeshed_pods_are_judged() -> None:
    pod = (_pod("a"), 4026532001, {"iptables/nft": 5})
    events = [_event("a", 4026532001)]
    assert any("ipnc_pods_initialized_total 2" in p for p in settled.judge(_facts([pod], events, counted=2)))
    assert settled.judge(_facts([pod], events, processes=2)) == ["node-1: 2 agent processes, not one"]
    unmeshed = {"plain (node-1)": {"iptables/nft": 2, "nftables": 0}}
    (problem,) = settled.judge(_facts([pod], events, unmeshed=unmeshed))
    assert problem.startswith("plain (node-1) did not opt in") and "iptables/nft 2" in problem
    lines = [
        "not json",
        json.dumps({"msg": "pod initialized", "uid": "a", "netnsInode": 7}),
        json.dumps({"msg": "pod re-checked: rules intact", "uid": "b", "netnsInode": 8}),
    ]
    log = "\n".join(lines)
    assert settled.agent_marks(log) == [("a", 7)]


def test_plain_pods_are_in_a_namespace_that_did_not_opt_in() -> None:
    ns, daemonset = workload.plain_objects("img:1")
    assert names.OPT_IN not in ns["metadata"].get("labels", {})
    assert daemonset["metadata"]["namespace"] == ns["metadata"]["name"] == workload.PLAIN_NAMESPACE
    assert daemonset["kind"] == "DaemonSet", "one on every node, left alone by a drain"
    pod = daemonset["spec"]["template"]
    assert names.OPT_IN not in pod["metadata"]["labels"]
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"


def test_a_restarted_program_runs_again_under_a_new_name(tmp_path: Path) -> None:
    from ipnc_dev.realnode import RealCluster

    cluster = RealCluster(state_parent=tmp_path)
    cluster.state.mkdir()
    first = cluster._spawn("sleeper", ["sleep", "30"], env={"A": "1", "PATH": "/usr/bin:/bin"})
    try:
        second = cluster._restart(first)
        third = cluster._restart(second)
        assert first.exited() is not None and second.exited() is not None and third.exited() is None
        assert (second.name, third.name) == ("sleeper#2", "sleeper#3")
        assert third.argv == first.argv and third.env == {"A": "1", "PATH": "/usr/bin:/bin"}
    finally:
        processes.stop_all([p for p in cluster._procs.values()])
