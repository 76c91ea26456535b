"""The `apply` subcommand end to end: real namespaces, real tables, the documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ipnc_dev.cgroups import KubeletCgroups, mounts
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller import cli
from istio_pod_network_controller.node import tables
from istio_pod_network_controller.node.netns import netns_id_of

pytestmark = pytest.mark.kernel

SIDECAR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object] | None, str]:
    code = cli.main(["apply", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err


def our_rules(path: str) -> list[str]:
    argv = ["nsenter", f"--net={path}", "iptables-nft-save"]
    saved = subprocess.run(argv, capture_output=True, text=True, check=True).stdout  # noqa: S603
    return tables.owned(tables.parse_save(saved)).rule_lines()


def test_apply_by_path_prints_a_verified_summary(lab: Netlab, capsys: pytest.CaptureFixture[str]) -> None:
    path = lab.add_netns("pod")
    code, summary, _ = run(capsys, "--netns", path, "--backend", "nft", *SIDECAR)
    assert code == 0
    assert summary is not None
    assert summary["ok"] is True
    assert summary["inode"] == netns_id_of(path).inode
    assert summary["backend"] == "nft"
    assert isinstance(summary["rules"], int) and summary["rules"] > 10
    assert any("ISTIO_REDIRECT" in line for line in our_rules(path))


def test_apply_by_pod_uid_from_a_manifest(
    lab: Netlab, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if "v2" not in mounts():
        pytest.skip("no cgroup v2 tree mounted")
    pod = lab.add_pod("pod")
    uid = str(uuid.uuid4())
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "uid": uid},
        "spec": {
            "containers": [{"name": "web", "image": "web"}, {"name": "istio-proxy", "image": "proxyv2"}]
        },
        "status": {"podIP": pod.ipv4, "podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}]},
    }
    (tmp_path / "pod.json").write_text(json.dumps(manifest))
    with KubeletCgroups() as cgroups:
        cgroups.place(lab.sleeper(pod.path).pid, uid=uid, container="pause")
        code, summary, err = run(capsys, "--pod", str(tmp_path / "pod.json"), "--backend", "nft")
    assert code == 0, err
    assert summary is not None and summary["inode"] == netns_id_of(pod.path).inode
    assert any("ISTIO_INBOUND" in line for line in our_rules(pod.path))


def test_invalid_flags_exit_2_and_touch_nothing(lab: Netlab, capsys: pytest.CaptureFixture[str]) -> None:
    path = lab.add_netns("pod")
    code, _, err = run(capsys, "--netns", path, *SIDECAR, "-b", "80,http")
    assert code == 2
    assert "-b" in err
    assert our_rules(path) == []


def test_no_way_to_find_the_namespace_is_invalid_input(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *SIDECAR)
    assert code == 2
    assert "--netns" in err


def test_a_missing_namespace_exits_1_naming_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, err = run(capsys, "--netns", f"/run/netns/ipnc-missing-{uuid.uuid4().hex[:6]}", *SIDECAR)
    assert code == 1
    assert summary == {"ok": False, "step": "open netns", "reason": summary["reason"] if summary else None}
    assert "does not exist" in err


def test_the_host_namespace_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, _ = run(capsys, "--pid", str(os.getpid()), *SIDECAR)
    assert code == 1
    assert summary is not None and summary["step"] == "locate"


def our_tables(path: str) -> str:
    argv = ["nsenter", f"--net={path}", "nft", "list", "tables"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout  # noqa: S603


def test_apply_native_nftables_applies_verifies_and_names_the_mode(
    lab: Netlab, capsys: pytest.CaptureFixture[str]
) -> None:
    path = lab.add_netns("pod")
    code, summary, _ = run(capsys, "--native-nftables", "--netns", path, *SIDECAR)
    assert code == 0 and summary is not None
    assert (summary["ok"], summary["mode"], summary["backend"], summary["changed"]) == (
        True, "nftables", "nftables", True,
    )  # fmt: skip
    assert "table inet istio-proxy-nat" in our_tables(path)
    assert our_rules(path) == []  # no iptables rule of ours
    code, summary, _ = run(capsys, "--native-nftables", "--netns", path, *SIDECAR)
    assert code == 0 and summary is not None and summary["changed"] is False


@pytest.mark.parametrize("bad", [["-b", "0x50"], ["-m", "tproxy"], ["-i", "10.0.0.0/08"], ["--frobnicate"]])
def test_apply_native_nftables_refuses_bad_input_and_writes_nothing(
    lab: Netlab, capsys: pytest.CaptureFixture[str], bad: list[str]
) -> None:
    path = lab.add_netns("pod")
    iptables_mode = run(capsys, "--netns", path, *SIDECAR, *bad)
    nft_mode = run(capsys, "--native-nftables", "--netns", path, *SIDECAR, *bad)
    assert nft_mode[0] == iptables_mode[0] == 2
    assert nft_mode[2] == iptables_mode[2] and nft_mode[2].count("\n") == 1
    assert our_tables(path) == "" and our_rules(path) == []
