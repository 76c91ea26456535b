"""The waiter's exit line names the mode the agent wrote in its detail, and only a known one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipnc_dev.podinfo_volume import write_podinfo
from istio_pod_network_controller import names
from istio_pod_network_controller.waiter import Options, netns_inode, run


def exit_line(tmp_path: Path, **detail: object) -> str:
    written = {"netnsInode": netns_inode(), "rulesetSha256": "0123456789abcdef", **detail}
    path = write_podinfo(tmp_path, {names.STATUS: "initialized", names.DETAIL: json.dumps(written)})
    code, line = run(Options(file=str(path), timeout=5), log=lambda _: None)
    assert code == 0, line
    return line


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_exit_line_names_the_mode(tmp_path: Path, mode: str) -> None:
    assert exit_line(tmp_path, mode=mode).endswith(f"({mode} mode, ruleset 0123456789ab)")


@pytest.mark.parametrize("mode", ["", "NFTABLES", "x" * 300, 7, None, ["nftables"]])
def test_an_unknown_mode_is_not_repeated(tmp_path: Path, mode: object) -> None:
    assert exit_line(tmp_path, mode=mode).endswith(" (ruleset 0123456789ab)")
