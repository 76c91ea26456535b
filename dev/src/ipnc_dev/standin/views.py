"""What tests see of a node stand-in's pods: frozen snapshots, made in its thread and handed out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..netlab import Netlab
from . import kubelet
from .state import PodState


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


def view_of(pod: PodState, lab: Netlab | None) -> PodView:
    """A frozen snapshot of the pod, safe to hand to another thread."""
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
