#!/usr/bin/env python3
"""Benchmark on a real node: pod created -> its first init container's exit, our path beside
Istio's privileged path, in the same run.

One real node (kubelet, containerd, runc: ``ipnc_dev.realnode``) with our chart installed from
our image. The same pod, Istio's injected ``hello`` (stub sidecar, busybox application, no
resource requests so that a burst fits on two cores), goes two ways:

- **ours**: into a ``restricted`` namespace opted in to the controller; the webhook swaps
  istio-init for the waiter, the agent programs the pod's network namespace, hands the mark to
  the waiter inside that namespace (and patches it onto the pod; the kubelet rewrites the
  downward-API file from that), the waiter takes the mark from whichever comes first, proves
  the redirect and exits;
- **istio-init**: into a ``privileged`` namespace that is not opted in; istio-init runs as
  injected (UID 0, NET_ADMIN, NET_RAW) with Istio's real ``istio-iptables`` (the istio-init
  image of ``scripts/build-images``) and writes the rules itself.

``--pods N`` pods of each path one at a time (the two paths alternating), then N of each in
bursts of ``--burst`` (a burst of one path, then one of the other, the order swapped every
round). Every 20 sequential pairs and after every round of bursts, all pods are deleted and the
node is left to settle before the next group, so both paths run on the same load.

Each column is a point in time, as milliseconds after the pod's creation:

- created: the benchmark's clock just before its create call (the API server, the webhook for
  ours, and the scheduler come after it);
- init started: containerd's ``startedAt`` of the first init container (``crictl inspect``,
  nanoseconds): the kubelet has made the sandbox and the network and started it;
- agent mark: the agent's ``pod initialized`` log line, logged right after its mark patch
  returned (the containerd log line's timestamp, nanoseconds): after the hand-off, which comes
  just before the patch; ours only;
- waiter saw mark: the waiter's last log line (``pod initialized for network namespace ...,
  mark handed over by the agent | read from FILE ...; outbound redirect proven``), written when
  it had the mark and had proved the redirect (a few milliseconds); ours only;
- init exited: containerd's ``finishedAt`` of the first init container (nanoseconds).

So the breakdown of ours is kubelet start (created -> init started), agent mark (-> agent
mark), hand-off or kubelet refresh (-> waiter saw mark; negative when the hand-off beat the
patch), waiter exit (-> init exited). The report counts how each waiter had its mark. The API's own
timestamps (creationTimestamp, conditions, container states) have whole seconds only, too
coarse for this. All clocks are this machine's.

Prints a table and ends with one JSON line. Goal: our p50 of init exited within 100 ms of the
istio-init path's, and no pod of ours over 5 s. Run as root, and alone on the machine's real
nodes: ``flock /tmp/ipnc-realnode.lock .venv/bin/python bench/realnode.py --pods 200``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ipnc_dev.realnode import (
    HostChanged,
    RealCluster,
    RealClusterError,
    artifacts,
    install,
    istioinit,
    workload,
)
from ipnc_dev.realnode.processes import wait_until
from istio_pod_network_controller import names

OURS, ISTIO = "ours", "istio-init"
PATHS = (OURS, ISTIO)
NAMESPACES = {OURS: "bench-ours", ISTIO: "bench-istio"}
FIRST_INIT = {OURS: names.WAITER_CONTAINER, ISTIO: workload.ISTIO_INIT}
SEQUENTIAL_GROUP = 20  # sequential pairs between two clean-ups
POLL = 0.1
POD_TIMEOUT = 180.0  # long enough to measure a pod the kubelet refreshes only at its next sync
GONE_TIMEOUT = 180.0
WAITER_SAW_MARK = "pod initialized for network namespace"  # the waiter's exit line
HANDED_OVER = "mark handed over by the agent"  # in that line, when the hand-off brought the mark
SETTLE = 2.0
GOAL_P50_MS = 100.0
GOAL_MAX_MS = 5000.0
POINTS = {
    OURS: ("init started", "agent mark", "waiter saw mark", "init exited"),
    ISTIO: ("init started", "init exited"),
}
SHARED = Path(os.environ.get("IPNC_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


@dataclass
class Sample:
    """One pod: when each point came, in seconds since the epoch."""

    path: str
    mode: str
    name: str
    uid: str
    created: float
    init_started: float | None = None
    agent_mark: float | None = None
    waiter_saw_mark: float | None = None
    init_exited: float | None = None
    exit_code: int | None = None
    container_id: str = ""
    handed_over: bool | None = None  # ours: the mark came by the hand-off (False: by the file)

    def offset_ms(self, point: str) -> float | None:
        at = getattr(self, point.replace(" ", "_"))
        return None if at is None else (at - self.created) * 1000


# -- parsing what the node wrote (pure) --------------------------------------------------------------


def epoch(text: str) -> float:
    """RFC 3339 with up to nanoseconds (containerd's and the CRI log's) -> seconds since the epoch."""
    m = _STAMP.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text[:60]!r}")
    zone = "+00:00" if m[3] == "Z" else m[3]
    whole = datetime.fromisoformat(m[1] + zone).timestamp()
    return whole + (float("0." + m[2]) if m[2] else 0.0)


def cri_lines(text: str) -> list[tuple[float, str]]:
    """A CRI log file (``<time> <stream> <P|F> <text>`` per line) as (time, text) pairs."""
    out: list[tuple[float, str]] = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            with contextlib.suppress(ValueError):
                out.append((epoch(parts[0]), parts[3]))
    return out


def agent_marks(lines: Sequence[tuple[float, str]]) -> dict[str, float]:
    """``namespace/name`` -> when the agent logged ``pod initialized`` for it (the first time)."""
    marks: dict[str, float] = {}
    for at, text in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(text)
            if isinstance(record, dict) and record.get("msg") == "pod initialized":
                marks.setdefault(str(record.get("pod")), at)
    return marks


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest sample at or above a share ``q`` of them."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.50), 1),
        "p95": round(percentile(values, 0.95), 1),
        "p99": round(percentile(values, 0.99), 1),
        "max": round(max(values), 1),
    }


def steps(samples: Sequence[Sample], path: str) -> dict[str, float]:
    """p50 of each step between two successive points of ``path`` (milliseconds; a step can be
    negative: the agent may mark a pod before its waiter has started)."""
    points = ("created", *POINTS[path])
    out: dict[str, float] = {}
    for before, after in itertools.pairwise(points):
        values = []
        for s in samples:
            a = s.offset_ms(after)
            b = 0.0 if before == "created" else s.offset_ms(before)
            if a is not None and b is not None:
                values.append(a - b)
        if values:
            out[f"{before} -> {after}"] = round(percentile(values, 0.5), 1)
    return out


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """mode -> path -> point -> n, p50, p95, p99, max (milliseconds after creation)."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for mode in dict.fromkeys(s.mode for s in samples):
        for path in PATHS:
            chosen = [s for s in samples if s.mode == mode and s.path == path]
            out.setdefault(mode, {})[path] = {
                point: stats([v for s in chosen if (v := s.offset_ms(point)) is not None])
                for point in POINTS[path]
            }
    return out


# -- the cluster ------------------------------------------------------------------------------------


def pod_bodies(images: artifacts.Images) -> dict[str, dict[str, Any]]:
    """The same injected pod for both paths (see the module's docstring)."""
    deployment = workload.load(SHARED / "istio" / "injected" / "hello.yaml.injected")
    shaped = workload.Images(app=images.busybox, proxy=images.stub)
    bodies = {}
    for path in PATHS:
        ns = NAMESPACES[path]
        runnable = workload.runnable(deployment, images=shaped, replicas=1, namespace=ns)
        pod = istioinit.without_resources(istioinit.pod_of(runnable, namespace=ns, generate_name=f"{path}-"))
        bodies[path] = istioinit.with_istio_init(pod, image=images.istio_init) if path == ISTIO else pod
    return bodies


def prepare(cluster: RealCluster, client: Any) -> None:
    """Both namespaces, and a wait until the API server calls the webhook for ours."""
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Pod

    cp = cluster.control_plane
    assert cp is not None and cp.certs is not None
    ca = cp.certs.ca_cert.read_text()
    objects = workload.namespace_objects(ca, namespace=NAMESPACES[OURS])
    objects += istioinit.namespace_objects(ca, namespace=NAMESPACES[ISTIO])
    cluster.kubectl("apply", "-f", "-", input="".join("---\n" + json.dumps(o) + "\n" for o in objects))
    for ns in NAMESPACES.values():
        cluster.wait_service_account(ns)

    def mutated() -> bool:
        try:
            created = client.create(Pod.from_dict(workload.webhook_probe(NAMESPACES[OURS]))).to_dict()
        except ApiError:
            return False  # the webhook's Service is not routed yet (failurePolicy Fail)
        client.delete(Pod, created["metadata"]["name"], namespace=NAMESPACES[OURS], grace_period=0)
        return names.WAITER_CONTAINER in [c.get("name") for c in created["spec"].get("initContainers") or []]

    if not wait_until(mutated, 60.0, interval=0.5):
        raise BenchError("the API server did not call the webhook within 60 s")


class Runner:
    """Creates pods, waits for their first init container to end, reads the node's records."""

    def __init__(self, cluster: RealCluster, client: Any, bodies: Mapping[str, Mapping[str, Any]]) -> None:
        self.cluster = cluster
        self.client = client
        self.bodies = bodies
        self.node = cluster.nodes[0]
        self.samples: list[Sample] = []
        self.pending: list[Sample] = []

    def create(self, path: str, mode: str) -> Sample:
        from lightkube.resources.core_v1 import Pod

        body = Pod.from_dict(dict(self.bodies[path]))
        created = time.time()
        pod = self.client.create(body)
        sample = Sample(path, mode, pod.metadata.name, pod.metadata.uid, created)
        self.pending.append(sample)
        return sample

    def wait(self, samples: Sequence[Sample]) -> None:
        """Until each pod's first init container has terminated once (the kubelet's status)."""
        from lightkube.resources.core_v1 import Pod

        waiting = {s.name: s for s in samples}
        deadline = time.monotonic() + POD_TIMEOUT
        while waiting:
            for path in dict.fromkeys(s.path for s in waiting.values()):
                for pod in self.client.list(Pod, namespace=NAMESPACES[path]):
                    sample = waiting.get(pod.metadata.name)
                    status = pod.status
                    if sample is None or status is None:
                        continue
                    for c in status.initContainerStatuses or []:
                        ended = c.state.terminated if c.state else None
                        last = c.lastState.terminated if c.lastState else None
                        first = last or ended
                        if c.name == FIRST_INIT[path] and first is not None:
                            sample.container_id = str(first.containerID or "").split("://")[-1]
                            del waiting[sample.name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{len(waiting)} pod(s) did not end their first init container in "
                                 f"{POD_TIMEOUT:g} s: {', '.join(sorted(waiting))[:300]}")  # fmt: skip
            time.sleep(POLL)

    def in_node(self, path: str) -> Path:
        """``path`` as the node's mount namespace shows it (the node's mounts are its own)."""
        return Path(f"/proc/{self.node.holder.pid}/root") / path.lstrip("/")

    def inspect(self, container_id: str) -> dict[str, Any]:
        """``crictl inspect``'s status of one container (times in nanoseconds, its log's path)."""
        done = self.cluster.crictl(self.node, "inspect", "-o", "json", container_id)
        if done.returncode != 0:
            raise BenchError(f"crictl inspect {container_id[:12]}: {done.stderr.strip()[-300:]}")
        status: dict[str, Any] = json.loads(done.stdout).get("status") or {}
        return status

    def log_lines(self, status: Mapping[str, Any]) -> list[tuple[float, str]]:
        path = str(status.get("logPath") or "")
        try:
            return cri_lines(self.in_node(path).read_text(errors="replace")) if path else []
        except OSError:
            return []

    def agent_marks(self) -> dict[str, float]:
        """When the agent logged ``pod initialized`` for each pod, from its container's log."""
        done = self.cluster.crictl(self.node, "ps", "-a", "--name", "^agent$", "-q")
        marks: dict[str, float] = {}
        for container_id in done.stdout.split():
            marks.update(agent_marks(self.log_lines(self.inspect(container_id))))
        return marks

    def collect(self) -> None:
        """Read containerd's times and the log files of every pending pod, while they exist."""
        marks = self.agent_marks()
        for sample in self.pending:
            if not sample.container_id:
                continue
            status = self.inspect(sample.container_id)
            sample.init_started = epoch(status["startedAt"])
            sample.init_exited = epoch(status["finishedAt"])
            sample.exit_code = status.get("exitCode")
            if sample.path == OURS:
                sample.agent_mark = marks.get(f"{NAMESPACES[OURS]}/{sample.name}")
                proven = [(at, text) for at, text in self.log_lines(status) if WAITER_SAW_MARK in text]
                sample.waiter_saw_mark = proven[0][0] if proven else None
                sample.handed_over = HANDED_OVER in proven[0][1] if proven else None
        self.samples += self.pending
        self.pending = []

    def clean(self) -> None:
        """Delete every pod of both paths and wait until the kubelet has removed them."""
        from lightkube.resources.core_v1 import Pod

        for ns in NAMESPACES.values():
            self.client.deletecollection(Pod, namespace=ns)

        def gone() -> bool:
            return not any(True for ns in NAMESPACES.values() for _ in self.client.list(Pod, namespace=ns))

        if not wait_until(gone, GONE_TIMEOUT, interval=0.5):
            raise BenchError(f"the pods were not deleted in {GONE_TIMEOUT:g} s")
        time.sleep(SETTLE)

    def sequential(self, pods: int, *, progress: bool = True) -> None:
        for i in range(pods):
            order = PATHS if i % 2 == 0 else PATHS[::-1]
            for path in order:
                self.wait([self.create(path, "sequential")])
            if (i + 1) % SEQUENTIAL_GROUP == 0 or i + 1 == pods:
                self.collect()
                self.clean()
                if progress:
                    say(f"sequential: {i + 1}/{pods} pods of each path")

    def bursts(self, pods: int, burst: int) -> None:
        done, round_ = 0, 0
        while done < pods:
            size = min(burst, pods - done)
            order = PATHS if round_ % 2 == 0 else PATHS[::-1]
            for path in order:
                self.wait([self.create(path, f"bursts of {burst}") for _ in range(size)])
            self.collect()
            self.clean()
            done, round_ = done + size, round_ + 1
            say(f"bursts: {done}/{pods} pods of each path")


# -- output ------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(summary: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> Iterator[str]:
    heads = " ".join(f"{h:>7}" for h in ("p50", "p95", "p99", "max"))
    yield f"{'mode':<14} {'path':<11} {'point (ms after creation)':<26} {'n':>4} {heads}"
    for mode, paths in summary.items():
        for path, points in paths.items():
            for point, s in points.items():
                cells = [f"{s.get(k, float('nan')):7.0f}" for k in ("p50", "p95", "p99", "max")]
                yield f"{mode:<14} {path:<11} {point:<26} {int(s.get('n', 0)):>4} {' '.join(cells)}"


def verdict(
    summary: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], samples: Sequence[Sample]
) -> dict[str, Any]:
    """Per mode: our p50 less istio-init's, our slowest pod, how many of ours took over 5 s."""
    out: dict[str, Any] = {}
    for mode, paths in summary.items():
        ours, theirs = paths[OURS]["init exited"], paths[ISTIO]["init exited"]
        if not ours.get("n") or not theirs.get("n"):
            continue
        diff = ours["p50"] - theirs["p50"]
        out[mode] = {
            "p50_minus_istio_init_ms": round(diff, 1),
            "max_ms": ours["max"],
            "ours_over_5s": sum(
                1
                for s in samples
                if s.mode == mode and s.path == OURS and (s.offset_ms("init exited") or 0) > GOAL_MAX_MS
            ),
            "p50_goal_met": diff <= GOAL_P50_MS,
            "max_goal_met": ours["max"] <= GOAL_MAX_MS,
        }
    return out


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.machine())  # fmt: skip
    mem = next(
        ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
            "kernel": platform.release()}  # fmt: skip


def report(
    samples: Sequence[Sample], *, pods: int, burst: int, started: datetime, seconds: float, load_before: str,
    host_changed: str = "", chart_values: Mapping[str, str] | None = None,
) -> None:  # fmt: skip
    """The table, the steps, the verdict, and the JSON line last."""
    summary = summarize(samples)
    print(
        f"real-node benchmark, {started:%Y-%m-%d %H:%M} UTC: pod created -> first init container exited, "
        f"{pods} pods of each path sequentially and in bursts of {burst}, one node"
    )
    if chart_values:
        print(f"chart values set: {', '.join(f'{k}={v}' for k, v in chart_values.items())}")
    for line in table(summary):
        print(line)
    result = verdict(summary, samples)
    for mode in summary:
        for path in PATHS:
            chosen = [s for s in samples if s.mode == mode and s.path == path]
            parts = ", ".join(f"{k} {v:.0f}" for k, v in steps(chosen, path).items())
            print(f"{mode}, {path}: p50 of each step (ms): {parts}")
    for mode in summary:
        ours = [s for s in samples if s.mode == mode and s.path == OURS]
        handed = sum(1 for s in ours if s.handed_over)
        by_file = sum(1 for s in ours if s.handed_over is False)
        print(f"{mode}, ours: {handed} waiters had the mark handed over, {by_file} read it from the file")
    for mode, v in result.items():
        p50_goal = "met" if v["p50_goal_met"] else "NOT met"
        max_goal = "met" if v["max_goal_met"] else "NOT met"
        print(
            f"{mode}: our p50 {v['p50_minus_istio_init_ms']:+.0f} ms against istio-init "
            f"(goal <= +{GOAL_P50_MS:.0f}: {p50_goal}); our slowest {v['max_ms']:.0f} ms "
            f"(goal <= {GOAL_MAX_MS:.0f}: {max_goal})"
        )
    failed = [s for s in samples if s.exit_code not in (0, None)]
    print(
        f"{len(samples)} pods, {len(failed)} first init runs failed; took {seconds / 60:.1f} min; "
        f"load before {load_before}, after {load()}"
    )
    print(json.dumps({
        "bench": "realnode", "date": started.isoformat(timespec="seconds"), "pods": pods,
        "burst": burst, "nodes": 1, "seconds": round(seconds, 1), "machine": machine(),
        "load_before": load_before, "load_after": load(), "results": summary, "verdict": result,
        "steps_p50": {m: {p: steps([s for s in samples if s.mode == m and s.path == p], p) for p in PATHS}
                      for m in summary},
        "failed_first_runs": [asdict(s) for s in failed], "host_changed": host_changed,
        "chart_values": dict(chart_values or {}),
    }))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=200, help="pods of each path, in each mode (default 200)")
    parser.add_argument(
        "--burst", type=int, default=20, help="pods created at once in the burst mode (default 20)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a chart value for the install (repeatable), e.g. agent.resources.requests.cpu=100m",
    )  # fmt: skip
    parser.add_argument("--skip-sequential", action="store_true", help="bursts only")
    args = parser.parse_args(argv)
    chart_values: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        chart_values[key] = value
    if args.pods < 1 or args.burst < 1:
        parser.error("--pods and --burst must be at least 1")
    if os.geteuid() != 0:
        print("bench/realnode.py needs root (real nodes: namespaces, mounts, cgroups)", file=sys.stderr)
        return 1
    try:
        artifacts.images(required=(artifacts.ISTIO_INIT_ARCHIVE,))
    except artifacts.ArtifactError as exc:
        print(f"bench/realnode.py: {exc}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    started = datetime.now(UTC)
    load_before = load()
    archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE,
                artifacts.ISTIO_INIT_ARCHIVE)  # fmt: skip
    runner: Runner | None = None
    host_changed = failure = ""
    try:
        with RealCluster(nodes=1, image_archives=archives) as cluster:
            assert cluster.images is not None
            install.install(cluster, values=chart_values)
            if chart_values:
                say(f"chart values: {chart_values}")
            with cluster.client() as client:
                prepare(cluster, client)
                runner = Runner(cluster, client, pod_bodies(cluster.images))
                # One of each first, not counted: the first pod of an image pays for its first use.
                for path in PATHS:
                    runner.wait([runner.create(path, "warm-up")])
                runner.pending = []
                runner.clean()
                say(f"cluster ready in {time.monotonic() - t0:.0f} s; measuring")
                if not args.skip_sequential:
                    runner.sequential(args.pods)
                runner.bursts(args.pods, args.burst)
    except HostChanged as exc:
        host_changed = str(exc)  # the figures stand; the run still fails (below)
    except (RealClusterError, BenchError) as exc:
        print(f"bench/realnode.py: {exc}", file=sys.stderr)
        if runner is None or not runner.samples:
            return 1
        failure = str(exc)  # what was measured until then is still reported
    assert runner is not None
    samples = runner.samples
    report(
        samples, pods=args.pods, burst=args.burst, started=started, seconds=time.monotonic() - t0,
        load_before=load_before, host_changed=host_changed, chart_values=chart_values,
    )  # fmt: skip
    if host_changed or failure:
        print(f"bench/realnode.py: {host_changed or failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
