"""Every bad value gets exit status 2, one line on stderr naming the input, nothing on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from istio_pod_network_controller.cli import main

INJECTION = "\n-A OUTPUT -j DROP"

BAD_FLAGS = [
    (["-p", "0"], "-p"),
    (["-p", "65536"], "-p"),
    (["-z", "80;ls"], "-z"),
    (["-b", "8O"], "-b"),
    (["-q", "65536"], "-q"),
    (["-i", "10.0.0.0/33"], "-i"),
    (["-i", "bad"], "-i"),
    (["-x", "*"], "-x"),
    (["-b", "*", "-d", "*"], "-d"),
    (["-c", "eth0\nx"], "-c"),
    (["-c", "eth 0"], "-c"),
    (["-k", "a234567890123456"], "-k"),
    (["-m", "FOO"], "-m"),
    (["-u", "-1"], "-u"),
    (["-u", "abc"], "-u"),
    (["-g", "abc"], "-g"),
    (["-i", "10.0.0.0/8" + INJECTION], "-i"),
    (["-o", "80" + INJECTION], "-o"),
    (["--dns-servers-v4", "1.2.3.4" + INJECTION], "--dns-servers-v4"),
    (["--owner-groups-include", "java" + INJECTION], "--owner-groups-include"),
    (["--frobnicate"], "--frobnicate"),
]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "named"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_value_is_rejected_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, out, err = run(capsys, ["rules", *argv])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert named in err


ANNOTATIONS = {
    "traffic.sidecar.istio.io/includeInboundPorts": ["0", "65536", "80;ls", "8O"],
    "traffic.sidecar.istio.io/excludeInboundPorts": ["*", "0"],
    "traffic.sidecar.istio.io/includeOutboundIPRanges": ["10.0.0.0/33", "bad"],
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": ["*", "bad"],
    "traffic.sidecar.istio.io/excludeOutboundPorts": ["x"],
    "traffic.sidecar.istio.io/includeOutboundPorts": ["*"],
    "traffic.sidecar.istio.io/excludeInterfaces": ["eth0\nx", "eth 0", "a234567890123456"],
    "istio.io/reroute-virtual-interfaces": ["eth0;"],
    "sidecar.istio.io/interceptionMode": ["FOO"],
}
CASES = [(k, val) for k, vals in ANNOTATIONS.items() for val in vals]
CASES += [(k, "1" + INJECTION) for k in ANNOTATIONS if "Ports" in k]
CASES += [(k, "10.0.0.0/8" + INJECTION) for k in ANNOTATIONS if "IPRanges" in k]
CASES += [("traffic.sidecar.istio.io/excludeInterfaces", "eth0" + INJECTION)]


def sidecar_pod(annotations: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]
        },
    }


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_bad_annotation_is_rejected_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str, value: str
) -> None:
    pod = tmp_path / "pod.json"
    pod.write_text(json.dumps(sidecar_pod({key: value})))
    code, out, err = run(capsys, ["rules", "--pod", str(pod)])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert key in err


def test_bad_iptables_args_annotation_names_the_annotation_and_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pod = tmp_path / "pod.json"
    args = json.dumps(["istio-iptables", "-p", "15001", "-u", "abc"])
    pod.write_text(json.dumps(sidecar_pod({"pod-network-controller.istio.io/iptables-args": args})))
    code, _, err = run(capsys, ["rules", "--pod", str(pod)])
    assert code == 2
    assert "pod-network-controller.istio.io/iptables-args" in err and "-u" in err


def test_unreadable_manifest_is_invalid_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, ["rules", "--pod", str(tmp_path / "missing.yaml")])
    assert (code, out) == (2, "")
    assert "missing.yaml" in err
