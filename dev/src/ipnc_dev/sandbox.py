"""Pod sandboxes as the kubelet makes them, and nothing more: for the agent's tests and benchmark.

For a pod bound to the node it creates what the agent looks for on a real node -- a network
namespace on the lab's bridge, a pause-like process inside it placed in a kubelet-style pod
cgroup -- and reports the pod IP in the pod's status. It runs no containers (the node stand-in,
``node``, does that); the agent's tests need only the sandbox, and this keeps their
timing about the agent.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cgroups import KubeletCgroups
from .netlab import Netlab, Pod, Process


@dataclass
class Sandbox:
    uid: str
    pod: Pod
    pause: Process

    @property
    def path(self) -> str:
        return self.pod.path


@dataclass
class Sandboxes:
    lab: Netlab
    cgroups: KubeletCgroups
    kubectl: Any  # ControlPlane.kubectl
    by_uid: dict[str, Sandbox] = field(default_factory=dict)
    _count: int = 0

    def create(self, pod: dict[str, Any], *, ipv6: bool = False, report: bool = True) -> Sandbox:
        """Make ``pod``'s sandbox (the pod as returned by the API server) and report its IP."""
        uid = pod["metadata"]["uid"]
        self._count += 1
        lab_pod = self.lab.add_pod(f"s{self._count}", ipv6=ipv6)
        pause = self.lab.sleeper(lab_pod.path)
        self.cgroups.place(pause.pid, uid=uid, container="pause")
        box = Sandbox(uid, lab_pod, pause)
        self.by_uid[uid] = box
        if report:
            self.report_ip(pod, box)
        return box

    def report_ip(self, pod: dict[str, Any], box: Sandbox) -> None:
        ips = [{"ip": ip} for ip in box.pod.ips()]
        status = {
            "status": {"phase": "Pending", "podIP": ips[0]["ip"], "podIPs": ips, "hostIP": "10.250.0.1"}
        }
        meta = pod["metadata"]
        self.kubectl(
            "patch", "pod", meta["name"], "-n", meta["namespace"], "--subresource=status",
            "--type=merge", "-p", json.dumps(status),
        )  # fmt: skip

    def recreate(self, pod: dict[str, Any]) -> Sandbox:
        """A new sandbox for the same pod (new namespace, new IP), after the old one is torn
        down, in the kubelet's order."""
        old = self.by_uid.pop(pod["metadata"]["uid"])
        old.pause.stop()
        self.lab.remove_netns(old.pod.path)
        return self.create(pod, ipv6=old.pod.ipv6 is not None)

    def iptables_save(self, uid: str, command: str = "iptables-save") -> str:
        box = self.by_uid[uid]
        done = subprocess.run(  # noqa: S603 -- fixed tool, a namespace path we created
            ["nsenter", f"--net={box.path}", command], capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout

    def inode(self, uid: str) -> int:
        return Path(self.by_uid[uid].path).stat().st_ino
