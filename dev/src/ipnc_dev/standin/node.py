"""A node stand-in: the kubelet's part for one simulated node, for cluster tests and ``demo``.

The test control plane has no kubelet, so nothing would give a pod what the agent and the
waiter need from a node: a network namespace with the pod's IP, processes whose cgroups name the
pod (the agent finds a pod's namespace by scanning ``/proc/*/cgroup`` for its UID), a downward API
file of its annotations (the waiter reads it), its containers running in order, and the status a
kubelet reports. ``NodeStandIn`` provides all of that for the pods bound to one node name, with
real kernel objects, so that the real agent, waiter and webhook can be run against it:

* list+watch of ``spec.nodeName=<node>`` pods (the project's ``Reflector``: reconnects, 410 Gone);
* per pod a sandbox: a network namespace on the stand-in's bridge (``Netlab``; IPv4, IPv6 when
  asked) and a long-lived pause process inside it, placed in kubelet-style pod cgroups
  (``KubeletCgroups``: the v2 tree and the v1 ``pids`` tree, which impose no limits; the
  process's other cgroups, memory included, stay as they were -- on a hybrid machine such as the
  ones the tests run on; where the v2 tree is the only one it also holds the memory controller,
  and the process leaves its memory cgroup for one without limits);
* volumes in a per-pod folder laid out as the kubelet's (``<workdir>/pods/<uid>/volumes/
  kubernetes.io~<type>/<name>``): downward API files written by the kubelet's atomic writer and
  rewritten as soon as a watched pod's labels or annotations change; projected service account
  tokens (TokenRequest), config maps and secrets read once; emptyDir folders;
* init containers in order (crash-loop back-off on failure, native sidecars started and left
  running), then the containers, as processes in the pod's namespace with the container's UID
  (see ``kubelet.plan`` for which program runs for which image);
* the status subresource patched as the kubelet would (pod IPs, host IP, phase, conditions,
  container states with reasons, ``restartCount``);
* on deletion the processes are stopped, the namespace, its veth pair and the cgroups removed, and
  the deletion confirmed (``gracePeriodSeconds: 0``, UID precondition), as the kubelet does.

**Paths inside containers.** There is no mount namespace: a container's process sees the host's
file system. A volume mounted at ``mountPath`` is the folder ``PodView.volume_dirs[<volume>]``
(``subPath`` appended); any argument, command word or environment value that names a path under
a mount path (also as ``--flag=PATH``) is rewritten to the folder. The waiter (``init``) without
``--file`` gets ``--file <folder>/annotations`` when a volume is mounted at ``/etc/podinfo``.

**Threads.** Each stand-in runs one asyncio event loop in its own daemon thread; every process it
starts is started from that thread (their parent-death signal is tied to it). The public methods
are thread-safe and block; call them from tests or from ``demo``'s main thread. Several stand-ins
coexist in one process: each has its own bridge (in its own "node" namespace), its own pod subnet
(10.244.16n.0/20, fd00:10:244:n::/64), so pod IPs never collide, and its own cgroup folder.
Pods of different stand-ins cannot reach each other (no route between the bridges).

**Not modelled** (documented choices): an Istio proxy image running ``istio-iptables`` (an
istio-init the webhook did not replace) is not run, as it would need NET_ADMIN: it is reported as
a ``StartError`` (exit 128) naming that reason and retried with back-off, so the pod stays in
``Init`` visibly. Project and command containers asking for UID 0 are refused the same way unless
``allow_root``. Readiness, liveness and startup probes are not run (a started container is ready;
a stub is ready once it listens). A ``hostNetwork`` pod runs in the stand-in's node namespace
(not the machine's), with the node's IP. Volumes that cannot be had (a missing config map, a
refused token) leave their files out and add a note to the pod's view instead of blocking the pod.
No Events are written. Tokens are not refreshed. Changes to a running pod's spec (a new image)
are not acted on.

**Which program runs** (``kubelet.plan``): the project's image (``Images.project`` in the image
reference) runs the project's CLI with the container's arguments, in this interpreter, through
``launch`` (it drops to the container's UID after loading, since this machine's
interpreter lives under ``/root``); Istio's proxy image with ``proxy ...`` runs the stub proxy
(``stubproxy --record``: 15001, 15006, 15020, 15021, 15090 and its container ports, as
1337 by default); any other image runs its ``command`` if it has one (from the host's file
system, as the container's UID via ``nsenter --setuid``), else the app stub: ``probe``
(driven by ``app_request``) plus, for its container ports, a ``stubproxy`` server that answers
and records. Containers run as ``runAsUser``/``runAsGroup`` (container, then pod), else 1000.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from istio_pod_network_controller.cluster.api import Api, ApiError
from istio_pod_network_controller.cluster.reflector import Reflector, cancel_all, uid_key

from ..cgroups import Driver, KubeletCgroups, mounts, pod_cgroup_path
from ..netlab import Netlab, Pod
from . import kubelet

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

PACKAGE = "ipnc_dev"
LOG_TAIL_BYTES = 2048  # the kubelet's limit for a termination message taken from the log
LOG_TAIL_LINES = 80
READY_TIMEOUT = 30.0  # a stub that has not said "ready" by then is left unready

_subnets_lock = threading.Lock()
_subnets_used: set[int] = set()


def _allocate_subnet() -> int:
    with _subnets_lock:
        for index in range(1, 16):
            if index not in _subnets_used:
                _subnets_used.add(index)
                return index
    raise RuntimeError("at most 15 node stand-ins can run in one process")


def _release_subnet(index: int) -> None:
    with _subnets_lock:
        _subnets_used.discard(index)


# -- what tests see --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerView:
    """One container as the stand-in runs it (a snapshot)."""

    name: str
    init: bool
    kind: str  # kubelet.Kind value of its latest start ("" before the first)
    state: str  # "waiting" | "running" | "terminated"
    reason: str  # the state's reason (CrashLoopBackOff, Completed, Error, StartError, ...)
    ready: bool
    restart_count: int
    pid: int | None  # the main process of the current run
    pids: tuple[int, ...]  # every process of the current run (the app stub has two)
    exit_codes: tuple[int, ...]  # of each finished run, in order
    log_paths: tuple[Path, ...]  # one log file per run, in order (they outlive the pod)
    refusal: str  # why it was not run (kind "refused")
    status: Mapping[str, Any]  # the containerStatus reported to the API


@dataclass(frozen=True, slots=True)
class PodView:
    """One pod on the stand-in (a snapshot)."""

    uid: str
    namespace: str
    name: str
    generation: int  # sandbox generation: 0, then +1 per recreate_sandbox
    phase: str
    netns: str  # path of the sandbox's network namespace ("" when there is none)
    netns_inode: int
    sandbox_pid: int | None  # the pause process
    ips: tuple[str, ...]
    host_ip: str
    veth: str  # the host end of the pod's veth pair, in the stand-in's node namespace
    node_netns: str  # path of that node namespace
    cgroup_dirs: tuple[Path, ...]  # the pause process's container cgroup, one per tree
    volume_dirs: Mapping[str, Path]
    containers: Mapping[str, ContainerView]  # init containers and containers, by name
    terminating: bool
    error: str
    notes: tuple[str, ...]

    @property
    def ipv4(self) -> str | None:
        return next((ip for ip in self.ips if ":" not in ip), None)

    @property
    def ipv6(self) -> str | None:
        return next((ip for ip in self.ips if ":" in ip), None)

    @property
    def pod_cgroup_dirs(self) -> tuple[Path, ...]:
        """The pod-level cgroup folders (``.../pod<uid>``), one per tree."""
        return tuple(d.parent for d in self.cgroup_dirs)

    def container(self, name: str) -> ContainerView:
        return self.containers[name]


# -- internal state (touched only in the stand-in's thread) ----------------------------------


@dataclass
class _Run:
    """One start of one container."""

    container_id: str
    log_path: Path
    started_at: str
    kind: kubelet.Kind
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    cgroup_dirs: list[Path] = field(default_factory=list)
    exit_code: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Container:
    spec: Mapping[str, Any]
    status: kubelet.ContainerStatus
    runs: list[_Run] = field(default_factory=list)
    current: _Run | None = None
    task: asyncio.Task[None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0  # consecutive failed runs (back-off)
    refusal: str = ""

    @property
    def name(self) -> str:
        return self.status.name


@dataclass
class _Sandbox:
    id: str
    cgroups: KubeletCgroups
    netns: str = ""
    netns_name: str = ""  # our `ip netns` name ("" for hostNetwork)
    inode: int = 0
    ips: list[str] = field(default_factory=list)
    veth: str = ""
    pause: asyncio.subprocess.Process | None = None
    cgroup_dirs: list[Path] = field(default_factory=list)
    ready: bool = False  # complete: namespace, addresses, pause process in its cgroups


@dataclass
class _Volume:
    directory: Path
    mode: int
    static: dict[str, bytes] = field(default_factory=dict)  # tokens, config maps, secrets
    downward: list[Any] = field(default_factory=list)  # downward API items
    written: dict[str, bytes] | None = None


@dataclass
class _Pod:
    obj: JSON
    dir: Path
    log_dir: Path
    inits: list[_Container]
    containers: list[_Container]
    conditions: kubelet.Conditions = field(default_factory=kubelet.Conditions)
    start_time: str = ""
    sandbox: _Sandbox | None = None
    generation: int = 0
    volumes: dict[str, _Volume] = field(default_factory=dict)
    volumes_ready: bool = False
    runner: asyncio.Task[None] | None = None
    terminating: asyncio.Task[None] | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def meta(self) -> Mapping[str, Any]:
        meta: Mapping[str, Any] = self.obj.get("metadata") or {}
        return meta

    @property
    def spec(self) -> Mapping[str, Any]:
        spec: Mapping[str, Any] = self.obj.get("spec") or {}
        return spec

    @property
    def uid(self) -> str:
        return str(self.meta["uid"])

    @property
    def namespace(self) -> str:
        return str(self.meta.get("namespace", "default"))

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    @property
    def restart_policy(self) -> str:
        return str(self.spec.get("restartPolicy") or "Always")

    def all_containers(self) -> list[_Container]:
        return [*self.inits, *self.containers]


def _new_containers(spec: Mapping[str, Any], key: str, init: bool) -> list[_Container]:
    found = []
    for item in spec.get(key) or []:
        sidecar = init and item.get("restartPolicy") == "Always"
        status = kubelet.ContainerStatus(
            name=str(item.get("name")), image=str(item.get("image") or ""), init=init, sidecar=sidecar
        )
        found.append(_Container(spec=item, status=status))
    return found


def _tail(path: Path, *, lines: int = LOG_TAIL_LINES, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
    return text[-limit:]


def _killpg(pid: int, sig: signal.Signals) -> None:
    """Signal the process group our child ``pid`` leads (a container's processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _our_group_leader(pid: int) -> bool:
    """Whether ``pid`` is still our child and leads its process group (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
    return len(fields) > 2 and fields[1] == str(os.getpid()) and fields[2] == str(pid)


def _kill_cgroup(directory: Path) -> None:
    """SIGKILL the processes left in one of our container cgroups (by their PIDs)."""
    with contextlib.suppress(OSError):
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603


# -- the stand-in ----------------------------------------------------------------------------


class NodeStandIn:
    """The kubelet's part for node ``node_name`` (see the module docstring).

    ::

        with NodeStandIn("node-1", cp.kubeconfig_path) as node:
            kube.create(pod_bound_to("node-1"))
            view = node.wait_for(ns, "web", lambda v: v.phase == "Running")
            node.app_request(view.uid, "app", "192.0.2.1", 80)   # connect from the app's namespace
            node.connections(view.uid, "istio-proxy")            # what the stub proxy received
    """

    def __init__(
        self,
        node_name: str,
        kubeconfig: Path | str,
        *,
        ipv6: bool = False,
        subnet4: str | None = None,
        subnet6: str | None = None,
        images: kubelet.Images | None = None,
        python: str = sys.executable,
        driver: Driver = Driver.SYSTEMD,
        backoff_initial: float = 1.0,
        backoff_max: float = 16.0,
        stop_timeout: float = 5.0,
        allow_root: bool = False,
        workdir_parent: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.node_name = node_name
        self.kubeconfig = str(kubeconfig)
        self.ipv6 = ipv6
        self.images = images or kubelet.Images()
        self.python = python
        self.driver = driver
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self.allow_root = allow_root
        self.start_timeout = start_timeout
        self._workdir_parent = workdir_parent
        self._subnet4, self._subnet6 = subnet4, subnet6
        self._subnet_index: int | None = None
        self.workdir = Path()
        self.lab: Netlab | None = None
        self.cgroup_top = f"ipnc-node-{secrets.token_hex(3)}"
        self._trees: list[str] = []
        self._nsenter = shutil.which("nsenter") or "nsenter"
        self._setpriv = shutil.which("setpriv") or "setpriv"
        self._pods: dict[str, _Pod] = {}
        self._spawned: set[int] = set()  # every PID we started, for the last-resort sweep
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._api: Api | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> NodeStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> NodeStandIn:
        """Create the node's bridge, start the thread, wait for the first list of pods."""
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="ipnc-node-", dir=self._workdir_parent))
            os.chmod(self.workdir, 0o755)  # containers run as other UIDs and read their volumes
            if self._subnet4 is None or (self.ipv6 and self._subnet6 is None):
                self._subnet_index = _allocate_subnet()
            n = self._subnet_index or 0
            self.lab = Netlab(
                subnet4=self._subnet4 or f"10.244.{16 * n}.0/20",
                subnet6=self._subnet6 or f"fd00:10:244:{n:x}::/64",
            )
            self.lab.start()
            found = mounts()
            self._trees = [tree for tree in ("v2", "pids") if tree in found]
            if not self._trees:
                raise RuntimeError("neither a cgroup v2 tree nor a v1 pids tree is mounted here")
            self._thread = threading.Thread(
                target=self._thread_main, name=f"node-standin-{self.node_name}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(self.start_timeout):
                raise RuntimeError(
                    f"node stand-in {self.node_name}: no list of pods within {self.start_timeout}s"
                )
            if self._crash is not None:
                raise RuntimeError(f"node stand-in {self.node_name} failed: {self._crash!r}")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every pod's processes, remove every namespace, veth, cgroup and file. Idempotent.
        Each step runs even if an earlier one failed; the first failure is raised at the end."""
        if self._closed:
            return
        self._closed = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already stopped
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(60)
            if self._thread.is_alive():
                log.warning("node stand-in %s: its thread did not stop within 60s", self.node_name)
        errors: list[BaseException] = []
        steps: list[Callable[[], None]] = [self._kill_leftovers, self._sweep_cgroups]
        if self.lab is not None:
            steps.insert(1, self.lab.close)
        if self.workdir != Path():
            steps.append(functools.partial(shutil.rmtree, self.workdir))
        for step in steps:
            try:
                step()
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("node stand-in %s: cleanup step failed: %r", self.node_name, exc)
                errors.append(exc)
        if self._subnet_index is not None:
            _release_subnet(self._subnet_index)
        if errors:
            raise errors[0]

    def _kill_leftovers(self) -> None:
        """Last resort, if the thread could not stop them: every process we started, by PID."""
        for pid in sorted(self._spawned):
            if _our_group_leader(pid):
                _killpg(pid, signal.SIGKILL)

    def _sweep_cgroups(self) -> None:
        """Remove our cgroup folder in every tree (parents shared by pods stay until here)."""
        for mount in mounts().values():
            top = mount / self.cgroup_top
            if not top.is_dir():
                continue
            folders = [p for p in top.rglob("*") if p.is_dir()]
            folders.sort(key=lambda p: len(p.parts), reverse=True)
            for folder in [*folders, top]:
                _kill_cgroup(folder)
                for _ in range(50):
                    try:
                        folder.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._crash = exc
            log.exception("node stand-in %s stopped", self.node_name)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"node-standin-{self.node_name}")
        self._api = Api.from_kubeconfig(self.kubeconfig)
        reflector = Reflector(
            self._api,
            "/api/v1/pods",
            "pods",
            uid_key,
            self._on_change,
            field_selector=f"spec.nodeName={self.node_name}",
            backoff_max_s=2.0,
        )
        task = asyncio.create_task(reflector.run())
        try:
            synced = asyncio.create_task(reflector.synced.wait())
            await asyncio.wait({synced, task}, return_when=asyncio.FIRST_COMPLETED)
            synced.cancel()
            if task.done():
                task.result()
            self._ready.set()
            await self._stop.wait()
        finally:
            await cancel_all([task])
            await asyncio.gather(*(self._shutdown_pod(p) for p in list(self._pods.values())))
            await self._api.close()
            self._executor.shutdown(wait=True)

    async def _shutdown_pod(self, pod: _Pod) -> None:
        with contextlib.suppress(Exception):
            if pod.terminating is not None:
                pod.terminating.cancel()
            await self._halt(pod, min(self.stop_timeout, 2.0))
            await self._remove_sandbox(pod)
        self._pods.pop(pod.uid, None)

    # -- calls from other threads ------------------------------------------------------------

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        loop = self._loop
        if loop is None or self._closed or not loop.is_running():
            raise RuntimeError(f"node stand-in {self.node_name} is not running")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def pods(self) -> list[PodView]:
        """Every pod the stand-in runs now."""

        async def views() -> list[PodView]:
            return [self._view(p) for p in self._pods.values()]

        return self._call(views)

    def get(self, uid: str) -> PodView | None:
        async def view() -> PodView | None:
            pod = self._pods.get(uid)
            return self._view(pod) if pod else None

        return self._call(view)

    def find(self, namespace: str, name: str) -> PodView | None:
        async def view() -> PodView | None:
            for pod in self._pods.values():
                if pod.namespace == namespace and pod.name == name and pod.terminating is None:
                    return self._view(pod)
            return None

        return self._call(view)

    def wait_for(
        self,
        namespace: str,
        name: str,
        predicate: Callable[[PodView], bool] = lambda v: bool(v.netns),
        timeout: float = 30.0,
    ) -> PodView:
        """The pod's view once ``predicate`` holds (default: its sandbox exists)."""
        deadline = time.monotonic() + timeout
        last: PodView | None = None
        while True:
            last = self.find(namespace, name)
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pod {namespace}/{name} on {self.node_name}: condition not met; last: {last}"
                )
            time.sleep(0.02)

    def wait_gone(self, uid: str, timeout: float = 30.0) -> None:
        """Wait until the pod is torn down (after its deletion)."""
        deadline = time.monotonic() + timeout
        while self.get(uid) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {uid} on {self.node_name} not torn down within {timeout}s")
            time.sleep(0.02)

    def logs(self, uid: str, container: str, *, previous: bool = False) -> str:
        """The log of the container's current (or latest) run, or of the one before."""
        view = self.get(uid)
        if view is None:
            raise KeyError(f"no pod {uid} on {self.node_name}")
        paths = view.container(container).log_paths
        index = -2 if previous else -1
        if len(paths) < (2 if previous else 1):
            return ""
        return paths[index].read_text(errors="replace")

    def connections(self, uid: str, container: str) -> list[dict[str, Any]]:
        """What the container's stub (proxy or app server) answered, oldest first: each record
        names the listener (``port``), the peer, and ``orig``, the original destination of a
        redirected connection."""
        view = self.get(uid)
        if view is None:
            raise KeyError(f"no pod {uid} on {self.node_name}")
        found: list[dict[str, Any]] = []
        for path in view.container(container).log_paths:
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        with contextlib.suppress(ValueError):
                            record = json.loads(line)
                            if isinstance(record, dict) and "server" in record:
                                found.append(record)
        return found

    def app_request(
        self,
        uid: str,
        container: str,
        host: str,
        port: int,
        *,
        op: str = "tcp",
        timeout: float = 3.0,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Have the app stub ``container`` connect to ``host:port`` from the pod's namespace, as the
        container's UID, and return ``{"ok": ..., "reply": <the server's report>}`` (or
        ``{"ok": False, "error": ...}``). The reply must echo a random token, so only a server
        that really received this connection can answer."""
        token = secrets.token_hex(8)
        request = {"op": op, "host": host, "port": port, "timeout": timeout, "token": token, "source": source}
        answer = self._call(lambda: self._app_request(uid, container, request), timeout + 15)
        reply = answer.get("reply")
        if answer.get("ok") and isinstance(reply, dict) and reply.get("token") != token:
            answer = {"ok": False, "error": f"reply carried token {reply.get('token')!r}, not ours"}
        return answer

    def recreate_sandbox(self, uid: str, timeout: float = 30.0) -> PodView:
        """Replace the pod's sandbox as a runtime restart would: stop its containers, delete its
        namespace, create a new one (new inode, new IP) and run the pod again from its first
        init container; the status is reported again. Returns the view with the new sandbox."""
        return self._call(lambda: self._recreate(uid), timeout)

    # -- views -------------------------------------------------------------------------------

    def _view(self, pod: _Pod) -> PodView:
        sb = pod.sandbox if pod.sandbox is not None and pod.sandbox.ready else None
        containers: dict[str, ContainerView] = {}
        for c in pod.all_containers():
            state = next(iter(c.status.state), "waiting")
            details = c.status.state.get(state) or {}
            run = c.current
            pids = tuple(p.pid for p in run.procs) if run else ()
            containers[c.name] = ContainerView(
                name=c.name,
                init=c.status.init,
                kind=c.runs[-1].kind.value if c.runs else "",
                state=state,
                reason=str(details.get("reason", "")),
                ready=c.status.ready,
                restart_count=c.status.restart_count,
                pid=pids[0] if pids else None,
                pids=pids,
                exit_codes=tuple(r.exit_code for r in c.runs if r.exit_code is not None),
                log_paths=tuple(r.log_path for r in c.runs),
                refusal=c.refusal,
                status=json.loads(json.dumps(c.status.to_json())),
            )
        lab = self.lab
        return PodView(
            uid=pod.uid,
            namespace=pod.namespace,
            name=pod.name,
            generation=pod.generation,
            phase=kubelet.phase(
                pod.restart_policy, [c.status for c in pod.inits], [c.status for c in pod.containers]
            ),
            netns=sb.netns if sb else "",
            netns_inode=sb.inode if sb else 0,
            sandbox_pid=sb.pause.pid if sb and sb.pause else None,
            ips=tuple(sb.ips) if sb else (),
            host_ip=lab.bridge_ipv4 if lab else "",
            veth=sb.veth if sb else "",
            node_netns=f"/run/netns/{lab.node}" if lab else "",
            cgroup_dirs=tuple(sb.cgroup_dirs) if sb else (),
            volume_dirs={name: v.directory for name, v in pod.volumes.items()},
            containers=containers,
            terminating=pod.terminating is not None,
            error=pod.error,
            notes=tuple(pod.notes),
        )

    # -- watch events --------------------------------------------------------------------------

    def _on_change(self, uid: str, obj: JSON | None) -> None:
        pod = self._pods.get(uid)
        if obj is None:
            if pod is not None and pod.terminating is None:
                pod.terminating = asyncio.create_task(self._terminate(pod, confirm=False))
            return
        meta = obj.get("metadata") or {}
        if pod is None:
            if meta.get("deletionTimestamp"):
                stray = _Pod(obj=obj, dir=self.workdir, log_dir=self.workdir, inits=[], containers=[])
                self._detach(self._confirm_deletion(stray))
                return
            if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before we (re)started: nothing to run
            pod = self._new_pod(obj)
            self._pods[uid] = pod
            pod.runner = asyncio.create_task(self._run_pod(pod))
            return
        pod.obj = obj
        if pod.terminating is not None:
            return
        if meta.get("deletionTimestamp"):
            pod.terminating = asyncio.create_task(self._terminate(pod, confirm=True))
            return
        self._refresh_downward(pod)

    def _detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _new_pod(self, obj: JSON) -> _Pod:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        uid = str(meta["uid"])
        pod_dir = self.workdir / "pods" / uid
        log_dir = self.workdir / "logs" / f"{meta.get('namespace', 'default')}_{meta['name']}_{uid}"
        for folder in (pod_dir, log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return _Pod(
            obj=obj,
            dir=pod_dir,
            log_dir=log_dir,
            inits=_new_containers(spec, "initContainers", True),
            containers=_new_containers(spec, "containers", False),
        )

    # -- a pod's life --------------------------------------------------------------------------

    async def _run_pod(self, pod: _Pod) -> None:
        try:
            await self._create_sandbox_retrying(pod)
            if not pod.volumes_ready:
                await self._prepare_volumes(pod)
            pod.start_time = pod.start_time or kubelet.now()
            await self._publish(pod)
            for c in pod.inits:
                if c.status.sidecar:
                    c.task = asyncio.create_task(self._supervise(pod, c))
                    await c.started.wait()
                    continue
                if not await self._run_init(pod, c):
                    return
            for c in pod.containers:
                c.task = asyncio.create_task(self._supervise(pod, c))
            await self._publish(pod)
            await asyncio.gather(*(c.task for c in pod.containers if c.task))
            sidecars = [c for c in pod.inits if c.status.sidecar]
            await cancel_all([c.task for c in sidecars if c.task is not None])
            await asyncio.gather(*(self._stop_container(pod, c, self.stop_timeout) for c in sidecars))
            await self._publish(pod)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("pod %s/%s on %s", pod.namespace, pod.name, self.node_name)
            pod.error = f"{type(exc).__name__}: {exc}"

    async def _run_init(self, pod: _Pod, c: _Container) -> bool:
        """Run one init container until it succeeds (True), or fails for good (False)."""
        while True:
            code = await self._run_once(pod, c)
            if code == 0:
                c.status.ready = True
                c.failures = 0
                await self._publish(pod)
                return True
            if pod.restart_policy == "Never":
                await self._publish(pod)
                return False
            await self._back_off(pod, c)

    async def _supervise(self, pod: _Pod, c: _Container) -> None:
        """Run a container (or a native sidecar) and restart it as its restart policy says."""
        while True:
            code = await self._run_once(pod, c)
            policy = "Always" if c.status.sidecar else pod.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                await self._publish(pod)
                return
            await self._back_off(pod, c)

    async def _back_off(self, pod: _Pod, c: _Container) -> None:
        c.failures += 1
        delay = kubelet.backoff(c.failures, self.backoff_initial, self.backoff_max)
        c.status.last_state = c.status.state
        who = f"container={c.name} pod={pod.name}_{pod.namespace}({pod.uid})"
        message = f"back-off {delay:g}s restarting failed {who}"
        c.status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        await self._publish(pod)
        await asyncio.sleep(delay)

    async def _run_once(self, pod: _Pod, c: _Container) -> int:
        """Start the container, wait for its main process, record how it ended."""
        run = await self._start_container(pod, c)
        await self._publish(pod)
        if run.exit_code is not None:
            return run.exit_code  # could not be started
        code = kubelet.exit_code_of(await run.procs[0].wait())
        await self._finish_run(pod, c, run, code)
        await self._publish(pod)
        return code

    def _effective_pod(self, pod: _Pod) -> JSON:
        """The pod with the status we report (field references read pod IPs before the API has
        them)."""
        status = dict(pod.obj.get("status") or {})
        sb = pod.sandbox
        if sb is not None and sb.ips:
            status["podIP"], status["podIPs"] = sb.ips[0], [{"ip": ip} for ip in sb.ips]
        if self.lab is not None:
            status["hostIP"], status["hostIPs"] = self.lab.bridge_ipv4, [{"ip": self.lab.bridge_ipv4}]
        return {**pod.obj, "status": status}

    def _argv(self, plan: kubelet.Plan, name: str, netns: str) -> list[list[str]]:
        """The processes of one container: the main one first."""
        enter = [self._nsenter, f"--net={netns}"]
        user = f"--user={plan.uid}:{plan.gid}"
        die = [self._setpriv, "--pdeathsig", "KILL", "--"]

        def stub(module: str, *args: str) -> list[str]:
            return [*enter, "--", *die, self.python, "-m", f"{PACKAGE}.{module}", *args]

        ports = [f"--tcp={p}" for p in plan.tcp] + [f"--udp={p}" for p in plan.udp]
        if plan.kind is kubelet.Kind.CLI:
            return [[*enter, "--", self.python, "-m", f"{PACKAGE}.launch", user, "--", *plan.args]]
        if plan.kind is kubelet.Kind.PROXY:
            return [stub("stubproxy", f"--name={name}", *ports, user, "--record")]
        if plan.kind is kubelet.Kind.APP:
            procs = [stub("probe", user)]
            if ports:
                procs.append(stub("stubproxy", f"--name={name}", *ports, user, "--record"))
            return procs
        ids = [f"--setuid={plan.uid}", f"--setgid={plan.gid}"]
        return [[*enter, *ids, "--", *die, *plan.args]]

    async def _start_container(self, pod: _Pod, c: _Container) -> _Run:
        sb = pod.sandbox
        assert sb is not None
        vdirs = {name: v.directory for name, v in pod.volumes.items()}
        plan = kubelet.plan(
            self._effective_pod(pod),
            c.spec,
            images=self.images,
            mount_list=kubelet.mounts(c.spec, vdirs),
            allow_root=self.allow_root,
        )
        if c.runs:
            c.status.restart_count += 1
        if "terminated" in c.status.state:
            c.status.last_state = c.status.state
        number = len(c.runs)
        log_dir = pod.log_dir / c.name
        log_dir.mkdir(parents=True, exist_ok=True)
        run = _Run(secrets.token_hex(32), log_dir / f"{number}.log", kubelet.now(), plan.kind)
        c.runs.append(run)
        c.current = run
        c.refusal = plan.reason
        c.status.container_id = run.container_id
        c.status.ready = False
        if plan.kind is kubelet.Kind.REFUSED:
            run.log_path.write_text(f"node stand-in: not started: {plan.reason}\n")
            c.status.state = kubelet.terminated(
                kubelet.START_ERROR_EXIT,
                started_at=run.started_at,
                container_id=run.container_id,
                message=plan.reason,
                reason="StartError",
            )
            run.exit_code = kubelet.START_ERROR_EXIT
            c.current = None
            return run
        env = dict(plan.env)
        if plan.kind is not kubelet.Kind.COMMAND:
            env["PYTHONUNBUFFERED"] = "1"  # our programs' lines reach the log at once
        log_fd = os.open(run.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for index, argv in enumerate(self._argv(plan, c.name, sb.netns)):
                stub = plan.kind in (kubelet.Kind.PROXY, kubelet.Kind.APP)
                probe = plan.kind is kubelet.Kind.APP and index == 0
                proc = await asyncio.shield(
                    self._spawn(
                        run,
                        argv,
                        env=env,
                        stdin=subprocess.PIPE if stub else subprocess.DEVNULL,
                        stdout=subprocess.PIPE if probe else log_fd,
                        stderr=log_fd,
                    )
                )
                for tree in self._trees:
                    with contextlib.suppress(OSError):  # it may have exited already
                        run.cgroup_dirs.append(
                            sb.cgroups.place(
                                proc.pid,
                                uid=pod.uid,
                                container=run.container_id,
                                driver=self.driver,
                                tree=tree,
                                qos=self._qos(pod),
                            )
                        )
        finally:
            os.close(log_fd)
        c.status.state = {"running": {"startedAt": run.started_at}}
        c.status.started = True
        if plan.kind in (kubelet.Kind.PROXY, kubelet.Kind.APP):
            self._detach(self._await_ready(pod, c, run))
        else:
            run.ready.set()
            c.status.ready = not c.status.init or c.status.sidecar
            c.started.set()
        return run

    async def _spawn(self, run: _Run, argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*argv, cwd="/", start_new_session=True, **kwargs)
        run.procs.append(proc)
        self._spawned.add(proc.pid)
        return proc

    async def _await_ready(self, pod: _Pod, c: _Container, run: _Run) -> None:
        """A stub is ready once it listens: the probe says so on stdout, the stub proxy in its log."""
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            if run.kind is kubelet.Kind.APP:
                stdout = run.procs[0].stdout
                assert stdout is not None
                line = await asyncio.wait_for(stdout.readline(), READY_TIMEOUT)
                if not json.loads(line or b"{}").get("ready"):
                    return
            servers = len(run.procs) - (1 if run.kind is kubelet.Kind.APP else 0)
            while servers and run.log_path.read_text(errors="replace").splitlines().count("ready") < servers:
                if (
                    time.monotonic() > deadline
                    or c.current is not run
                    or run.procs[-1].returncode is not None
                ):
                    return
                await asyncio.sleep(0.01)
        except (TimeoutError, ValueError, OSError):
            return
        if c.current is run:
            run.ready.set()
            c.status.ready = True
            c.started.set()
            await self._publish(pod)

    async def _finish_run(self, pod: _Pod, c: _Container, run: _Run, code: int) -> None:
        """Record the end of a run and clean up after it: its other processes, anything its
        processes left in its cgroups, its pipes."""
        for proc in run.procs:
            _killpg(proc.pid, signal.SIGKILL)
        for directory in run.cgroup_dirs:
            _kill_cgroup(directory)
        for proc in run.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
            self._spawned.discard(proc.pid)
        for directory in run.cgroup_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
        run.exit_code = code
        message = ""
        if code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _tail(run.log_path)
        c.status.state = kubelet.terminated(
            code, started_at=run.started_at, container_id=run.container_id, message=message
        )
        c.status.ready = False
        c.status.started = False
        c.started.clear()
        if c.current is run:
            c.current = None

    async def _stop_container(self, pod: _Pod, c: _Container, grace: float) -> None:
        """Stop the container's current run: SIGTERM, then SIGKILL after ``grace`` seconds."""
        run = c.current
        if run is None:
            return
        for proc in run.procs:
            _killpg(proc.pid, signal.SIGTERM)
        waits = [proc.wait() for proc in run.procs]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace)
        except TimeoutError:
            for proc in run.procs:
                _killpg(proc.pid, signal.SIGKILL)
        main = run.procs[0].returncode if run.procs else None
        await self._finish_run(pod, c, run, kubelet.exit_code_of(main if main is not None else -9))

    async def _halt(self, pod: _Pod, grace: float) -> None:
        """Cancel the pod's tasks and stop all its containers."""
        tasks = [t for t in [pod.runner, *(c.task for c in pod.all_containers())] if t is not None]
        await cancel_all(tasks)
        pod.runner = None
        for c in pod.all_containers():
            c.task = None
        await asyncio.gather(*(self._stop_container(pod, c, grace) for c in pod.all_containers()))

    def _grace(self, pod: _Pod) -> float:
        seconds = pod.meta.get("deletionGracePeriodSeconds")
        if not isinstance(seconds, int):
            seconds = pod.spec.get("terminationGracePeriodSeconds")
        return float(min(self.stop_timeout, seconds if isinstance(seconds, int) else 30))

    async def _terminate(self, pod: _Pod, *, confirm: bool) -> None:
        """The pod is being deleted: stop it, remove its sandbox and files, confirm the deletion."""
        try:
            await self._halt(pod, self._grace(pod))
            await self._remove_sandbox(pod)
            shutil.rmtree(pod.dir, ignore_errors=True)
            if confirm:
                await self._confirm_deletion(pod)
        except Exception as exc:
            log.exception("tearing down pod %s/%s", pod.namespace, pod.name)
            pod.error = f"teardown: {type(exc).__name__}: {exc}"
        finally:
            self._pods.pop(pod.uid, None)

    async def _confirm_deletion(self, pod: _Pod) -> None:
        """The kubelet's final delete: grace period 0, only this pod (UID precondition)."""
        assert self._api is not None
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": pod.uid},
        }
        try:
            response = await self._api.client.request(
                "DELETE", pod.path, content=json.dumps(body), headers={"Content-Type": "application/json"}
            )
        except Exception as exc:
            log.warning("confirming deletion of %s/%s: %r", pod.namespace, pod.name, exc)
            return
        if response.status_code not in (200, 202, 404, 409):
            log.warning(
                "confirming deletion of %s/%s: HTTP %s", pod.namespace, pod.name, response.status_code
            )

    async def _recreate(self, uid: str) -> PodView:
        pod = self._pods.get(uid)
        if pod is None or pod.terminating is not None:
            raise KeyError(f"no running pod {uid} on {self.node_name}")
        await self._halt(pod, self.stop_timeout)
        await self._remove_sandbox(pod)
        pod.generation += 1
        for c in pod.all_containers():
            c.failures = 0
            c.started.clear()
            if "terminated" in c.status.state:
                c.status.last_state = c.status.state
            c.status.state = {"waiting": {"reason": "PodInitializing"}}
            c.status.ready = False
            c.status.started = False
        await self._publish(pod)
        pod.runner = asyncio.create_task(self._run_pod(pod))
        while pod.sandbox is None or not pod.sandbox.ready:
            if pod.runner.done():
                raise RuntimeError(f"pod {uid}: the new sandbox failed: {pod.error}")
            await asyncio.sleep(0.01)
        return self._view(pod)

    # -- sandbox -----------------------------------------------------------------------------

    def _qos(self, pod: _Pod) -> str:
        qos = str((pod.obj.get("status") or {}).get("qosClass") or "BestEffort")
        return qos.lower()

    async def _create_sandbox_retrying(self, pod: _Pod) -> None:
        failures = 0
        while pod.sandbox is None:
            try:
                await self._create_sandbox(pod)
                pod.error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sandbox of %s/%s: %r", pod.namespace, pod.name, exc)
                pod.error = f"sandbox: {type(exc).__name__}: {exc}"
                await self._remove_sandbox(pod)
                failures += 1
                await asyncio.sleep(kubelet.backoff(failures, self.backoff_initial, self.backoff_max))

    async def _in_executor(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _create_sandbox(self, pod: _Pod) -> None:
        lab = self.lab
        assert lab is not None
        sb = _Sandbox(id=secrets.token_hex(32), cgroups=KubeletCgroups(top=self.cgroup_top))
        pod.sandbox = sb
        if pod.spec.get("hostNetwork"):
            sb.netns = f"/run/netns/{lab.node}"
            sb.ips = [lab.bridge_ipv4] + ([lab.bridge_ipv6] if self.ipv6 else [])
        else:
            suffix = f"{pod.uid[:8]}-{pod.generation}"
            sb.netns_name = f"{lab.prefix}-{suffix}"
            made: Pod = await self._in_executor(functools.partial(lab.add_pod, suffix, ipv6=self.ipv6))
            sb.netns, sb.ips = made.path, made.ips()
            sb.veth = await self._in_executor(functools.partial(self._host_veth, made.name))
            # As containerd does: unprivileged containers may bind ports below 1024 in their pod.
            await self._in_executor(
                functools.partial(
                    _run,
                    [
                        self._nsenter,
                        f"--net={sb.netns}",
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv4.ip_unprivileged_port_start=0",
                    ],
                )
            )
        sb.inode = os.stat(sb.netns).st_ino
        self._shared_cgroups(pod)
        argv = [
            self._nsenter,
            f"--net={sb.netns}",
            f"--setuid={kubelet.PAUSE_UID}",
            f"--setgid={kubelet.PAUSE_UID}",
        ]
        argv += ["--", self._setpriv, "--pdeathsig", "KILL", "--", "sleep", "infinity"]
        sb.pause = await asyncio.shield(self._spawn_pause(sb, argv))
        deadline = time.monotonic() + 10
        while True:  # the agent must never see the pause process outside the pod's namespace
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{sb.pause.pid}/ns/net").st_ino == sb.inode:
                    break
            if sb.pause.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pause process did not enter {sb.netns}")
            await asyncio.sleep(0.002)
        for tree in self._trees:
            sb.cgroup_dirs.append(
                sb.cgroups.place(
                    sb.pause.pid,
                    uid=pod.uid,
                    container=sb.id,
                    driver=self.driver,
                    tree=tree,
                    qos=self._qos(pod),
                )
            )
        sb.ready = True

    def _shared_cgroups(self, pod: _Pod) -> None:
        """Create the folders above the pod's own (``kubepods.slice/kubepods-<qos>.slice``) as the
        stand-in's, not the sandbox's: they are shared by its pods and removed at close, so tearing
        down one sandbox never waits on a folder that holds the others."""
        relative = pod_cgroup_path(pod.uid, "x", driver=self.driver, qos=self._qos(pod))
        found = mounts()
        for tree in self._trees:
            folder = found[tree] / self.cgroup_top
            folder.mkdir(exist_ok=True)
            for part in relative.split("/")[:-2]:
                folder = folder / part
                folder.mkdir(exist_ok=True)

    async def _spawn_pause(self, sb: _Sandbox, argv: list[str]) -> asyncio.subprocess.Process:
        # Shielded by the caller: a cancelled sandbox still learns of its pause process.
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        sb.pause = proc
        self._spawned.add(proc.pid)
        return proc

    def _host_veth(self, pod_netns: str) -> str:
        """The host end of the pod's ``eth0``, found by its peer index in the node namespace."""
        lab = self.lab
        assert lab is not None
        inside = json.loads(_run(["ip", "-n", pod_netns, "-j", "link", "show", "eth0"]).stdout or "[]")
        peer = inside[0].get("link_index") if inside else None
        links = json.loads(_run(["ip", "-n", lab.node, "-j", "link", "show"]).stdout or "[]")
        for link in links:
            if link.get("ifindex") == peer:
                return str(link["ifname"])
        raise RuntimeError(f"no veth peer of {pod_netns}'s eth0 in {lab.node}")

    async def _remove_sandbox(self, pod: _Pod) -> None:
        sb, pod.sandbox = pod.sandbox, None
        if sb is None:
            return
        if sb.pause is not None:
            _killpg(sb.pause.pid, signal.SIGKILL)
            await sb.pause.wait()
            self._spawned.discard(sb.pause.pid)
        for directory in sb.cgroup_dirs:
            with contextlib.suppress(OSError):
                for folder in [directory.parent, *directory.parent.iterdir()]:
                    if folder.is_dir():
                        _kill_cgroup(folder)
        await self._in_executor(sb.cgroups.close)  # may wait briefly on a folder a task just left
        for directory in sb.cgroup_dirs:  # the pod's own folder, if no other sandbox holds it
            with contextlib.suppress(OSError):
                directory.parent.rmdir()
        lab = self.lab
        if sb.netns_name and lab is not None:

            def remove() -> None:
                if sb.veth:
                    _run(["ip", "-n", lab.node, "link", "del", sb.veth])
                lab.remove_netns(sb.netns_name)

            await self._in_executor(remove)

    # -- volumes -----------------------------------------------------------------------------

    async def _prepare_volumes(self, pod: _Pod) -> None:
        for item in pod.spec.get("volumes") or []:
            name = str(item.get("name"))
            if "downwardAPI" in item:
                source = item["downwardAPI"] or {}
                volume = self._volume(pod, "downward-api", name, source.get("defaultMode"))
                volume.downward = list(source.get("items") or [])
            elif "projected" in item:
                source = item["projected"] or {}
                volume = self._volume(pod, "projected", name, source.get("defaultMode"))
                for projection in source.get("sources") or []:
                    if "downwardAPI" in projection:
                        volume.downward += list((projection["downwardAPI"] or {}).get("items") or [])
                    else:
                        volume.static.update(await self._projection(pod, name, projection))
            elif "configMap" in item or "secret" in item:
                kind = "configmap" if "configMap" in item else "secret"
                source = item.get("configMap") or item.get("secret") or {}
                volume = self._volume(pod, kind, name, source.get("defaultMode"))
                volume.static = await self._projection(
                    pod, name, {"configMap" if kind == "configmap" else "secret": source}
                )
            else:
                volume = self._volume(pod, "empty-dir", name, None)
                volume.directory.mkdir(parents=True, exist_ok=True)
                os.chmod(volume.directory, 0o777)
                if "emptyDir" not in item:
                    kinds = [k for k in item if k != "name"]
                    pod.notes.append(f"volume {name}: {kinds} not modelled, an empty folder")
                continue
            pod.volumes[name] = volume
        pod.volumes_ready = True
        self._refresh_downward(pod)

    def _volume(self, pod: _Pod, kind: str, name: str, mode: Any) -> _Volume:
        directory = pod.dir / "volumes" / f"kubernetes.io~{kind}" / name
        volume = _Volume(directory, mode if isinstance(mode, int) else 0o644)
        pod.volumes[name] = volume
        return volume

    async def _projection(self, pod: _Pod, volume: str, source: Mapping[str, Any]) -> dict[str, bytes]:
        """Files of a service account token, config map or secret source (empty, with a note on
        the pod, when it cannot be had)."""
        assert self._api is not None
        try:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"] or {}
                account = str(pod.spec.get("serviceAccountName") or "default")
                body = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "audiences": [token["audience"]] if token.get("audience") else [],
                        "expirationSeconds": int(token.get("expirationSeconds") or 3600),
                        "boundObjectRef": {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": pod.name,
                            "uid": pod.uid,
                        },
                    },
                }
                path = f"/api/v1/namespaces/{pod.namespace}/serviceaccounts/{account}/token"
                answer = await self._api.create(path, body)
                return {str(token.get("path") or "token"): str(answer["status"]["token"]).encode()}
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind] or {}
            ref_name = str(ref.get("name") or ref.get("secretName") or "")
            plural = "configmaps" if kind == "configMap" else "secrets"
            try:
                obj = await self._api.get(f"/api/v1/namespaces/{pod.namespace}/{plural}/{ref_name}")
            except ApiError as exc:
                if exc.status == 404 and ref.get("optional"):
                    return {}
                raise
            data: dict[str, bytes] = {}
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value) if kind == "secret" else str(value).encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
            items = ref.get("items")
            if not items:
                return data
            return {str(i["path"]): data[i["key"]] for i in items if i.get("key") in data and i.get("path")}
        except (ApiError, KeyError, ValueError) as exc:
            pod.notes.append(f"volume {volume}: {sorted(source)} not available: {exc}")
            return {}

    def _refresh_downward(self, pod: _Pod) -> None:
        """Rewrite each volume whose content changed (downward API values follow the pod)."""
        if not pod.volumes_ready:
            return
        effective = self._effective_pod(pod)
        for volume in pod.volumes.values():
            files = {**volume.static, **kubelet.downward_files(volume.downward, effective)}
            if files != volume.written:
                kubelet.write_atomic(volume.directory, files, volume.mode)
                volume.written = files

    # -- status ------------------------------------------------------------------------------

    async def _publish(self, pod: _Pod) -> None:
        """Patch the pod's status subresource with what the stand-in knows now."""
        assert self._api is not None and self.lab is not None
        async with pod.status_lock:
            sb = pod.sandbox
            status = kubelet.pod_status(
                conditions=pod.conditions,
                restart_policy=pod.restart_policy,
                sandbox_ready=sb is not None and sb.ready,
                pod_ips=sb.ips if sb and sb.ready else [],
                host_ips=[self.lab.bridge_ipv4] + ([self.lab.bridge_ipv6] if self.ipv6 else []),
                start_time=pod.start_time or kubelet.now(),
                inits=[c.status for c in pod.inits],
                containers=[c.status for c in pod.containers],
            )
            try:
                await self._api.merge_patch(
                    f"{pod.path}/status", {"metadata": {"uid": pod.uid}, "status": status}
                )
            except ApiError as exc:
                if exc.status in (404, 409) or pod.terminating is not None:
                    return  # gone, or the name now belongs to another pod
                log.warning("status of %s/%s: %s", pod.namespace, pod.name, exc)
                note = f"status patch refused: {exc}"
                if note not in pod.notes:
                    pod.notes.append(note)

    async def _app_request(self, uid: str, container: str, request: Mapping[str, Any]) -> dict[str, Any]:
        pod = self._pods.get(uid)
        if pod is None:
            raise KeyError(f"no pod {uid} on {self.node_name}")
        c = next((c for c in pod.all_containers() if c.name == container), None)
        run = c.current if c else None
        if run is None or run.kind is not kubelet.Kind.APP:
            raise RuntimeError(f"{container} of {pod.namespace}/{pod.name} is not a running app stub")
        await asyncio.wait_for(run.ready.wait(), READY_TIMEOUT)
        probe = run.procs[0]
        assert probe.stdin is not None and probe.stdout is not None
        async with run.probe_lock:
            probe.stdin.write(json.dumps(dict(request)).encode() + b"\n")
            await probe.stdin.drain()
            line = await asyncio.wait_for(probe.stdout.readline(), float(request.get("timeout", 3)) + 10)
        answer: dict[str, Any] = json.loads(line or b'{"ok": false, "error": "the app stub exited"}')
        return answer
