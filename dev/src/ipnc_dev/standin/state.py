"""What a node stand-in knows, touched only in its own thread: the node's settings and shared
kernel objects (``NodeContext``), and per pod its sandbox, volumes and container runs.

The other modules of the stand-in act on these; ``views`` turns them into the frozen snapshots
tests see.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from istio_pod_network_controller.cluster.api import Api

from ..cgroups import Driver, KubeletCgroups
from ..netlab import Netlab
from . import kubelet

JSON = dict[str, Any]
T = TypeVar("T")


@dataclass
class NodeContext:
    """One stand-in's settings and what its parts share (the event loop's thread only)."""

    node_name: str
    ipv6: bool = False
    images: kubelet.Images = field(default_factory=kubelet.Images)
    python: str = sys.executable
    driver: Driver = Driver.SYSTEMD
    backoff_initial: float = 1.0
    backoff_max: float = 16.0
    stop_timeout: float = 5.0
    allow_root: bool = False
    cgroup_top: str = ""
    nsenter: str = "nsenter"
    setpriv: str = "setpriv"
    lab: Netlab | None = None
    trees: list[str] = field(default_factory=list)  # the cgroup trees pods are placed in
    spawned: set[int] = field(default_factory=set)  # every PID we started, for the last-resort sweep
    api: Api | None = None
    executor: ThreadPoolExecutor | None = None

    def the_lab(self) -> Netlab:
        if self.lab is None:
            raise RuntimeError(f"node stand-in {self.node_name} has no network")
        return self.lab

    def the_api(self) -> Api:
        if self.api is None:
            raise RuntimeError(f"node stand-in {self.node_name} is not connected to the API server")
        return self.api

    async def in_executor(self, fn: Callable[[], T]) -> T:
        """Run blocking work (``ip``, cgroup folders) off the event loop, one at a time."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def host_ips(self) -> list[str]:
        lab = self.the_lab()
        return [lab.bridge_ipv4] + ([lab.bridge_ipv6] if self.ipv6 else [])

    def effective_pod(self, pod: PodState) -> JSON:
        """The pod with the status we report (field references read pod IPs before the API has
        them)."""
        status = dict(pod.obj.get("status") or {})
        sb = pod.sandbox
        if sb is not None and sb.ips:
            status["podIP"], status["podIPs"] = sb.ips[0], [{"ip": ip} for ip in sb.ips]
        if self.lab is not None:
            status["hostIP"], status["hostIPs"] = self.lab.bridge_ipv4, [{"ip": self.lab.bridge_ipv4}]
        return {**pod.obj, "status": status}


@dataclass
class Run:
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
class ContainerState:
    spec: Mapping[str, Any]
    status: kubelet.ContainerStatus
    runs: list[Run] = field(default_factory=list)
    current: Run | None = None
    task: asyncio.Task[None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0  # consecutive failed runs (back-off)
    refusal: str = ""

    @property
    def name(self) -> str:
        return self.status.name


@dataclass
class Sandbox:
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
class Volume:
    directory: Path
    mode: int
    static: dict[str, bytes] = field(default_factory=dict)  # tokens, config maps, secrets
    downward: list[Any] = field(default_factory=list)  # downward API items
    written: dict[str, bytes] | None = None


@dataclass
class PodState:
    obj: JSON
    dir: Path
    log_dir: Path
    inits: list[ContainerState]
    containers: list[ContainerState]
    conditions: kubelet.Conditions = field(default_factory=kubelet.Conditions)
    start_time: str = ""
    sandbox: Sandbox | None = None
    generation: int = 0
    volumes: dict[str, Volume] = field(default_factory=dict)
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

    @property
    def qos(self) -> str:
        """The QoS class, lowercase, as the kubelet names its cgroup folders."""
        return str((self.obj.get("status") or {}).get("qosClass") or "BestEffort").lower()

    def all_containers(self) -> list[ContainerState]:
        return [*self.inits, *self.containers]


def new_pod(obj: JSON, workdir: Path) -> PodState:
    """A pod first seen: its folders (volumes, logs) made, its containers waiting."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    uid = str(meta["uid"])
    pod_dir = workdir / "pods" / uid
    log_dir = workdir / "logs" / f"{meta.get('namespace', 'default')}_{meta['name']}_{uid}"
    for folder in (pod_dir, log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return PodState(
        obj=obj,
        dir=pod_dir,
        log_dir=log_dir,
        inits=_new_containers(spec, "initContainers", True),
        containers=_new_containers(spec, "containers", False),
    )


def _new_containers(spec: Mapping[str, Any], key: str, init: bool) -> list[ContainerState]:
    found = []
    for item in spec.get(key) or []:
        sidecar = init and item.get("restartPolicy") == "Always"
        status = kubelet.ContainerStatus(
            name=str(item.get("name")), image=str(item.get("image") or ""), init=init, sidecar=sidecar
        )
        found.append(ContainerState(spec=item, status=status))
    return found
