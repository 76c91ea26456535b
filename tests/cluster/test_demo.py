"""The `demo` command end to end (issue 8, acceptance 1): the real command, run as a person or CI
would, without a terminal; its summary says every pod was admitted without NET_ADMIN, programmed,
initialized and running, and every request was caught by the sender's sidecar with its original
destination; and afterwards nothing of it is left on the machine.

Leftovers are checked by snapshots before and after, narrowed to what the demo reports it created
(its `ip netns` prefixes, cgroup folders, processes, temporary folder), because other test runs on
the same machine create namespaces and cgroups of the same kinds at the same time. Temporary
folders are checked exactly: the demo runs with its own empty TMPDIR, which must be empty again.
Its child processes are found by a marker in their environment, its containers by their network
namespace and cgroup, and everything it reported by PID and start time (istiod among them).

Where scripts/build-istio has built istiod (scripts/setup does, so CI has it), the demo's pods are
made by istiod's own injector and our webhook; the fallback to Istio's saved injection output is
run too, with the build looked up in an empty folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from ipnc_dev import binaries, istiod
from ipnc_dev.cgroups import mounts
from ipnc_dev.demo import NODES, SERVICES, process_start

pytestmark = pytest.mark.cluster

CLI = Path(sys.executable).with_name("istio-pod-network-controller")
MARK = "IPNC_DEMO_TEST_MARK"
RUN_TIMEOUT = 180.0


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (network namespaces, cgroups, iptables)")
    try:
        binaries.find_all()
    except binaries.BinaryNotFoundError as exc:
        pytest.skip(str(exc))


# -- snapshots -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    netns: frozenset[str]
    veths: frozenset[str]  # veth links in this (the machine's) network namespace
    cgroups: frozenset[str]  # "<mount>/<top folder>"
    processes: frozenset[tuple[int, int]]  # (pid, start time)
    kube_caches: frozenset[Path] = frozenset()  # ~/.kube/cache/discovery/* before the run


def _processes() -> frozenset[tuple[int, int]]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            start = process_start(int(entry))
            if start is not None:
                found.add((int(entry), start))
    return frozenset(found)


def snapshot() -> Snapshot:
    netns = frozenset(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else frozenset()
    links = json.loads(
        subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True, check=True).stdout
    )
    veths = frozenset(
        str(link["ifname"]) for link in links if (link.get("linkinfo") or {}).get("info_kind") == "veth"
    )
    cgroups = frozenset(str(top) for mount in mounts().values() for top in mount.iterdir() if top.is_dir())
    discovery = Path.home() / ".kube" / "cache" / "discovery"
    caches = frozenset(discovery.iterdir()) if discovery.is_dir() else frozenset()
    return Snapshot(netns, veths, cgroups, _processes(), caches)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cgroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def leftovers(
    before: Snapshot, summary: dict[str, Any], mark: str, tmpdir: Path, *, nodes: int = len(NODES)
) -> list[str]:
    """Everything of this demo run still on the machine, in words (empty: nothing); ``nodes``:
    how many node stand-ins the run got to start."""
    after = snapshot()
    res = summary["resources"]
    prefixes, tops = tuple(res["netns_prefixes"]), tuple(res["cgroup_tops"])
    assert len(prefixes) == nodes and len(tops) == nodes, res
    found = [f"netns {n}" for n in sorted(after.netns - before.netns) if n.startswith(prefixes)]
    found += [f"veth {v} in the machine's namespace" for v in sorted(after.veths - before.veths)]
    found += [f"cgroup {c}" for c in sorted(after.cgroups - before.cgroups) if Path(c).name in tops]
    found += [f"file or folder {p}" for p in sorted(tmpdir.iterdir())]
    for pid, start in res["processes"]:
        if process_start(pid) == start:
            found.append(f"process {pid} (reported by the demo)")
    inodes = set(res["netns_inodes"])
    for pid, _start in sorted(after.processes - before.processes):
        if mark.encode() in _environ(pid):
            found.append(f"process {pid} (carries the run's marker)")
        elif _netns_inode(pid) in inodes:
            found.append(f"process {pid} (in a pod's network namespace)")
        elif any(top in _cgroup(pid) for top in tops):
            found.append(f"process {pid} (in a node stand-in's cgroup)")
    port = res["api_server"].rpartition(":")[2]
    cache = Path.home() / ".kube" / "cache" / "discovery" / f"127.0.0.1_{port}"
    # Only one the demo made: earlier runs of anything may have left one for the same port number.
    if cache.exists() and cache not in before.kube_caches:
        found.append(f"kubectl cache {cache}")
    return found


# -- running the command -------------------------------------------------------------------------------


@dataclass
class DemoRun:
    tmpdir: Path
    summary_path: Path
    mark: str
    env: dict[str, str]

    @property
    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.summary_path.read_text())
        return data


@pytest.fixture
def demo_run(tmp_path: Path) -> Iterator[DemoRun]:
    _needs_root()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # Containers run as other UIDs and must pass through to their volumes under TMPDIR (the demo
    # would fall back to /tmp otherwise, out of this check's sight).
    for folder in (tmpdir, *tmpdir.parents):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o011)
    mark = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "COLUMNS", "TERM")}
    env.update({"TMPDIR": str(tmpdir), MARK: mark, "PYTHONUNBUFFERED": "1"})
    yield DemoRun(tmpdir, tmp_path / "summary.json", mark, env)


def _check_story(summary: dict[str, Any], requests: int) -> None:
    assert summary["ok"] is True, summary["failure"]
    pods = summary["pods"]
    assert [p["service"] for p in pods] == list(SERVICES)
    assert {p["node"] for p in pods} == set(NODES), "the pods are spread over both nodes"
    for pod in pods:
        assert pod["admitted"] and pod["mutated"], pod
        assert pod["init_containers"][0] == "istio-pod-network-init", pod
        assert "istio-init" not in pod["init_containers"], pod
        assert pod["apply_ms"] is not None and pod["apply_ms"] > 0 and pod["rules"] > 0, pod
        assert pod["netns_inode"] in summary["resources"]["netns_inodes"]
        assert "outbound redirect proven" in pod["waiter_line"], pod
        assert pod["programmed_s"] <= pod["initialized_s"] <= pod["running_s"], pod
        assert pod["reached_directly"] == 0, pod
    hops = summary["hops"]
    assert len(hops) == requests * (len(SERVICES) - 1)
    assert summary["requests_intercepted"] == summary["requests_total"] == len(hops)
    for hop in hops:
        assert hop["intercepted"] and hop["recorded_by_sidecar"], hop
        assert hop["answered_by"] == "istio-proxy:15001", hop
        assert hop["original_destination"] == [hop["address"], 80], hop
        # Every hop crosses nodes: the target pod is unreachable, the sender's sidecar answers.
        assert hop["source_node"] not in hop["target_nodes"], hop
    sent = {p["service"]: (p["requests_sent"], p["requests_intercepted"]) for p in pods}
    assert sent == {"frontend": (requests, requests), "backend": (requests, requests), "database": (0, 0)}


def _istiod_built() -> str:
    build = istiod.find_build()
    if build is None:
        pytest.fail("istiod is not built for the pinned Istio version: run scripts/build-istio")
    return build.version


@pytest.mark.parametrize("injection", ["istiod", "saved"])
def test_the_demo_shows_the_whole_system_and_leaves_nothing_behind(
    demo_run: DemoRun, injection: str, tmp_path: Path
) -> None:
    if injection == "istiod":
        version = _istiod_built()
    else:
        (tmp_path / "no-istio").mkdir()
        demo_run.env["IPNC_ISTIO_CACHE"] = str(tmp_path / "no-istio")
    before = snapshot()
    t0 = time.monotonic()
    done = subprocess.run(  # noqa: S603 - our own CLI, fixed flags
        [str(CLI), "demo", f"--json-summary={demo_run.summary_path}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=demo_run.env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - t0
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    summary = demo_run.summary
    _check_story(summary, requests=3)
    assert summary["kept"] is False and summary["teardown_seconds"] > 0

    # Plain lines without a terminal: no escape sequences, no spinner; the story and the table.
    assert "\x1b[" not in output
    for pod in summary["pods"]:
        assert f"{pod['name']}" in output
        for event in ("admitted under restricted", "programmed by the agent", "waiter passed", "running"):
            assert any(pod["name"] in line and event in line for line in output.splitlines()), (pod, event)
    assert "PodSecurity refuses Istio's pod" in output and 'must not include "NET_ADMIN"' in output
    assert "Network is unreachable" in output
    assert "Summary" in output and "OK: 3/3 pods initialized and running" in output
    assert "6/6 requests intercepted" in output
    assert "removed everything" in output.splitlines()[-1]
    assert seconds < 60, f"the demo took {seconds:.1f} s"
    lines = output.splitlines()
    if injection == "istiod":
        assert summary["injection"] == f"istiod {version}"
        assert any(f"Istio injection: istiod {version}" in line for line in lines), output[-6000:]
        assert any("created un-injected; istiod's injector adds" in line for line in lines)
        assert f"pods injected by istiod {version}'s injector" in output
    else:
        assert summary["injection"] == "saved"
        assert any("Istio injection: Istio's saved injection output" in line for line in lines)
        assert "pods injected by Istio's saved injection output (istiod is not built)" in output

    assert leftovers(before, summary, demo_run.mark, demo_run.tmpdir) == []


def _read_until(stream: IO[str], needle: str, timeout: float, seen: list[str]) -> str:
    """The first line of ``stream`` containing ``needle`` (every line read goes to ``seen``)."""
    box: list[str] = []

    def read() -> None:
        for line in stream:
            seen.append(line)
            if needle in line:
                box.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    failed = "".join(line for line in seen if "✗" in line)  # the demo's own verdict, if it gave one
    assert box, f"no line with {needle!r} within {timeout}s:\n{failed}\n{''.join(seen)[-4000:]}"
    return box[0]


def _finish(proc: subprocess.Popen[str], seen: list[str]) -> tuple[int, str]:
    assert proc.stdout is not None
    rest = proc.stdout.read()
    code = proc.wait(60)
    return code, "".join(seen) + rest


def test_keep_leaves_it_running_for_kubectl_and_ctrl_c_removes_everything(demo_run: DemoRun) -> None:
    version = _istiod_built()
    before = snapshot()
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, fixed flags
        [str(CLI), "demo", "--keep", "--requests=1", f"--json-summary={demo_run.summary_path}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_run.env,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        line = _read_until(proc.stdout, "KUBECONFIG=", RUN_TIMEOUT, seen)
        kubeconfig = line.strip().partition("KUBECONFIG=")[2]
        _read_until(proc.stdout, "Ctrl-C", 10, seen)
        listed = subprocess.run(  # noqa: S603 - the test kubectl, fixed flags
            [str(binaries.find("kubectl")), f"--kubeconfig={kubeconfig}", f"--cache-dir={demo_run.tmpdir}/kc",
             "get", "pods", "-n", "mesh-demo", "-o", "json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        shutil.rmtree(demo_run.tmpdir / "kc", ignore_errors=True)
        pods = json.loads(listed.stdout)["items"]
        assert sorted(p["metadata"]["labels"]["app"] for p in pods) == sorted(SERVICES)
        assert all(p["status"]["phase"] == "Running" for p in pods)
        # istiod's injector made them: its status annotation and the sidecar it added.
        for pod in pods:
            status = json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])
            assert "istio-proxy" in status["initContainers"] + (status["containers"] or []), status
        assert demo_run.summary["injection"] == f"istiod {version}"
        # The check has teeth: while the demo runs, it sees its namespaces, cgroups, processes, files.
        running = leftovers(before, demo_run.summary, demo_run.mark, demo_run.tmpdir)
        for kind in ("netns", "cgroup", "process", "file or folder"):
            assert any(item.startswith(kind) for item in running), (kind, running)
        assert proc.poll() is None, "--keep must keep running"
        proc.send_signal(signal.SIGINT)
        code, output = _finish(proc, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, output[-6000:]
    summary = demo_run.summary
    assert summary["kept"] is True
    _check_story(summary, requests=1)
    assert "removed everything" in output.splitlines()[-1]
    assert leftovers(before, summary, demo_run.mark, demo_run.tmpdir) == []


@pytest.mark.parametrize(
    "when",
    [
        "deploying",  # the pods start
        "chart applied",  # Istio's charts are being installed and istiod started, in the background
    ],
)
def test_ctrl_c_while_pods_start_removes_everything(demo_run: DemoRun, when: str) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group: the demo and the agents
    and webhook it started, and the helm or kubectl that installs Istio's charts (the control
    plane, istiod and the pods' processes have sessions of their own)."""
    _istiod_built()
    before = snapshot()
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, fixed flags
        [str(CLI), "demo", f"--json-summary={demo_run.summary_path}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_run.env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        _read_until(proc.stdout, when, RUN_TIMEOUT, seen)
        os.killpg(proc.pid, signal.SIGINT)
        code, output = _finish(proc, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1, output[-6000:]
    summary = demo_run.summary
    assert summary["ok"] is False and summary["failure"].startswith("interrupted"), summary["failure"]
    assert "cleaning up" in output and "removed everything" in output.splitlines()[-1]
    nodes = 0 if when == "chart applied" else len(NODES)  # the stand-ins start after the chart
    assert leftovers(before, summary, demo_run.mark, demo_run.tmpdir, nodes=nodes) == []
