"""A pod's sandbox on a node stand-in: its network namespace on the node's bridge (IPs, veth),
the pause process holding it, and the kubelet-style pod cgroups that process is placed in, so that
the agent finds the namespace by the pod's UID exactly as on a node. Created with back-off,
removed with everything it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import time

from ..cgroups import KubeletCgroups, mounts, pod_cgroup_path
from ..netlab import Pod
from . import kubelet
from .processes import kill_cgroup, killpg, run_tool
from .state import NodeContext, PodState, Sandbox

log = logging.getLogger(__name__)


class Sandboxes:
    """Makes and removes the sandboxes of one stand-in's pods (in its thread)."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    async def create_retrying(self, pod: PodState) -> None:
        failures = 0
        while pod.sandbox is None:
            try:
                await self._create(pod)
                pod.error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sandbox of %s/%s: %r", pod.namespace, pod.name, exc)
                pod.error = f"sandbox: {type(exc).__name__}: {exc}"
                await self.remove(pod)
                failures += 1
                await asyncio.sleep(
                    kubelet.backoff(failures, self.node.backoff_initial, self.node.backoff_max)
                )

    async def _create(self, pod: PodState) -> None:
        lab = self.node.the_lab()
        sb = Sandbox(id=secrets.token_hex(32), cgroups=KubeletCgroups(top=self.node.cgroup_top))
        pod.sandbox = sb
        if pod.spec.get("hostNetwork"):
            sb.netns = f"/run/netns/{lab.node}"
            sb.ips = [lab.bridge_ipv4] + ([lab.bridge_ipv6] if self.node.ipv6 else [])
        else:
            suffix = f"{pod.uid[:8]}-{pod.generation}"
            sb.netns_name = f"{lab.prefix}-{suffix}"
            made: Pod = await self.node.in_executor(
                functools.partial(lab.add_pod, suffix, ipv6=self.node.ipv6)
            )
            sb.netns, sb.ips = made.path, made.ips()
            sb.veth = await self.node.in_executor(functools.partial(self._host_veth, made.name))
            # As containerd does: unprivileged containers may bind ports below 1024 in their pod.
            await self.node.in_executor(
                functools.partial(
                    run_tool,
                    [
                        self.node.nsenter,
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
            self.node.nsenter,
            f"--net={sb.netns}",
            f"--setuid={kubelet.PAUSE_UID}",
            f"--setgid={kubelet.PAUSE_UID}",
        ]
        argv += ["--", self.node.setpriv, "--pdeathsig", "KILL", "--", "sleep", "infinity"]
        sb.pause = await asyncio.shield(self._spawn_pause(sb, argv))
        deadline = time.monotonic() + 10
        while True:  # the agent must never see the pause process outside the pod's namespace
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{sb.pause.pid}/ns/net").st_ino == sb.inode:
                    break
            if sb.pause.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pause process did not enter {sb.netns}")
            await asyncio.sleep(0.002)
        for tree in self.node.trees:
            sb.cgroup_dirs.append(
                sb.cgroups.place(
                    sb.pause.pid,
                    uid=pod.uid,
                    container=sb.id,
                    driver=self.node.driver,
                    tree=tree,
                    qos=pod.qos,
                )
            )
        sb.ready = True

    def _shared_cgroups(self, pod: PodState) -> None:
        """Create the folders above the pod's own (``kubepods.slice/kubepods-<qos>.slice``) as the
        stand-in's, not the sandbox's: they are shared by its pods and removed at close, so tearing
        down one sandbox never waits on a folder that holds the others."""
        relative = pod_cgroup_path(pod.uid, "x", driver=self.node.driver, qos=pod.qos)
        found = mounts()
        for tree in self.node.trees:
            folder = found[tree] / self.node.cgroup_top
            folder.mkdir(exist_ok=True)
            for part in relative.split("/")[:-2]:
                folder = folder / part
                folder.mkdir(exist_ok=True)

    async def _spawn_pause(self, sb: Sandbox, argv: list[str]) -> asyncio.subprocess.Process:
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
        self.node.spawned.add(proc.pid)
        return proc

    def _host_veth(self, pod_netns: str) -> str:
        """The host end of the pod's ``eth0``, found by its peer index in the node namespace."""
        lab = self.node.the_lab()
        inside = json.loads(run_tool(["ip", "-n", pod_netns, "-j", "link", "show", "eth0"]).stdout or "[]")
        peer = inside[0].get("link_index") if inside else None
        links = json.loads(run_tool(["ip", "-n", lab.node, "-j", "link", "show"]).stdout or "[]")
        for link in links:
            if link.get("ifindex") == peer:
                return str(link["ifname"])
        raise RuntimeError(f"no veth peer of {pod_netns}'s eth0 in {lab.node}")

    async def remove(self, pod: PodState) -> None:
        sb, pod.sandbox = pod.sandbox, None
        if sb is None:
            return
        if sb.pause is not None:
            killpg(sb.pause.pid, signal.SIGKILL)
            await sb.pause.wait()
            self.node.spawned.discard(sb.pause.pid)
        for directory in sb.cgroup_dirs:
            with contextlib.suppress(OSError):
                for folder in [directory.parent, *directory.parent.iterdir()]:
                    if folder.is_dir():
                        kill_cgroup(folder)
        await self.node.in_executor(sb.cgroups.close)  # may wait briefly on a folder a task just left
        for directory in sb.cgroup_dirs:  # the pod's own folder, if no other sandbox holds it
            with contextlib.suppress(OSError):
                directory.parent.rmdir()
        lab = self.node.lab
        if sb.netns_name and lab is not None:

            def remove() -> None:
                if sb.veth:
                    run_tool(["ip", "-n", lab.node, "link", "del", sb.veth])
                lab.remove_netns(sb.netns_name)

            await self.node.in_executor(remove)
