"""The plumbing every subcommand shares: argument types, one-line usage errors, excluded namespaces."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from istio_pod_network_controller.cli import main
from istio_pod_network_controller.commands.common import (
    count,
    excluded_namespaces,
    port,
    positive_seconds,
    seconds,
)
from istio_pod_network_controller.commands.run import listen_address


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [(seconds, "0", 0.0), (seconds, "2.5", 2.5), (positive_seconds, "0.1", 0.1), (count, "7", 7),
     (port, "0", 0), (port, "65535", 65535)],
)  # fmt: skip
def test_arguments_in_range_are_read(parse: Callable[[str], object], text: str, value: object) -> None:
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text"),
    [(seconds, "-1"), (seconds, "nan"), (seconds, "inf"), (seconds, "1e10"), (seconds, "soon"),
     (positive_seconds, "0"), (count, "0"), (count, "1.5"), (count, "-3"), (count, "٣"), (count, "9" * 30),
     (port, "65536"), (port, "http"), (port, "")],
)  # fmt: skip
def test_arguments_out_of_range_are_refused_quoting_them(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("\\", "\\\\")):
        parse(text)


def test_listen_address_takes_host_and_port() -> None:
    assert listen_address("[::]:15300") == ("::", 15300)
    assert listen_address(":8080") == ("0.0.0.0", 8080)
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        listen_address("8080")


def test_excluded_namespaces_add_kube_system_and_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "ipnc")
    assert excluded_namespaces(" team-a,,kube-system ,team-b") == ("kube-system", "team-a", "team-b", "ipnc")
    monkeypatch.delenv("POD_NAMESPACE")
    assert excluded_namespaces("") == ("kube-system",)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["run", "--workers", "0"], "run: argument --workers: a whole number above 0: '0'"),
        (["run", "--listen-address", "host"], "run: argument --listen-address: expected HOST:PORT"),
        (["run", "--bogus"], "run: unrecognized arguments: --bogus"),
        (["init", "--timeout", "0"], "init: argument --timeout: must be more than 0 seconds: '0'"),
        (["rules", "--output", "xml"], "rules: argument --output: invalid choice: 'xml'"),
        (["apply", "--pid"], "apply: argument --pid: expected one argument"),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"istio-pod-network-controller {complaint}")


@pytest.mark.parametrize(
    "manifest",
    [
        "kind: Deployment\nmetadata: 5\nspec: {template: {metadata: 7, spec: {containers: [{name: a}]}}}\n",
        "kind: Deployment\nmetadata: {namespace: x}\nspec: {template: {metadata: [1], spec: 5}}\n",
        "kind: CronJob\nspec: {jobTemplate: [1]}\n",
        "kind: Pod\nmetadata: [1]\nspec: {containers: 5, initContainers: {a: 1}}\nstatus: 7\n",
    ],
)
def test_a_manifest_with_fields_of_the_wrong_type_gets_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, manifest: str
) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text(manifest)
    assert main(["rules", "--pod", str(path)]) in (2, 3)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
