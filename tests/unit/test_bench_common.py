"""The benchmarks' pure helpers: what they count as the controller's requests and bytes decides
every per-pod figure they print."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = _load()


def _request(verb: str, resource: str, value: int, *, sub: str = "", scope: str = "namespace") -> str:
    labels = f'code="200",group="",resource="{resource}",scope="{scope}",subresource="{sub}",verb="{verb}"'
    return f"apiserver_request_total{{{labels}}} {value}"


METRICS = "\n".join(
    [
        "# HELP apiserver_request_total [STABLE] Counter of apiserver requests",
        "# TYPE apiserver_request_total counter",
        _request("POST", "pods", 200),  # the benchmark creating pods
        _request("PATCH", "pods", 200, sub="status"),  # ... and reporting their IPs
        _request("PATCH", "pods", 199),
        _request("PATCH", "pods", 1).replace('code="200"', 'code="409"'),
        _request("POST", "events", 200),
        _request("WATCH", "pods", 1, scope="cluster"),
        _request("WATCH", "pods", 1),  # the benchmark's own watch of its namespace
        _request("PUT", "leases", 3),  # the API server's own loop
        'apiserver_request_total{code="200",resource="",scope="",subresource="/readyz",verb="GET"} 5',
        'apiserver_watch_events_sizes_sum{group="",resource="pods",version="v1"} 6000',
        'apiserver_watch_events_sizes_sum{group="",resource="namespaces",version="v1"} 50',
        'apiserver_watch_events_total{group="",resource="pods",version="v1"} 12',
        'apiserver_storage_objects{resource="pods"} 200',
        'apiserver_response_sizes_sum{resource="pods",scope="cluster",verb="LIST"} 9000',
        'apiserver_response_sizes_sum{resource="pods",scope="namespace",verb="LIST"} 1000',
        'apiserver_response_sizes_sum{resource="pods",scope="namespace",verb="GET"} 7',
    ]
)


def test_controller_requests_leave_out_the_benchmarks_own_and_the_servers_loops() -> None:
    samples = common.parse_metrics(METRICS)
    got = common.controller_requests(samples)
    assert got == {"PATCH pods": 200.0, "POST events": 200.0, "WATCH pods": 1.0}


def test_delta_counts_only_what_grew() -> None:
    before = common.parse_metrics(METRICS)
    after_text = METRICS.replace('verb="PATCH"} 199', 'verb="PATCH"} 249')
    grown = common.delta(common.parse_metrics(after_text), before)
    assert common.controller_requests(grown) == {"PATCH pods": 50.0}


def test_watch_bytes_and_events_are_per_resource() -> None:
    samples = common.parse_metrics(METRICS)
    assert common.watch_bytes(samples) == 6000
    assert common.watch_bytes(samples, "namespaces") == 50
    assert common.watch_events(samples) == 12


def test_list_bytes_sum_every_scope_of_one_verb() -> None:
    samples = common.parse_metrics(METRICS)
    assert common.response_bytes(samples, "LIST", "pods") == 10000
    assert common.response_bytes(samples, "LIST", "namespaces") == 0


def test_unwanted_metrics_and_garbage_lines_are_ignored() -> None:
    samples = common.parse_metrics(METRICS + 'apiserver_request_total{verb="GET"} not-a-number\n')
    assert not any(name == "apiserver_storage_objects" for name, _ in samples)
    assert sum(1 for name, _ in samples if name == "apiserver_request_total") == 9


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0), (1.0, 100.0), (0.0, 1.0)],
)
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    assert common.percentile([float(i) for i in range(100, 0, -1)], q) == expected


def test_summary_of_nothing_is_nan_not_an_error() -> None:
    summary = common.Summary.of([])
    assert summary.count == 0 and math.isnan(summary.p50) and math.isnan(summary.max)
