#!/usr/bin/env python3
"""Benchmark: build the redirect spec from a pod and render its rulesets (pure, no kernel).

Prints the median and p95 over many runs for two pods: Istio's injected hello pod (istio-init
args) and a CNI-mode pod (annotations), first for the rules alone, then with the ruleset's
SHA-256 (which prints the restore texts), as the agent computes both for every pod it plans.
Goal: median under 1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from istio_pod_network_controller.render import render
from istio_pod_network_controller.spec import spec_from_pod

SIDECAR_ARGS = [
    *("istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", ""),
    *("-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"),
]


def pods() -> dict[str, dict[str, Any]]:
    containers = [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]
    return {
        "istio-init args": {
            "kind": "Pod",
            "metadata": {"name": "hello", "annotations": {}},
            "spec": {
                "initContainers": [{"name": "istio-init", "args": SIDECAR_ARGS}],
                "containers": containers,
            },
        },
        "CNI annotations": {
            "kind": "Pod",
            "metadata": {"name": "hello", "annotations": {"sidecar.istio.io/interceptionMode": "REDIRECT"}},
            "spec": {"containers": containers},
        },
    }


def measure(pod: dict[str, Any], runs: int, *, digest: bool = False) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        ruleset = render(spec_from_pod(pod))
        if digest:
            ruleset.sha256()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    args = parser.parse_args()
    for digest, what in ((False, "render"), (True, "render + sha256")):
        for name, pod in pods().items():
            measure(pod, 200, digest=digest)  # warm up
            samples = sorted(measure(pod, args.runs, digest=digest))
            p95 = samples[int(len(samples) * 0.95)]
            print(f"{what} from pod ({name}): median {statistics.median(samples):.3f} ms, "
                  f"p95 {p95:.3f} ms, runs {args.runs} (goal: median < 1 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
