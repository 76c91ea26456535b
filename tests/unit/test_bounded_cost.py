"""Whatever a pod hands us costs time linear in its size: each parser is timed on an input and on
one 20 times larger, in the same run, and the ratio must stay far below the 400 that quadratic
code gives (argparse took 15 s on 28,000 repeated options). The limits are raised for the larger
inputs so that the parsers themselves are measured, not the early refusal; the refusal itself is
timed too, on the input that used to take seconds.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from istio_pod_network_controller import names
from istio_pod_network_controller.bounded import BoundedJsonError, loads_bounded
from istio_pod_network_controller.inject import Denied, WaiterSettings, mutate_pod
from istio_pod_network_controller.podinfo import format_annotations, go_quote, parse_annotations
from istio_pod_network_controller.spec import parse_flags, spec_from_pod
from istio_pod_network_controller.spec.errors import LimitError
from istio_pod_network_controller.spec.manifest import load_pod, read_documents
from istio_pod_network_controller.spec.pod import ANN_EXCLUDE_CIDRS, ANN_IPTABLES_ARGS

SCALE = 20
# Linear code measures about 20 here (a little more when a larger input leaves the CPU caches);
# quadratic code measures about 400.
MAX_RATIO = 60
REPEATS = 9

NORMAL_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
               "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]  # fmt: skip


def best_time(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """The least of several timings: the one least disturbed by whatever else runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def assert_linear(make_input: Callable[[int], Any], work: Callable[[Any], object], base: int) -> None:
    small, large = make_input(base), make_input(base * SCALE)
    work(small)  # warm up: imports, regex compilation, caches
    # Interleaved, best of each: a burst of load elsewhere on the machine weighs on both sizes
    # alike instead of on one of them.
    best_small = best_large = float("inf")
    for _ in range(REPEATS):
        best_large = min(best_large, best_time(lambda: work(large), repeats=1))
        best_small = min(best_small, best_time(lambda: work(small), repeats=1))
    ratio = best_large / best_small
    assert ratio < MAX_RATIO, f"{SCALE}x the input took {ratio:.0f}x the time"


def sidecar_pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
    }


def repeated_d(repeats: int) -> list[str]:
    return NORMAL_ARGS + ["-d", "1"] * repeats


@pytest.fixture
def unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits far above the inputs below, so that the parsers do all their work."""
    big = 10**9
    monkeypatch.setattr("istio_pod_network_controller.spec.flags.MAX_ARGS", big)
    monkeypatch.setattr("istio_pod_network_controller.spec.flags.MAX_ARG_BYTES", big)
    monkeypatch.setattr("istio_pod_network_controller.spec.pod.MAX_IPTABLES_ARGS_ANNOTATION_BYTES", big)
    monkeypatch.setattr("istio_pod_network_controller.spec.pod.MAX_ANNOTATION_VALUE_BYTES", big)
    monkeypatch.setattr("istio_pod_network_controller.spec.values.MAX_LIST_ITEMS", big)


# -- istio-iptables arguments --------------------------------------------------------------------


@pytest.mark.usefixtures("unlimited")
def test_repeated_options_in_the_iptables_args_annotation_cost_linear_time() -> None:
    def make(repeats: int) -> dict[str, Any]:
        return sidecar_pod({ANN_IPTABLES_ARGS: json.dumps(repeated_d(repeats), separators=(",", ":"))})

    assert_linear(make, spec_from_pod, base=1000)


@pytest.mark.usefixtures("unlimited")
def test_repeated_options_on_the_command_line_reader_cost_linear_time() -> None:
    # Every flag repeated, values and all: each spelling the reader knows takes its turn.
    def make(repeats: int) -> list[str]:
        return repeated_d(repeats)[1:] + ["--redirect-dns", "-nf", "--envoy-port=15001"] * repeats

    assert_linear(make, parse_flags, base=500)


@pytest.mark.usefixtures("unlimited")
def test_a_long_excluded_cidr_list_costs_linear_time() -> None:
    def make(count: int) -> dict[str, Any]:
        cidrs = ",".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(count))
        return sidecar_pod({ANN_EXCLUDE_CIDRS: cidrs})

    assert_linear(make, spec_from_pod, base=200)


@pytest.mark.usefixtures("unlimited")
def test_a_long_port_list_flag_costs_linear_time() -> None:
    def make(count: int) -> list[str]:
        return ["-b", "*", "-d", ",".join(str(1 + i % 65535) for i in range(count))]

    assert_linear(make, parse_flags, base=1000)


def test_the_hostile_annotation_that_took_seconds_is_refused_at_once() -> None:
    hostile = sidecar_pod({ANN_IPTABLES_ARGS: json.dumps(repeated_d(28_000), separators=(",", ":"))})
    normal = sidecar_pod({ANN_IPTABLES_ARGS: json.dumps(NORMAL_ARGS)})
    with pytest.raises(LimitError, match=r"56018 arguments, more than the limit of 256"):
        spec_from_pod(hostile)

    def refuse() -> None:
        with pytest.raises(LimitError):
            spec_from_pod(hostile)

    # Refusing 252 KB costs about its JSON decoding: some 50 times a real pod's arguments here,
    # where parsing it took 300,000 times as long.
    assert best_time(refuse) / best_time(lambda: spec_from_pod(normal)) < 400


def test_the_webhook_denies_a_hostile_istio_init_quickly(injected_dir: Path) -> None:
    pod = load_pod(str(injected_dir / "hello.yaml.injected"))
    pod["metadata"].setdefault("namespace", "shop")
    pod["metadata"].setdefault("annotations", {})[names.OPT_IN] = "true"
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    init["args"] = init["args"] + ["-d", "1"] * 24_000
    start = time.perf_counter()
    result = mutate_pod(pod, None, WaiterSettings(image="registry.example/ipnc:1.0"))
    elapsed = time.perf_counter() - start
    assert isinstance(result, Denied), result
    assert "istio-init args: " in result.message and "more than the limit of 256" in result.message
    # Not an absolute bound on the machine: a bound on how the answer was reached. The quadratic
    # parser needed about 10,000 times longer than one real pod; a refusal, a few times.
    real = load_pod(str(injected_dir / "hello.yaml.injected"))
    real["metadata"].setdefault("annotations", {})[names.OPT_IN] = "true"
    real["metadata"]["namespace"] = "shop"
    once = best_time(lambda: mutate_pod(real, None, WaiterSettings(image="registry.example/ipnc:1.0")))
    assert elapsed / once < 400


# -- the waiter's podinfo file -------------------------------------------------------------------


def test_a_podinfo_file_of_many_lines_costs_linear_time() -> None:
    def make(lines: int) -> bytes:
        return format_annotations({f"example.com/key-{i:06d}": f"value {i}" for i in range(lines)}).encode()

    assert_linear(make, parse_annotations, base=1000)


@pytest.mark.parametrize(
    "unit",
    ["x", "\\n", "\\x7f", "\\u263a", "\\377", "é", "\U0001f600", '\\"', "\xff"],
    ids=["plain", "escape", "hex", "unicode-escape", "octal", "utf8", "astral", "quote", "invalid-utf8"],
)
def test_a_long_podinfo_value_costs_linear_time(unit: str) -> None:
    def make(repeats: int) -> bytes:
        raw = unit.encode("latin-1") if unit == "\xff" else unit.encode()
        return b'k="' + raw * repeats + b'"'

    # The largest input stays under the file's 1 MiB bound.
    assert_linear(make, parse_annotations, base=2000)


def test_a_quoted_podinfo_value_round_trips_at_linear_cost() -> None:
    def make(repeats: int) -> bytes:
        return ("k=" + go_quote('a\n"é\x00' * repeats)).encode()

    assert_linear(make, parse_annotations, base=2000)


# -- JSON and manifests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda n: json.dumps([{"a": [1, "x"], "b": {"c": None}}] * n),
        lambda n: json.dumps(['\\"[{' * 10] * n),  # brackets and escapes inside strings
        lambda n: '"' + '\\"' * n * 10,  # one string that never ends: no backtracking
        lambda n: '["' * n * 5,  # stray quotes that open strings, never closed
        lambda n: "[" * 60 + "]" * 60 + " " * n * 40,
    ],
    ids=["objects", "escaped-brackets", "unterminated-string", "stray-quotes", "whitespace"],
)
def test_bounded_json_costs_linear_time(make: Callable[[int], str]) -> None:
    def work(text: str) -> None:
        with contextlib.suppress(BoundedJsonError):
            loads_bounded(text, max_bytes=10**9)

    assert_linear(make, work, base=500)


def test_a_yaml_manifest_costs_linear_time(tmp_path: Path) -> None:
    def make(items: int) -> str:
        path = tmp_path / f"pod-{items}.yaml"
        path.write_text("kind: Pod\nmetadata:\n  annotations:\n" + "".join(
            f"    a{i}: &x{i} [{i}, {{b: c}}]\n" for i in range(items)
        ))  # fmt: skip
        return str(path)

    assert_linear(make, read_documents, base=100)
