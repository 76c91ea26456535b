"""Benchmark: how finding a pod's network namespace grows with the processes on the node.

One pod-like target (a pause and an app process in a kubelet-style pod cgroup, in a namespace
holding the pod's IP), then 100, 1,000 and 5,000 idle processes added to the machine (``sleep``,
in a pids cgroup this benchmark creates, with pids.max as a hard bound, and removes at the end).
At each step, interleaved in the same run: the scan of every ``/proc/PID/cgroup`` (what every
locate did before, and still the fallback) against reading the pod's processes from its own
cgroup once the node's layout is known. Every process is stopped by PID at the end, on error too.
Needs root. Run it alone: ``flock /tmp/ipnc-bench.lock .venv/bin/python bench/locate.py``.

    .venv/bin/python bench/locate.py [--steps 100,1000,5000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ipnc_dev.cgroups import KubeletCgroups, mounts
from ipnc_dev.netlab import Netlab
from istio_pod_network_controller.node import locate

MAX_IDLE = 10_000  # no step may ask for more than this
SPAWN_TIMEOUT = 120.0


@dataclass
class IdleProcesses:
    """``sleep`` processes in a pids cgroup of our own (pids.max bounds them), stopped by PID."""

    cgroup: Path
    spawners: list[subprocess.Popen[bytes]]

    @classmethod
    @contextlib.contextmanager
    def created(cls, limit: int) -> Iterator[IdleProcesses]:
        tree = mounts().get("pids") or mounts().get("v2")
        if tree is None:
            raise SystemExit("no pids or cgroup2 hierarchy mounted")
        # The test tiers' throw-away name, which the real-node harness's host check expects.
        cgroup = tree / f"ipnc-test-{secrets.token_hex(3)}"
        cgroup.mkdir()  # fails if it exists: never an existing cgroup
        made = cls(cgroup, [])
        try:
            with contextlib.suppress(OSError):  # cgroup2 without the pids controller enabled
                (cgroup / "pids.max").write_text(f"{limit + 16}\n")
            yield made
        finally:
            made.stop()

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def grow_to(self, count: int) -> None:
        """Start processes until ``count`` idle ones are in our cgroup (the spawners included)."""
        missing = count - len(self.pids())
        if missing <= 0:
            return
        # The shell enters our cgroup first, so pids.max bounds everything it starts.
        script = (
            f'echo $$ > "{self.cgroup}/cgroup.procs" || exit 1; i=1; '
            f'while [ "$i" -lt {missing} ]; do sleep 3600 & i=$((i+1)); done; exec sleep 3600'
        )
        self.spawners.append(subprocess.Popen(["sh", "-c", script]))  # noqa: S603
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while len(self.pids()) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(self.pids())} of {count} idle processes started")
            time.sleep(0.1)

    def stop(self) -> None:
        for _ in range(20):  # a spawner may still be forking: repeat until the cgroup is empty
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for spawner in self.spawners:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spawner.wait(timeout=5)
        deadline = time.monotonic() + 10
        while self.cgroup.exists() and time.monotonic() < deadline:
            try:
                self.cgroup.rmdir()
            except OSError:
                time.sleep(0.1)
        if self.cgroup.exists():
            print(f"warning: {self.cgroup} not removed", file=sys.stderr)


def processes_on_machine() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


@dataclass(frozen=True)
class Sample:
    wall_ms: float
    cpu_ms: float


def timed(fn: Callable[[], object]) -> Sample:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return Sample((time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000)


def median(samples: list[Sample], attr: str) -> float:
    values: list[float] = [getattr(s, attr) for s in samples]
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="100,1000,5000", help="idle processes added, comma-separated")
    parser.add_argument("--rounds", type=int, default=40, help="locates per method and step")
    args = parser.parse_args()
    steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    if not steps or steps[0] < 0 or steps[-1] > MAX_IDLE:
        raise SystemExit(f"--steps: between 0 and {MAX_IDLE}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, cgroups)")

    uid = str(uuid.uuid4())
    rows: list[tuple[int, int, float, float, float, float]] = []
    with Netlab() as lab, KubeletCgroups() as cgroups, IdleProcesses.created(steps[-1]) as idle:
        pod = lab.add_pod("bench")
        for container in ("pause", "app"):
            cgroups.place(lab.sleeper(pod.path).pid, uid=uid, container=container, tree="pids")
        ips = [pod.ipv4]
        routes = locate.CgroupRoutes()
        with locate.by_pod_uid(uid, pod_ips=ips, routes=routes) as first:
            expected = first.id
        if not routes.roots:
            raise SystemExit("the pod's cgroup layout was not learned: nothing to compare")

        def scan() -> None:
            with locate.by_pod_uid(uid, pod_ips=ips, scan_only=True) as ns:
                assert ns.id == expected

        def own_cgroup() -> None:
            with locate.by_pod_uid(uid, pod_ips=ips, routes=routes) as ns:
                assert ns.id == expected

        for step in steps:
            idle.grow_to(step)
            old: list[Sample] = []
            new: list[Sample] = []
            for _ in range(args.rounds):  # interleaved, so load changes hit both alike
                old.append(timed(scan))
                new.append(timed(own_cgroup))
            total = processes_on_machine()
            rows.append(
                (step, total, median(old, "wall_ms"), median(new, "wall_ms"),
                 median(old, "cpu_ms"), median(new, "cpu_ms"))
            )
            print(f"  {step} idle processes added ({total} on the machine): done", file=sys.stderr)

    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nlocate by pod UID with the pod IP check, median of {args.rounds} per cell "
          f"(load average {' '.join(load)}, {os.cpu_count()} CPUs)")
    print(f"{'idle added':>10} {'processes':>9} | {'scan ms':>8} {'own cgroup ms':>13} {'ratio':>6} | "
          f"{'scan CPU ms':>11} {'own cgroup CPU ms':>17}")
    for step, total, old_w, new_w, old_c, new_c in rows:
        print(f"{step:>10} {total:>9} | {old_w:>8.2f} {new_w:>13.2f} {old_w / new_w:>5.1f}x | "
              f"{old_c:>11.2f} {new_c:>17.2f}")
    first_row, last_row = rows[0], rows[-1]
    if len(rows) > 1:
        print(f"growth from {first_row[1]} to {last_row[1]} processes: scan "
              f"{last_row[2] / first_row[2]:.1f}x, own cgroup {last_row[3] / first_row[3]:.1f}x")


if __name__ == "__main__":
    main()
