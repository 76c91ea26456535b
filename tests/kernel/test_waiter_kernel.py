"""The waiter in a real pod namespace, as an unprivileged UID: it passes on the mark for its own
namespace only, and `--verify` proves the redirect the node side applied (and fails without it),
with the probe the agent planned: nothing the pod writes makes it skip the check or pass unproven
as "proven"."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev import as_pod
from ipnc_dev.netlab import Netlab, Pod
from ipnc_dev.podinfo_volume import write_podinfo
from istio_pod_network_controller import names
from istio_pod_network_controller.node.apply import Applier
from istio_pod_network_controller.node.netns import Netns, netns_cookie
from istio_pod_network_controller.probe import probe_plan
from istio_pod_network_controller.spec import parse_flags, spec_from_pod

from .conftest import SIDECAR, ruleset

pytestmark = pytest.mark.kernel

WAITER_UID = 65532


def run_waiter(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = as_pod.command(netns, WAITER_UID, "init", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


@pytest.fixture
def volume() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ipnc-podinfo-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


@pytest.fixture
def pod(lab: Netlab) -> Pod:
    return lab.add_pod("pod", ipv6=False)


def agents_plan(*extra: str, uid: int = WAITER_UID) -> dict[str, Any]:
    """The plan the agent writes for the default sidecar flags plus ``extra``."""
    return probe_plan(parse_flags([*SIDECAR, *extra]), uid=uid, gid=uid)


def mark(volume: Path, inode: int, *, detail: dict[str, Any] | None = None, **pod_wrote: str) -> Path:
    """The agent's mark (with its plan for the default sidecar, unless ``detail`` says otherwise),
    and whatever else the pod wrote on itself."""
    written = {"netnsInode": inode, "rulesetSha256": "f" * 64, "appliedAt": "2026-01-01T00:00:00Z"}
    written.update({"verify": agents_plan()} if detail is None else detail)
    return write_podinfo(
        volume,
        {
            names.STATUS: names.STATUS_INITIALIZED,
            names.DETAIL: json.dumps(written),
            names.IPTABLES_ARGS: json.dumps(["istio-iptables", *SIDECAR]),
            **pod_wrote,
        },
    )


# What a tenant can write on its own pod, or (without the admission policy) into the mark, to make
# a waiter that trusted it skip the check: the waiter's UID as the proxy's, excluded interfaces,
# excluded ports covering every probe target.
FORGED_ANNOTATIONS = {
    "traffic.sidecar.istio.io/excludeInterfaces": "eth0,lo",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "80,8080,443",
    names.IPTABLES_ARGS: json.dumps(
        ["istio-iptables", *SIDECAR, "-u", "65532", "-o", "80,8080,443", "-c", "eth0"]
    ),
}
FORGED_IDS = {"proxyUids": [WAITER_UID], "proxyGids": [WAITER_UID]}


def test_verify_proves_the_redirect_the_node_side_applied(pod: Pod, applier: Applier, volume: Path) -> None:
    with Netns(pod.path) as ns:
        applier.apply(ns, ruleset())
        path = mark(volume, ns.inode)
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(
        "outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001"
    ), done.stdout


def test_verify_fails_when_the_rules_are_missing(pod: Pod, volume: Path) -> None:
    with Netns(pod.path) as ns:
        path = mark(volume, ns.inode)  # a mark that lies: no rules in the namespace
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify", "--verify-timeout", "1")
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        "istio-pod-network-controller init: redirect check failed: connecting to 192.0.2.1:80"
    )


def test_the_mark_of_another_namespace_does_not_pass(lab: Netlab, pod: Pod, volume: Path) -> None:
    other = lab.add_pod("old-sandbox", ipv6=False)
    with Netns(other.path) as ns:
        path = mark(volume, ns.inode)
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "0.5")
    assert done.returncode == 1
    assert "an earlier sandbox" in done.stderr.splitlines()[-1]


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return (done.stdout or done.stderr).strip().splitlines()[-1]


@pytest.mark.parametrize("forged", ["ids", "annotations", "both"])
def test_what_the_pod_wrote_does_not_spare_a_lying_mark_the_probe(
    pod: Pod, volume: Path, forged: str
) -> None:
    detail = {"verify": agents_plan(), **(FORGED_IDS if forged != "annotations" else {})}
    with Netns(pod.path) as ns:  # no rules in the namespace: the mark lies
        path = mark(volume, ns.inode, detail=detail, **(FORGED_ANNOTATIONS if forged != "ids" else {}))
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify", "--verify-timeout", "1")
    assert done.returncode == 1, done.stdout
    assert "proven" not in done.stdout + done.stderr
    assert last_line(done).startswith(
        "istio-pod-network-controller init: redirect check failed: connecting to 192.0.2.1:80"
    )


def test_the_probe_follows_the_agents_plan_not_the_pods_annotations(
    pod: Pod, applier: Applier, volume: Path
) -> None:
    with Netns(pod.path) as ns:
        applier.apply(ns, ruleset())
        path = mark(volume, ns.inode, detail={"verify": agents_plan(), **FORGED_IDS}, **FORGED_ANNOTATIONS)
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify")
    assert done.returncode == 0, done.stderr
    assert last_line(done).endswith("outbound redirect proven: 192.0.2.1:80 reached the proxy port 15001")


def test_excluded_ports_in_the_applied_spec_move_the_probe_and_it_still_proves(
    pod: Pod, applier: Applier, volume: Path
) -> None:
    with Netns(pod.path) as ns:
        applier.apply(ns, ruleset("-o", "80,15020"))
        path = mark(volume, ns.inode, detail={"verify": agents_plan("-o", "80,15020")})
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify")
    assert done.returncode == 0, done.stderr
    assert last_line(done).endswith("outbound redirect proven: 192.0.2.1:8080 reached the proxy port 15001")


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        (  # the agent's spec excludes interfaces (traffic annotation excludeInterfaces)
            lambda: probe_plan(
                spec_from_pod({
                    "metadata": {"annotations": {"traffic.sidecar.istio.io/excludeInterfaces": "eth1"}},
                    "spec": {"containers": [{"name": "istio-proxy"}]},
                }),
                uid=WAITER_UID, gid=WAITER_UID,
            ),
            "the rules exclude interfaces eth1",
        ),
        (lambda: agents_plan("-o", "80,8080,443,15020"), "the pod's outbound capture covers none of"),
        (lambda: agents_plan("-u", "65532"), "misconfiguration: the waiter runs as UID 65532 / GID 65532"),
        (lambda: agents_plan(uid=65533), "the agent planned the check for UID 65533 / GID 65533"),
    ],
    ids=["excluded-interfaces", "excluded-ports", "waiter-is-the-proxy", "other-ids"],
)  # fmt: skip
def test_a_skip_in_the_agents_plan_passes_but_never_as_proven(
    pod: Pod, volume: Path, plan: Any, reason: str
) -> None:
    with Netns(pod.path) as ns:  # no rules: a probe would fail, so passing shows it was not probed
        path = mark(volume, ns.inode, detail={"verify": plan()})
    done = run_waiter(pod.path, "--file", str(path), "--timeout", "10", "--verify", "--verify-timeout", "1")
    assert done.returncode == 0, done.stderr
    assert "proven" not in done.stdout + done.stderr
    assert last_line(done).endswith(
        "; redirect check skipped (relying on the agent's read-back of the rules)"
    )
    assert f"redirect check skipped: {reason}" in done.stderr


# -- a recreated sandbox, and a router's "network unreachable" --------------------------------


def test_a_mark_for_an_earlier_namespace_with_the_same_number_does_not_pass(pod: Pod, volume: Path) -> None:
    # The kernel hands a namespace's inode number out again once it is gone: only the cookie
    # tells a recreated sandbox from its predecessor.
    with Netns(pod.path) as ns:
        cookie = netns_cookie(ns)
        assert cookie is not None, "this kernel has namespace cookies (5.14+)"
        earlier = mark(volume, ns.inode, detail={"verify": agents_plan(), "netnsCookie": cookie + 1})
    done = run_waiter(pod.path, "--file", str(earlier), "--timeout", "0.5")
    assert done.returncode == 1
    assert "an earlier sandbox whose network namespace had the same number" in done.stderr.splitlines()[-1]
    with Netns(pod.path) as ns:
        ours = mark(volume, ns.inode, detail={"verify": agents_plan(), "netnsCookie": cookie})
    done = run_waiter(pod.path, "--file", str(ours), "--timeout", "5")
    assert done.returncode == 0, done.stderr


@pytest.fixture
def routed_pod() -> Iterator[str]:
    """A pod namespace whose default route leads to a router that has no route to the probe
    address and says so with ICMP "network unreachable" (the real-node harness's nodes do)."""
    tag = os.urandom(3).hex()
    pod_ns, router_ns = f"ipnc-test-{tag}p", f"ipnc-test-{tag}r"
    steps = [
        ["ip", "netns", "add", pod_ns],
        ["ip", "netns", "add", router_ns],
        ["ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "up0", "netns", router_ns],
        ["ip", "-n", pod_ns, "link", "set", "lo", "up"],
        ["ip", "-n", pod_ns, "link", "set", "eth0", "up"],
        ["ip", "-n", pod_ns, "addr", "add", "10.99.0.2/24", "dev", "eth0"],
        ["ip", "-n", pod_ns, "route", "add", "default", "via", "10.99.0.1"],
        ["ip", "-n", router_ns, "link", "set", "up0", "up"],
        ["ip", "-n", router_ns, "addr", "add", "10.99.0.1/24", "dev", "up0"],
        ["ip", "netns", "exec", router_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        # The router has no route to 192.0.2.0/24 at all: it answers ICMP "network unreachable"
        # (an `unreachable` route would answer "host unreachable").
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)  # noqa: S603
        yield f"/run/netns/{pod_ns}"
    finally:
        for name in (pod_ns, router_ns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)  # noqa: S603


def test_a_routers_network_unreachable_is_not_taken_for_an_ipv6_only_pod(
    routed_pod: str, volume: Path
) -> None:
    # No rules: the probe leaves the pod and the router answers "network unreachable". That is
    # an unredirected connection, not a pod without an IPv4 route: the check must fail.
    with Netns(routed_pod) as ns:
        path = mark(volume, ns.inode)
    done = run_waiter(routed_pod, "--file", str(path), "--timeout", "10", "--verify", "--verify-timeout", "2")
    assert done.returncode == 1, done.stdout
    assert "skipped" not in done.stdout + done.stderr
    assert last_line(done).startswith(
        "istio-pod-network-controller init: redirect check failed: connecting to 192.0.2.1:80"
    )
