"""Every bad value gets exit status 2, one line on stderr naming the input, nothing on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from istio_pod_network_controller.cli import main
from istio_pod_network_controller.spec.limits import (
    MAX_ANNOTATION_VALUE_BYTES,
    MAX_ARG_BYTES,
    MAX_ARGS,
    MAX_IPTABLES_ARGS_ANNOTATION_BYTES,
    MAX_IPTABLES_ARGS_DEPTH,
    MAX_LIST_ITEMS,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
)

INJECTION = "\n-A OUTPUT -j DROP"

BAD_FLAGS = [
    (["-p", "010"], "-p"),
    (["-p", ""], "-p"),
    (["-z", " "], "-z"),
    (["-e", ""], "-e"),
    (["-b", " "], "-b"),
    (["-b", "80, "], "-b"),
    (["-b", " *"], "-b"),
    (["-b", "0x50"], "-b"),
    (["-b", "http"], "-b"),
    (["-b", "8010:8000"], "-b"),
    (["-b", "8000-"], "-b"),
    (["-i", "10.0.0.0/08"], "-i"),
    (["-i", " 10.0.0.0/8"], "-i"),
    (["-c", "e+th"], "-c"),
    (["-m", "tproxy"], "-m"),
    (["-m", " TPROXY"], "-m"),
    (["-m", "TPROXY", "-t", "1338"], "-t"),
    (["-m", "TPROXY", "-r", "254"], "-r"),
    (["-t", "0x539"], "-t"),
    (["-u", " "], "-u"),
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
    "traffic.sidecar.istio.io/includeInboundPorts": ["010", "65536", "80;ls", "8O", " "],
    "traffic.sidecar.istio.io/excludeInboundPorts": ["*", "010"],
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


# -- limits: every bound crossed is exit 2, one line naming the input and the bound ---------------

ARGS_ANNOTATION = "pod-network-controller.istio.io/iptables-args"
EXCLUDE_CIDRS = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ISTIO_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-b", "*"]
MANY_CIDRS = ",".join(f"10.0.{i // 256}.{i % 256}/32" for i in range(MAX_LIST_ITEMS + 1))
# 252 KB, under the size limit: the arguments are counted before any is parsed.
HOSTILE_ARGS = json.dumps([*ISTIO_ARGS, *["-d", "1"] * 28_000], separators=(",", ":"))
OVERSIZED_ARGS = json.dumps([*ISTIO_ARGS, "--log_output_level=" + "x" * 300_000])
LONG_VALUE = " " * (MAX_ARG_BYTES + 1)


def with_istio_init(args: list[str]) -> dict[str, object]:
    pod = sidecar_pod({})
    pod["spec"]["initContainers"] = [{"name": "istio-init", "args": args}]  # type: ignore[index]
    return pod


def over(size: int, unit: str, limit: int) -> str:
    return f"{size} {unit}, more than the limit of {limit}"


LIMIT_PODS = {
    "annotation-arguments": (
        sidecar_pod({ARGS_ANNOTATION: HOSTILE_ARGS}),
        f"annotation {ARGS_ANNOTATION}: {over(56011, 'arguments', MAX_ARGS)}",
    ),
    "istio-init-arguments": (
        with_istio_init([*ISTIO_ARGS, *["-d", "1"] * 200]),
        f"istio-init args: {over(411, 'arguments', MAX_ARGS)}",
    ),
    "annotation-bytes": (
        sidecar_pod({ARGS_ANNOTATION: OVERSIZED_ARGS}),
        f"{ARGS_ANNOTATION}: {over(len(OVERSIZED_ARGS), 'bytes', MAX_IPTABLES_ARGS_ANNOTATION_BYTES)}",
    ),
    "annotation-nesting": (
        sidecar_pod({ARGS_ANNOTATION: '[["-p", "15001"]]'}),
        f'{ARGS_ANNOTATION}: invalid value \'[["-p", "15001"]]\': not a JSON list of strings: '
        f"the value is nested 2 levels deep, more than the limit of {MAX_IPTABLES_ARGS_DEPTH}",
    ),
    "argument-bytes": (
        sidecar_pod({ARGS_ANNOTATION: json.dumps([*ISTIO_ARGS, "-x", LONG_VALUE])}),
        f"annotation {ARGS_ANNOTATION}: -x: {over(MAX_ARG_BYTES + 1, 'bytes', MAX_ARG_BYTES)}",
    ),
    "argument-items": (
        with_istio_init([*ISTIO_ARGS, "-x", MANY_CIDRS]),
        f"istio-init args: -x: {over(MAX_LIST_ITEMS + 1, 'items', MAX_LIST_ITEMS)}",
    ),
    "traffic-annotation-bytes": (
        sidecar_pod({EXCLUDE_CIDRS: LONG_VALUE}),
        f"{EXCLUDE_CIDRS}: {over(MAX_ARG_BYTES + 1, 'bytes', MAX_ANNOTATION_VALUE_BYTES)}",
    ),
    "traffic-annotation-items": (
        sidecar_pod({EXCLUDE_CIDRS: MANY_CIDRS}),
        f"{EXCLUDE_CIDRS}: {over(MAX_LIST_ITEMS + 1, 'items', MAX_LIST_ITEMS)}",
    ),
    "traffic-annotation-ports": (
        sidecar_pod({"traffic.sidecar.istio.io/excludeInboundPorts": "80," * (MAX_LIST_ITEMS + 1)}),
        f"traffic.sidecar.istio.io/excludeInboundPorts: {over(MAX_LIST_ITEMS + 1, 'items', MAX_LIST_ITEMS)}",
    ),
}


@pytest.mark.parametrize(("pod_doc", "message"), LIMIT_PODS.values(), ids=LIMIT_PODS.keys())
def test_a_pod_over_a_limit_is_refused_with_one_line_naming_the_input_and_the_limit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pod_doc: dict[str, object], message: str
) -> None:
    pod = tmp_path / "pod.json"
    pod.write_text(json.dumps(pod_doc))
    code, out, err = run(capsys, ["rules", "--pod", str(pod)])
    assert (code, out) == (2, "")
    assert err == f"istio-pod-network-controller rules: {message}\n"


@pytest.mark.parametrize(("command", "extra"), [("rules", 0), ("apply", 2)])
def test_a_command_line_over_the_argument_limit_is_refused(
    capsys: pytest.CaptureFixture[str], command: str, extra: int
) -> None:
    where = ["--netns", "/x"] if command == "apply" else []
    code, out, err = run(capsys, [command, *where, *(["-d", "1"] * 150)])
    assert (code, out) == (2, "")
    counted = over(300 + extra, "arguments", MAX_ARGS)
    assert err == f"istio-pod-network-controller {command}: command line: {counted}\n"


def alias_bomb(levels: int) -> str:
    """Each line names the one before nine times: 9**levels items from a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


DEEP = f"nested more than the limit of {MAX_MANIFEST_DEPTH} levels deep"
MANIFESTS = {
    "too-large": (
        "kind: Pod\n" + "# padding\n" * (MAX_MANIFEST_BYTES // 10),
        f"is larger than the limit of {MAX_MANIFEST_BYTES} bytes",
    ),
    "yaml-alias": (
        "kind: Pod\nmetadata: &m {name: p}\nspec: {template: {metadata: *m}}\n",
        "line 3: aliases (*name) are not accepted",
    ),
    "yaml-alias-bomb": (alias_bomb(9), "line 2: aliases (*name) are not accepted"),
    "yaml-deep-block": (
        "".join("  " * i + "- \n" for i in range(1000)),
        f"line {MAX_MANIFEST_DEPTH + 1}: {DEEP}",
    ),
    "yaml-deep-flow": ("kind: Pod\nx: " + "[" * 70 + "]" * 70, f"line 2: {DEEP}"),
    "json-deep": (
        '{"kind": "Pod", "x": ' + "[" * 10_000 + "]" * 10_000 + "}",
        f"is nested 10001 levels deep, more than the limit of {MAX_MANIFEST_DEPTH}",
    ),
    "yaml-huge-int": ("kind: Pod\nx: " + "1" * 10_000 + "\n", "is neither JSON nor YAML"),
    "not-utf8": ("kind: Pod\nx: \udcff\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize(("text", "complaint"), MANIFESTS.values(), ids=MANIFESTS.keys())
def test_a_hostile_manifest_is_refused_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, complaint: str
) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_bytes(text.encode("utf-8", "surrogateescape"))
    code, out, err = run(capsys, ["rules", "--pod", str(pod)])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and str(pod) in err and complaint in err, err


def test_yaml_anchors_without_aliases_are_fine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_text("kind: Pod\nmetadata: &m {name: p}\nspec:\n  containers: [{name: istio-proxy}]\n")
    code, out, _ = run(capsys, ["rules", "--pod", str(pod)])
    assert code == 0 and "ISTIO_INBOUND" in out
