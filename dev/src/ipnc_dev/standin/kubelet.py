"""The kubelet's rules for one pod, as pure functions: the node stand-in's (``node``) model.

Everything the agent, the waiter and the tests read from a node or from a pod's status must look
as a kubelet makes it, or they would be tested against our idea of a kubelet instead. This module
holds those rules with no process, kernel or API call in it, so each can be checked alone:

* how a container runs on the stand-in (``plan``): which program, as which UID/GID, with which
  environment (``$(VAR)`` expansion, ``fieldRef`` values) and which paths (a volume mounted at
  ``mountPath`` is a folder on the host: arguments naming a path under it are rewritten);
* the downward API files (``downward_files``) and the atomic writer's folder layout
  (``write_atomic``: ``..<timestamp>`` version folders, a ``..data`` symlink swapped by rename,
  one symlink per item through ``..data``);
* a pod's status as the kubelet reports it: container states, ``restartCount``, conditions in the
  kubelet's order and with its reasons, and the phase (``pod_status``);
* crash-loop back-off (``backoff``).
"""

from __future__ import annotations

import enum
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from istio_pod_network_controller import names
from istio_pod_network_controller.podinfo import format_annotations

JSON = dict[str, Any]

PROG = "istio-pod-network-controller"
APP_UID = 1000  # a container with no runAsUser (an image's USER is unknown here)
PROXY_UID = 1337  # Istio's proxy image runs as 1337
PAUSE_UID = 65535  # the pause image's user
PROXY_PORTS = (15001, 15006, 15020, 15021, 15090)  # outbound, inbound, merged metrics, health, stats
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DATA = "..data"
DATA_TMP = "..data_tmp"
START_ERROR_EXIT = 128  # what the kubelet reports for a container that could not be started


def now() -> str:
    """An RFC 3339 time stamp in UTC, with seconds, as the API server stores them."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [str(item) for item in _list(value)]


# -- field references (env valueFrom and downward API items) ----------------------------------


def _keyed(path: str, prefix: str) -> str | None:
    """``metadata.labels['key']`` -> ``key`` (None when ``path`` is not of that form)."""
    if not (path.startswith(prefix + "[") and path.endswith("]")):
        return None
    inner = path[len(prefix) + 1 : -1]
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return inner[1:-1]
    return None


def field_value(pod: Mapping[str, Any], path: str) -> str | None:
    """The value of a ``fieldRef.fieldPath`` as the kubelet renders it (None: not supported).

    Whole label and annotation maps come in the downward API file format (``key="value"`` lines).
    """
    meta, spec, status = (_mapping(pod.get(k)) for k in ("metadata", "spec", "status"))
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels")).items()}
    annotations = {str(k): str(v) for k, v in _mapping(meta.get("annotations")).items()}
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
    }
    if path in simple:
        value = simple[path]
        return "" if value is None else str(value)
    if path in ("status.podIPs", "status.hostIPs"):
        return ",".join(str(_mapping(i).get("ip", "")) for i in _list(status.get(path.split(".")[1])))
    if path == "metadata.labels":
        return format_annotations(labels)
    if path == "metadata.annotations":
        return format_annotations(annotations)
    for prefix, values in (("metadata.labels", labels), ("metadata.annotations", annotations)):
        key = _keyed(path, prefix)
        if key is not None:
            return values.get(key, "")
    return None


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values: a defined variable is
    replaced, an undefined reference is kept as written, ``$$`` is a literal ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if text[i + 1] == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment: a minimal base, then its ``env`` in order (``value`` with
    expansion of earlier variables, ``valueFrom.fieldRef``). ``configMapKeyRef``,
    ``secretKeyRef``, ``resourceFieldRef`` and ``envFrom`` are not resolved (left unset)."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": "/",
        "HOSTNAME": str(_mapping(pod.get("metadata")).get("name", "")),
    }
    for item in _list(container.get("env")):
        entry = _mapping(item)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            continue
        if "value" in entry:
            env[name] = expand(str(entry.get("value") or ""), env)
            continue
        ref = _mapping(_mapping(entry.get("valueFrom")).get("fieldRef")).get("fieldPath")
        if isinstance(ref, str):
            value = field_value(pod, ref)
            if value is not None:
                env[name] = value
        elif "valueFrom" not in entry:
            env[name] = ""
    return env


# -- volumes -------------------------------------------------------------------------------


def mounts(container: Mapping[str, Any], volume_dirs: Mapping[str, Path]) -> list[tuple[str, str]]:
    """``(mountPath, host folder)`` for each of the container's volume mounts (``subPath``
    appended), longest mount path first, so that nested mounts win."""
    found: list[tuple[str, str]] = []
    for item in _list(container.get("volumeMounts")):
        vm = _mapping(item)
        name, mount_path = vm.get("name"), vm.get("mountPath")
        if not isinstance(mount_path, str) or name not in volume_dirs or mount_path.rstrip("/") == "":
            continue
        host = volume_dirs[str(name)]
        sub = vm.get("subPath")
        if isinstance(sub, str) and sub and not sub.startswith("/") and ".." not in sub.split("/"):
            host = host / sub
        found.append((posixpath.normpath(mount_path), str(host)))
    return sorted(found, key=lambda m: len(m[0]), reverse=True)


def map_path(value: str, mount_list: Sequence[tuple[str, str]]) -> str:
    """``value`` with a leading container path under a mount replaced by the host folder; also
    inside ``--flag=PATH``. Anything else is returned as it is."""
    for mount_path, host in mount_list:
        if value == mount_path or value.startswith(mount_path + "/"):
            return host + value[len(mount_path) :]
    flag, eq, rest = value.partition("=")
    if eq and flag.startswith("-") and rest:
        mapped = map_path(rest, mount_list)
        if mapped != rest:
            return f"{flag}={mapped}"
    return value


def downward_files(items: Iterable[Any], pod: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of a downward API volume (or projection): item path -> content. Items with a
    ``resourceFieldRef`` or an unsupported field path are left out."""
    files: dict[str, bytes] = {}
    for item in items:
        entry = _mapping(item)
        path = entry.get("path")
        ref = _mapping(entry.get("fieldRef")).get("fieldPath")
        if isinstance(path, str) and isinstance(ref, str):
            value = field_value(pod, ref)
            if value is not None:
                files[path] = value.encode("utf-8")
    return files


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts


def write_atomic(directory: Path, files: Mapping[str, bytes], mode: int = 0o644) -> None:
    """Publish ``files`` (relative path -> content) in ``directory`` as the kubelet's atomic writer
    does, so a reader sees either the old set or the new one, never a mix: the new version goes
    into a fresh ``..<time>.<random>`` folder, a ``..data_tmp`` symlink to it is renamed over
    ``..data``, each top-level name is a symlink into ``..data``, then the old version is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    version = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    os.chmod(version, 0o755)
    for relative, data in files.items():
        if not _safe_relative(relative):
            continue
        target = version / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode)
    data_link = directory / DATA
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = directory / DATA_TMP
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version.name)
    os.rename(tmp, data_link)
    top = {relative.split("/")[0] for relative in files if _safe_relative(relative)}
    for name in top:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA}/{name}")
    for entry in directory.iterdir():
        if entry.name.startswith("..") or entry.name in top or not entry.is_symlink():
            continue
        if os.readlink(entry).startswith(f"{DATA}/"):
            entry.unlink()
    if previous is not None and previous != version.name and not previous.startswith("/"):
        shutil.rmtree(directory / previous, ignore_errors=True)


# -- how a container runs here ---------------------------------------------------------------


class Kind(enum.Enum):
    CLI = "cli"  # the project's image: its CLI with the container's arguments
    PROXY = "proxy"  # Istio's proxy image running `proxy ...`: the stub proxy
    APP = "app"  # any other image without a command: the app stub
    COMMAND = "command"  # any other image with a command: that command, from the host's file system
    REFUSED = "refused"  # not run here; reported as a StartError with ``Plan.reason``


@dataclass(frozen=True, slots=True)
class Images:
    """How an image is recognised: by a part of its reference."""

    project: str = PROG
    proxy: str = "proxyv2"


@dataclass(frozen=True, slots=True)
class Plan:
    """How the stand-in runs one container."""

    kind: Kind
    args: tuple[str, ...]  # CLI: the CLI's arguments; COMMAND: the whole argv; else ()
    uid: int
    gid: int
    env: Mapping[str, str]
    tcp: tuple[int, ...] = ()  # ports the stub listens on (PROXY, APP)
    udp: tuple[int, ...] = ()
    reason: str = ""  # REFUSED: why


def identity(pod: Mapping[str, Any], container: Mapping[str, Any], default_uid: int) -> tuple[int, int]:
    """``runAsUser``/``runAsGroup``: the container's, else the pod's; the group defaults to the
    user (an image's own USER and group are unknown here)."""
    pod_sc = _mapping(_mapping(pod.get("spec")).get("securityContext"))
    own_sc = _mapping(container.get("securityContext"))

    def pick(key: str) -> int | None:
        for sc in (own_sc, pod_sc):
            value = sc.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    uid = pick("runAsUser")
    uid = default_uid if uid is None else uid
    gid = pick("runAsGroup")
    return uid, uid if gid is None else gid


def _ports(container: Mapping[str, Any], protocol: str) -> tuple[int, ...]:
    found: list[int] = []
    for item in _list(container.get("ports")):
        port = _mapping(item)
        number = port.get("containerPort")
        if isinstance(number, int) and str(port.get("protocol") or "TCP") == protocol and number not in found:
            found.append(number)
    return tuple(found)


def plan(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    images: Images,
    mount_list: Sequence[tuple[str, str]],
    allow_root: bool = False,
) -> Plan:
    """How ``container`` of ``pod`` runs on the stand-in (see ``Kind``). ``pod`` should carry the
    status the stand-in has set (pod IPs), as ``fieldRef`` values are read from it."""
    image = str(container.get("image") or "")
    env = container_env(pod, container)
    env = {k: map_path(v, mount_list) for k, v in env.items()}
    command = [map_path(expand(w, env), mount_list) for w in _strings(container.get("command"))]
    args = [map_path(expand(w, env), mount_list) for w in _strings(container.get("args"))]
    words = command + args
    is_proxy = images.proxy in image
    uid, gid = identity(pod, container, PROXY_UID if is_proxy else APP_UID)

    def refused(reason: str) -> Plan:
        return Plan(Kind.REFUSED, (), uid, gid, env, reason=reason)

    if images.project in image:
        if command and posixpath.basename(command[0]) not in (PROG, "ipnc"):
            return refused(f"{command[0]!r} is not in the project's image (its entry point is {PROG})")
        rest = (command[1:] if command else []) + args
        if rest[:1] == [names.WAITER_SUBCOMMAND] and not any(
            a == "--file" or a.startswith("--file=") for a in rest
        ):
            default = map_path(names.ANNOTATIONS_FILE, mount_list)
            if default != names.ANNOTATIONS_FILE:
                rest += ["--file", default]
        if uid == 0 and not allow_root:
            return refused("the node stand-in runs no project container as root (UID 0)")
        return Plan(Kind.CLI, tuple(rest), uid, gid, env)
    if is_proxy:
        if any(posixpath.basename(w) == "istio-iptables" for w in words):
            return refused(
                "istio-iptables needs NET_ADMIN to write the pod's iptables rules; the node stand-in "
                "does not run it (the webhook should have replaced this istio-init)"
            )
        if words[:1] == ["proxy"]:
            tcp = tuple(dict.fromkeys((*PROXY_PORTS, *_ports(container, "TCP"))))
            return Plan(Kind.PROXY, (), uid, gid, env, tcp=tcp, udp=_ports(container, "UDP"))
        return refused(f"{image} with arguments {words[:2]} is not modelled (only 'proxy ...')")
    if command:
        if uid == 0 and not allow_root:
            return refused("the node stand-in runs no command as root (UID 0)")
        return Plan(Kind.COMMAND, tuple(words), uid, gid, env)
    return Plan(Kind.APP, (), uid, gid, env, tcp=_ports(container, "TCP"), udp=_ports(container, "UDP"))


def backoff(failures: int, initial: float, cap: float) -> float:
    """Crash-loop back-off before the next start after ``failures`` (>= 1) failed runs:
    initial, 2x, 4x, ... capped (the kubelet: 10 s doubling to 5 min)."""
    return float(min(cap, initial * 2 ** max(0, failures - 1)))


def image_id(image: str) -> str:
    """A stable stand-in for the image digest (nothing is pulled here)."""
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


# -- status ----------------------------------------------------------------------------------


@dataclass
class ContainerStatus:
    """One container's status as the kubelet reports it (``status.*ContainerStatuses[]``)."""

    name: str
    image: str
    init: bool = False
    sidecar: bool = False  # an init container with restartPolicy Always
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "PodInitializing"}})
    last_state: JSON = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    container_id: str = ""

    def to_json(self) -> JSON:
        out: JSON = {
            "name": self.name,
            "image": self.image,
            "imageID": image_id(self.image) if self.container_id else "",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            out["containerID"] = f"containerd://{self.container_id}"
        if not self.init or self.sidecar:
            out["started"] = self.started
        return out

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return int(terminated["exitCode"]) if isinstance(terminated, dict) else None

    @property
    def completed(self) -> bool:
        """An init container that ran to success (the next one may start)."""
        return self.exit_code == 0


def terminated(
    exit_code: int, *, started_at: str, container_id: str, message: str = "", reason: str = ""
) -> JSON:
    """A ``terminated`` state; ``exit_code`` as the kubelet reports it (128+N for signal N)."""
    body: JSON = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": started_at,
        "finishedAt": now(),
    }
    if container_id:
        body["containerID"] = f"containerd://{container_id}"
    if message:
        body["message"] = message
    return {"terminated": body}


def exit_code_of(returncode: int) -> int:
    """Popen's return code (-N: killed by signal N) as a container exit code (128+N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Conditions:
    """The pod's conditions with their last transition times (kept across reports)."""

    since: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (status, time)

    def condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> JSON:
        status = "True" if ok else "False"
        known = self.since.get(kind)
        if known is None or known[0] != status:
            known = (status, now())
            self.since[kind] = known
        body: JSON = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": known[1]}
        if not ok and reason:
            body["reason"] = reason
        if not ok and message:
            body["message"] = message
        return body


def phase(
    restart_policy: str, inits: Sequence[ContainerStatus], containers: Sequence[ContainerStatus]
) -> str:
    """The kubelet's pod phase: Pending while initializing or while a container has never run;
    Running while one runs (or restarts); then Succeeded or Failed by exit codes and policy."""
    for c in inits:
        if c.sidecar:
            continue
        if not c.completed:
            if c.exit_code is not None and restart_policy == "Never":
                return "Failed"
            return "Pending"
    running = waiting = stopped = succeeded = failed = 0
    for c in containers:
        if c.running:
            running += 1
        elif c.exit_code is not None:
            stopped += 1
            if c.exit_code == 0:
                succeeded += 1
            else:
                failed += 1
        elif "terminated" in c.last_state:
            stopped += 1  # waiting to restart after a run
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if not stopped:
        return "Pending"
    if restart_policy == "Always":
        return "Running"
    if restart_policy == "OnFailure" and failed:
        return "Running"
    return "Failed" if failed else "Succeeded"


def pod_status(
    *,
    conditions: Conditions,
    restart_policy: str,
    sandbox_ready: bool,
    pod_ips: Sequence[str],
    host_ips: Sequence[str],
    start_time: str,
    inits: Sequence[ContainerStatus],
    containers: Sequence[ContainerStatus],
) -> JSON:
    """``status`` as the kubelet writes it (conditions in its order, with its reasons)."""
    current = phase(restart_policy, inits, containers)
    incomplete = [c.name for c in inits if not (c.started if c.sidecar else c.completed)]
    unready = [c.name for c in [*[i for i in inits if i.sidecar], *containers] if not c.ready]
    done = current in ("Succeeded", "Failed")
    ready_reason = "PodCompleted" if done else "ContainersNotReady"
    ready_message = "" if done else f"containers with unready status: [{' '.join(unready)}]"
    body: JSON = {
        "phase": current,
        "conditions": [
            conditions.condition("PodReadyToStartContainers", sandbox_ready),
            conditions.condition(
                "Initialized",
                not incomplete,
                "PodCompleted" if done else "ContainersNotInitialized",
                "" if done else f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
            conditions.condition("Ready", not unready and not done, ready_reason, ready_message),
            conditions.condition("ContainersReady", not unready and not done, ready_reason, ready_message),
            conditions.condition("PodScheduled", True),
        ],
        "startTime": start_time,
        "initContainerStatuses": [c.to_json() for c in inits],
        "containerStatuses": [c.to_json() for c in containers],
    }
    if host_ips:
        body["hostIP"] = host_ips[0]
        body["hostIPs"] = [{"ip": ip} for ip in host_ips]
    if pod_ips:
        body["podIP"] = pod_ips[0]
        body["podIPs"] = [{"ip": ip} for ip in pod_ips]
    return body
