"""A real kubelet that lost the update carrying the mark: no pod waits for its next periodic sync.

After an update to a pod's annotations the kubelet rewrites its downward API files: the sync the
update starts asks the volume manager for a remount. A remount asked for while an earlier one of
the same volume is still running is lost (marking the earlier one mounted clears the request), and
the file keeps the old annotations until the pod's next periodic sync (``syncFrequency``, plus up
to half of it again). Measured here: 1 update in 547 waited 87.7 s. Racing writes of the pod's
annotations against the mark did not make it happen in 30 pods (the window is a few
milliseconds), so this test makes the loss certain, for every pod, in the same place the kubelet
loses it:

1. the agent is stopped (SIGSTOP) while a batch of pods starts; once each pod's waiter runs, the
   waiter is stopped too and the downward API file as the kubelet wrote it is kept;
2. the agent goes on and marks the pods; the kubelet rewrites each file with the mark, and the test
   puts the kept content back at once, the way the kubelet's atomic writer swaps a file in: the
   kubelet has done its remount and will write the file again only at the pod's next sync;
3. the waiters go on, and see no mark.

The kubelet's periodic sync is set to 25 s: left to it, a waiter exits 25 to 37 s after its mark.
Each pod is judged by how long after its mark (the agent's ``pod initialized`` log line, written as
the patch returned) the waiter printed its exit line (the container runtime's timestamp of that
line): no more than 5 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ipnc_dev.realnode import RealCluster, artifacts, install, workload
from ipnc_dev.realnode.processes import wait_until
from istio_pod_network_controller import names

from .conftest import needs_root, shared_injected, timings

pytestmark = pytest.mark.realnode

NAMESPACE = "refresh-mesh"
PODS = 18
BATCH = 6
# Long enough that a file left to the periodic sync shows far beyond the 5 s allowed, short
# enough that the run stays within a couple of minutes when it does.
SYNC_FREQUENCY = "25s"
ALLOWED_SECONDS = 5.0
STEP_TIMEOUT = 60.0
# The agent stays stopped at most this long (its liveness probe allows about 30 s).
AGENT_STOP_TIMEOUT = 20.0
BATCH_TIMEOUT = 90.0
VOLUME_DIR = f"volumes/kubernetes.io~downward-api/{names.PODINFO_VOLUME}"


@dataclass
class Seen:
    """What the test's watch saw of one pod, in wall-clock seconds (the runtime's log timestamps
    are wall-clock too, on this same machine)."""

    name: str
    uid: str = ""
    mark_at: float | None = None
    waiter_running: bool = False
    waiter_done: bool = False


@dataclass
class Watch:
    """A watch of the namespace's pods, in a thread."""

    cluster: RealCluster
    pods: dict[str, Seen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        from lightkube.resources.core_v1 import Pod

        while not self.stop.is_set():
            try:
                with self.cluster.client(timeout=None) as client:
                    for _, pod in client.watch(Pod, namespace=NAMESPACE):
                        self._saw(pod, time.time())
                        if self.stop.is_set():
                            return
            except Exception as exc:  # a broken watch is started again
                self.errors.append(f"watch: {type(exc).__name__}: {exc}")
                time.sleep(0.2)

    def _saw(self, pod: Any, now: float) -> None:
        annotations = pod.metadata.annotations or {}
        status = pod.status
        with self.lock:
            seen = self.pods.setdefault(pod.metadata.name, Seen(pod.metadata.name))
            seen.uid = pod.metadata.uid
            if seen.mark_at is None and annotations.get(names.STATUS) == names.STATUS_INITIALIZED:
                seen.mark_at = now
            for s in (status.initContainerStatuses if status else None) or []:
                if s.name == names.WAITER_CONTAINER and s.state:
                    seen.waiter_running = s.state.running is not None
                    seen.waiter_done = s.state.terminated is not None

    def get(self, name: str) -> Seen:
        with self.lock:
            return self.pods.setdefault(name, Seen(name))


@dataclass
class Result:
    delays: dict[str, float]  # pod -> waiter exit minus mark, seconds
    reverted: int  # files put back to their content before the mark
    nudges: float
    problems: list[str]


# -- the node's side -------------------------------------------------------------------------------


def _container_pid(cluster: RealCluster, *, name: str, labels: dict[str, str]) -> int | None:
    """The host PID of the one running container ``name`` with ``labels``, else None."""
    node = cluster.nodes[0]
    args = ["ps", "-q", "--state", "running", "--name", f"^{name}$"]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    ids = cluster.crictl(node, *args).stdout.split()
    if len(ids) != 1:
        return None
    inspected = json.loads(cluster.crictl(node, "inspect", "-o", "json", ids[0]).stdout)
    pid = inspected.get("info", {}).get("pid")
    return pid if isinstance(pid, int) and pid > 1 else None


def _volume(cluster: RealCluster, uid: str) -> Path:
    """The waiter's downward API volume as the kubelet writes it (a tmpfs in the node's mount
    namespace, reached through the node's holder process)."""
    node = cluster.nodes[0]
    return (
        Path(f"/proc/{node.holder.pid}/root")
        / str(node.plan.dir / "kubelet").lstrip("/")
        / "pods"
        / uid
        / VOLUME_DIR
    )


def _read(volume: Path) -> bytes | None:
    try:
        return (volume / names.PODINFO_ANNOTATIONS).read_bytes()
    except OSError:
        return None


def _put_back(volume: Path, content: bytes) -> None:
    """Show ``content`` as the file again, swapped in as the kubelet's atomic writer does (a new
    data folder, and the ``..data`` symlink renamed over)."""
    data = volume / f"..ipnc_test_{secrets.token_hex(4)}"
    data.mkdir(mode=0o755)
    (data / names.PODINFO_ANNOTATIONS).write_bytes(content)
    os.chmod(data / names.PODINFO_ANNOTATIONS, 0o644)
    link = volume / "..data_tmp"
    os.symlink(data.name, link)
    os.rename(link, volume / "..data")


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _exit_stamp(cluster: RealCluster, pod: str) -> float:
    """When the waiter wrote its last line (its exit line), by the container runtime's clock."""
    out = cluster.kubectl(
        "logs", "-n", NAMESPACE, pod, "-c", names.WAITER_CONTAINER, "--timestamps"
    ).stdout.strip()
    stamp = out.splitlines()[-1].split(" ", 1)[0]
    # RFC 3339 with nanoseconds: datetime takes microseconds.
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


# -- the workload ----------------------------------------------------------------------------------


def _pod(template: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"refresh-{index:03d}",
            "namespace": NAMESPACE,
            "labels": dict(template["metadata"].get("labels") or {}),
            "annotations": dict(template["metadata"].get("annotations") or {}),
        },
        "spec": template["spec"],
    }


def _apply(cluster: RealCluster, objects: list[dict[str, Any]]) -> None:
    import yaml

    cluster.kubectl("apply", "-f", "-", input="".join("---\n" + yaml.safe_dump(o) for o in objects))


def _deploy_namespace(cluster: RealCluster) -> None:
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Pod

    cp = cluster.control_plane
    assert cp is not None and cp.certs is not None
    _apply(cluster, workload.namespace_objects(cp.certs.ca_cert.read_text(), namespace=NAMESPACE))
    cluster.wait_service_account(NAMESPACE)

    def mutated() -> bool:
        with cluster.client() as client:
            probe = Pod.from_dict(workload.webhook_probe(NAMESPACE))
            try:
                created = client.create(probe).to_dict()
            except ApiError:
                return False  # the webhook's Service not routed yet
            client.delete(Pod, created["metadata"]["name"], namespace=NAMESPACE, grace_period=0)
        inits = [c.get("name") for c in (created.get("spec") or {}).get("initContainers") or []]
        return names.WAITER_CONTAINER in inits

    assert wait_until(mutated, 60.0, interval=0.5), "the API server did not call the webhook"


def _marked_at(cluster: RealCluster, release: install.Release) -> dict[str, float]:
    """When the agent wrote each pod's mark: its ``pod initialized`` log line, written right
    after the patch returned (milliseconds; the test's own watch can lag behind under load)."""
    out: dict[str, float] = {}
    from ipnc_dev.realnode import mesh

    for agent in mesh.pods(cluster, release.namespace, labels={"app.kubernetes.io/component": "agent"}):
        text = cluster.kubectl("logs", "-n", release.namespace, agent.name).stdout
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            pod = entry.get("pod") if isinstance(entry, dict) else None
            if (
                entry.get("msg") == "pod initialized"
                and isinstance(pod, str)
                and pod.startswith(f"{NAMESPACE}/")
            ):
                stamp = datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00")).timestamp()
                out.setdefault(pod.split("/", 1)[1], stamp)
    return out


def _metric(cluster: RealCluster, release: install.Release, name: str) -> float:
    from ipnc_dev.realnode import mesh

    return sum(mesh.metric_value(text, name) for text in mesh.metrics(cluster, release).values())


def _lose_the_marks(
    cluster: RealCluster, release: install.Release, watch: Watch, batch: list[str], problems: list[str]
) -> int:
    """Steps 1 to 3 of the module's docstring for one batch; returns how many files were put back."""
    found = _container_pid(cluster, name="agent", labels={"io.kubernetes.pod.namespace": release.namespace})
    assert found is not None, "the agent's container is not running"
    agent = found
    stopped: list[int] = []
    reverted = 0
    os.kill(agent, signal.SIGSTOP)
    try:
        kept: dict[str, bytes] = {}
        vanished: set[str] = set()

        def started() -> bool:
            for name in batch:
                seen = watch.get(name)
                if name in kept or not (seen.uid and seen.waiter_running):
                    continue
                content = _read(_volume(cluster, seen.uid))
                if content is None:
                    continue
                pid = _container_pid(
                    cluster, name=names.WAITER_CONTAINER, labels={"io.kubernetes.pod.uid": seen.uid}
                )
                if pid is None:
                    continue  # not listed by the runtime yet
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    vanished.add(name)  # ended between the runtime's answer and now
                    continue
                stopped.append(pid)
                # Read again once the waiter is stopped: what it will find when it goes on.
                kept[name] = _read(_volume(cluster, seen.uid)) or content
            return len(kept) == len(batch)

        if not wait_until(started, AGENT_STOP_TIMEOUT, interval=0.05):
            problems.append(
                f"waiters of {sorted(set(batch) - set(kept))} not running in {AGENT_STOP_TIMEOUT:g} s"
            )
            for name in sorted(vanished):
                log = cluster.kubectl(
                    "logs", "-n", NAMESPACE, name, "-c", names.WAITER_CONTAINER, check=False
                )
                problems.append(
                    f"{name}: the waiter ended while the agent was stopped:\n{log.stdout}{log.stderr}"
                )
            return 0
        assert all(names.STATUS.encode() not in content for content in kept.values())
        _signal([agent], signal.SIGCONT)
        agent = 0
        pending = set(batch)

        def put_back() -> bool:
            nonlocal reverted
            for name in sorted(pending):
                volume = _volume(cluster, watch.get(name).uid)
                content = _read(volume)
                if content is not None and names.STATUS.encode() in content:
                    _put_back(volume, kept[name])
                    pending.discard(name)
                    reverted += 1
            return not pending

        if not wait_until(put_back, STEP_TIMEOUT, interval=0.005):
            problems.append(f"the kubelet did not write the marks of {sorted(pending)} in {STEP_TIMEOUT:g} s")
        return reverted
    finally:
        _signal([agent] if agent else [], signal.SIGCONT)
        _signal(stopped, signal.SIGCONT)


@pytest.fixture(scope="module")
def slowed() -> Iterator[Result]:
    needs_root()
    injected = shared_injected()
    t0 = time.monotonic()
    archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
    with RealCluster(
        nodes=1, image_archives=archives, kubelet_settings={"syncFrequency": SYNC_FREQUENCY}
    ) as cluster:
        assert cluster.images is not None
        # Without the hand-off: these waiters must wait for their file, whose updates are lost.
        release = install.install(cluster, values={"agent.markHandoff": False})
        _deploy_namespace(cluster)
        images = workload.Images(app=cluster.images.busybox, proxy=cluster.images.stub)
        deployment = workload.runnable(
            workload.load(injected / "hello.yaml.injected"), images=images, replicas=1, namespace=NAMESPACE
        )
        template = deployment["spec"]["template"]
        watch = Watch(cluster)
        threading.Thread(target=watch.run, daemon=True).start()
        t_pods = time.monotonic()
        problems: list[str] = []
        exits: dict[str, float] = {}
        reverted = 0
        try:
            for first in range(0, PODS, BATCH):
                pods = [_pod(template, i) for i in range(first, min(PODS, first + BATCH))]
                batch = [p["metadata"]["name"] for p in pods]
                _apply(cluster, pods)
                reverted += _lose_the_marks(cluster, release, watch, batch, problems)

                def batch_done(batch: list[str] = batch) -> bool:
                    return all(watch.get(name).waiter_done for name in batch)

                if not wait_until(batch_done, BATCH_TIMEOUT, interval=0.2):
                    problems.append(
                        f"pods {batch[0]}..{batch[-1]}: waiters not done in {BATCH_TIMEOUT:g} s\n"
                        + cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout
                    )
                for name in batch:
                    seen = watch.get(name)
                    if seen.mark_at is None:
                        problems.append(f"{name}: no mark seen")
                    elif not seen.waiter_done:
                        problems.append(
                            f"{name}: waiter still running {time.time() - seen.mark_at:.1f} s after its mark"
                        )
                    else:
                        exits[name] = _exit_stamp(cluster, name)
                if problems:
                    break
                # Make room: each pod asks for CPU (the waiter's and the sidecar's requests).
                cluster.kubectl(
                    "delete", "pods", "-n", NAMESPACE, *batch, "--grace-period=0", "--force", "--wait=false"
                )
        finally:
            watch.stop.set()
        t_done = time.monotonic()
        nudges = _metric(cluster, release, "ipnc_mark_refresh_nudges_total")
        marked = _marked_at(cluster, release)
        delays = {name: at - marked.get(name, watch.get(name).mark_at or at) for name, at in exits.items()}
        result = Result(delays, reverted, nudges, problems + watch.errors)
        line = _summary(result) + f"; pods {t_done - t_pods:.1f} s"
        print(f"\n{line}\n" + " ".join(f"{n}={d:.2f}" for n, d in sorted(delays.items())), flush=True)
        yield result
    timings.append(f"{line}, {time.monotonic() - t0:.1f} s in all")


def _summary(result: Result) -> str:
    values = sorted(result.delays.values()) or [float("nan")]
    return (
        f"real-node refresh (syncFrequency {SYNC_FREQUENCY}, "
        f"{result.reverted} mark updates lost on purpose): "
        f"{len(result.delays)} pods, waiter exit after mark p50 {statistics.median(values):.2f} s, "
        f"p95 {values[int(0.95 * (len(values) - 1))]:.2f} s, max {values[-1]:.2f} s; "
        f"refresh nudges {result.nudges:g}"
    )


def test_every_pod_lost_the_update_of_its_mark(slowed: Result) -> None:
    # The slow path was taken: every pod's file was put back after the kubelet wrote the mark.
    assert not slowed.problems, "\n".join(slowed.problems)
    assert slowed.reverted == PODS


def test_no_waiter_exits_more_than_five_seconds_after_its_mark(slowed: Result) -> None:
    assert not slowed.problems, "\n".join(slowed.problems)
    assert len(slowed.delays) == PODS
    late = {name: round(d, 2) for name, d in slowed.delays.items() if d > ALLOWED_SECONDS}
    assert not late, f"waiters that exited more than {ALLOWED_SECONDS:g} s after their mark: {late}"
    # The clocks agree: no waiter exits before its mark was seen (a small allowance for the watch).
    assert min(slowed.delays.values()) > -1.0, slowed.delays
    # What let them go: the agent wrote the marks again, within its budget of 3 per sandbox (a
    # kubelet that happens to sync a pod again on its own within 2 s lets that one go first).
    assert 1 <= slowed.nudges <= 3 * PODS
