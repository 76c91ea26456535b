"""The real-node benchmark's pure parts: Istio's privileged path is the same pod as ours but for
its namespace and istio-init's image, and the node's timestamps are read to the nanosecond."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ipnc_dev.realnode import istioinit, workload
from istio_pod_network_controller import names

BENCH = Path(__file__).resolve().parents[2] / "bench" / "realnode.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_realnode", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _pod(injected_dir: Path, namespace: str) -> dict[str, Any]:
    deployment = workload.load(injected_dir / "hello.yaml.injected")
    images = workload.Images(app="busybox:1", proxy="stub:1")
    runnable = workload.runnable(deployment, images=images, replicas=1, namespace=namespace)
    return istioinit.pod_of(runnable, namespace=namespace, generate_name="p-")


def test_istio_path_namespace_allows_privileged_pods_and_is_not_opted_in() -> None:
    (ns,) = [o for o in istioinit.namespace_objects("CA", namespace="x") if o["kind"] == "Namespace"]
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert names.OPT_IN not in labels


def test_istio_path_pod_differs_only_in_istio_inits_image(injected_dir: Path) -> None:
    ours = istioinit.without_resources(_pod(injected_dir, "a"))
    theirs = istioinit.with_istio_init(ours, image="localhost/ipnc/istio-init:1")
    init = next(c for c in theirs["spec"]["initContainers"] if c["name"] == "istio-init")
    assert (init.pop("image"), init.pop("imagePullPolicy")) == ("localhost/ipnc/istio-init:1", "Never")
    original = next(c for c in ours["spec"]["initContainers"] if c["name"] == "istio-init")
    assert init == {k: v for k, v in original.items() if k != "image"}
    assert sorted(init["securityContext"]["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert istioinit.istio_init_args(theirs)[:3] == ["istio-iptables", "-p", "15001"]
    assert all("resources" not in c for c in ours["spec"]["initContainers"] + ours["spec"]["containers"])
    assert ours["metadata"]["annotations"] == _pod(injected_dir, "a")["metadata"]["annotations"]


def test_a_pod_without_istio_init_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one istio-init"):
        istioinit.with_istio_init({"spec": {"initContainers": []}}, image="x")


def test_node_times_keep_their_nanoseconds() -> None:
    bench = _bench()
    a = bench.epoch("2026-11-27T09:04:00.000000001Z")
    b = bench.epoch("2026-11-27T09:04:00.250000001Z")
    assert round((b - a) * 1000, 3) == 250.0
    assert bench.epoch("2026-11-27T10:04:00.5+01:00") == bench.epoch("2026-11-27T09:04:00.5Z")
    with pytest.raises(ValueError):
        bench.epoch("yesterday")


def test_agent_marks_come_from_its_log_lines() -> None:
    bench = _bench()
    line = json.dumps({"msg": "pod initialized", "pod": "bench-ours/ours-1"})
    text = (
        f"2026-11-27T09:04:00.100Z stderr F {line}\n"
        "2026-11-27T09:04:00.200Z stderr F not json\n"
        f"2026-11-27T09:04:01.100Z stderr F {line}\n"
        "garbage\n"
    )
    marks = bench.agent_marks(bench.cri_lines(text))
    assert marks == {"bench-ours/ours-1": bench.epoch("2026-11-27T09:04:00.100Z")}


def test_percentiles_are_nearest_rank() -> None:
    bench = _bench()
    samples = [float(v) for v in range(1, 101)]
    assert [bench.percentile(samples, q) for q in (0.5, 0.95, 0.99, 1.0)] == [50.0, 95.0, 99.0, 100.0]
    assert bench.percentile([7.0], 0.99) == 7.0


def test_steps_and_verdict_compare_the_two_paths_in_one_run() -> None:
    bench = _bench()
    ours = bench.Sample("ours", "sequential", "o", "u", 100.0, 100.5, 100.4, 101.5, 101.6, 0)
    slow = bench.Sample("ours", "sequential", "s", "u", 100.0, 100.5, 100.6, 106.0, 106.1, 0)
    istio = bench.Sample("istio-init", "sequential", "i", "u", 100.0, 100.5, None, None, 100.8, 0)
    steps = bench.steps([ours], "ours")
    assert steps["init started -> agent mark"] == pytest.approx(-100.0)  # marked before the waiter ran
    assert steps["agent mark -> waiter saw mark"] == pytest.approx(1100.0)
    assert bench.steps([istio], "istio-init") == {
        "created -> init started": pytest.approx(500.0),
        "init started -> init exited": pytest.approx(300.0),
    }
    samples = [ours, slow, istio]
    verdict = bench.verdict(bench.summarize(samples), samples)["sequential"]
    assert verdict["p50_minus_istio_init_ms"] == pytest.approx(800.0)
    assert verdict["ours_over_5s"] == 1 and not verdict["max_goal_met"] and not verdict["p50_goal_met"]


def test_report_prints_the_table_and_ends_with_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    bench = _bench()
    samples = [
        bench.Sample("ours", mode, "o", "u", 100.0, 100.5, 100.6, 101.5, 101.6, 0)
        for mode in ("sequential", "bursts of 20")
    ] + [
        bench.Sample("istio-init", mode, "i", "u", 100.0, 100.5, None, None, 100.8, 0)
        for mode in ("sequential", "bursts of 20")
    ]
    bench.report(samples, pods=1, burst=20, started=datetime.now(UTC), seconds=60.0, load_before="1 2 3")
    lines = capsys.readouterr().out.splitlines()
    assert any("sequential     ours        waiter saw mark" in line for line in lines), lines
    last = json.loads(lines[-1])
    assert last["results"]["bursts of 20"]["istio-init"]["init exited"]["p50"] == pytest.approx(800.0)
    assert last["verdict"]["sequential"]["p50_minus_istio_init_ms"] == pytest.approx(800.0)
