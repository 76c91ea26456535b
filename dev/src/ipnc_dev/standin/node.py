"""``NodeStandIn``: one simulated node's thread and event loop, the blocking calls tests make, and
each pod's life on it (sandbox, volumes, init containers in order, containers, back-off, deletion,
status). What it models and what it leaves out: the package's docstring (``ipnc_dev.standin``).

Its parts: ``watch`` (the pods bound to the node), ``sandbox`` (namespace, pause process,
cgroups), ``volumes``, ``containers`` (a container's runs), ``kubelet`` (the kubelet's rules, pure),
``state`` and ``views`` (what it knows, and the snapshots tests get).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from istio_pod_network_controller.cluster.api import Api, ApiError

from ..cgroups import Driver, mounts
from ..netlab import Netlab
from . import kubelet
from .containers import Containers
from .processes import kill_cgroup, killpg, our_group_leader
from .sandbox import Sandboxes
from .state import JSON, ContainerState, NodeContext, PodState, new_pod
from .views import PodView, view_of
from .volumes import Volumes
from .watch import follow_pods

log = logging.getLogger(__name__)

T = TypeVar("T")

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


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has finished; a task that failed (a bug, not the
    cancellation) raises its error here."""
    for task in tasks:
        task.cancel()
    ended = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [e for e in ended if isinstance(e, Exception)]
    if failed:
        raise failed[0]


# -- the stand-in ----------------------------------------------------------------------------


class NodeStandIn:
    """The kubelet's part for node ``node_name`` (see ``ipnc_dev.standin``'s docstring).

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
        self.start_timeout = start_timeout
        self.node = NodeContext(
            node_name=node_name,
            ipv6=ipv6,
            images=images or kubelet.Images(),
            python=python,
            driver=driver,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            stop_timeout=stop_timeout,
            allow_root=allow_root,
            cgroup_top=f"ipnc-node-{secrets.token_hex(3)}",
            nsenter=shutil.which("nsenter") or "nsenter",
            setpriv=shutil.which("setpriv") or "setpriv",
        )
        self.cgroup_top = self.node.cgroup_top
        self._workdir_parent = workdir_parent
        self._subnet4, self._subnet6 = subnet4, subnet6
        self._subnet_index: int | None = None
        self.workdir = Path()
        self.lab: Netlab | None = None
        self._pods: dict[str, PodState] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sandboxes = Sandboxes(self.node)
        self._volumes = Volumes(self.node)
        self._containers = Containers(self.node, publish=self._publish, detach=self._detach)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None
        self._stop: asyncio.Event | None = None
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
            if self._subnet4 is None or (self.node.ipv6 and self._subnet6 is None):
                self._subnet_index = _allocate_subnet()
            n = self._subnet_index or 0
            self.lab = Netlab(
                subnet4=self._subnet4 or f"10.244.{16 * n}.0/20",
                subnet6=self._subnet6 or f"fd00:10:244:{n:x}::/64",
            )
            self.lab.start()
            self.node.lab = self.lab
            found = mounts()
            self.node.trees = [tree for tree in ("v2", "pids") if tree in found]
            if not self.node.trees:
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
        for pid in sorted(self.node.spawned):
            if our_group_leader(pid):
                killpg(pid, signal.SIGKILL)

    def _sweep_cgroups(self) -> None:
        """Remove our cgroup folder in every tree (parents shared by pods stay until here)."""
        for mount in mounts().values():
            top = mount / self.node.cgroup_top
            if not top.is_dir():
                continue
            folders = [p for p in top.rglob("*") if p.is_dir()]
            folders.sort(key=lambda p: len(p.parts), reverse=True)
            for folder in [*folders, top]:
                kill_cgroup(folder)
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
        self.node.executor = ThreadPoolExecutor(1, thread_name_prefix=f"node-standin-{self.node_name}")
        self.node.api = Api.from_kubeconfig(self.kubeconfig)
        client = AsyncClient(config=KubeConfig.from_file(self.kubeconfig), trust_env=False)
        synced = asyncio.Event()
        task = asyncio.create_task(follow_pods(client, self.node_name, self._on_change, synced))
        try:
            waiting = asyncio.create_task(synced.wait())
            await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if task.done():
                task.result()
            self._ready.set()
            await self._stop.wait()
        finally:
            await cancel_all([task])
            await asyncio.gather(*(self._shutdown_pod(p) for p in list(self._pods.values())))
            await client.close()
            await self.node.api.close()
            self.node.executor.shutdown(wait=True)

    async def _shutdown_pod(self, pod: PodState) -> None:
        with contextlib.suppress(Exception):
            if pod.terminating is not None:
                pod.terminating.cancel()
            await self._halt(pod, min(self.node.stop_timeout, 2.0))
            await self._sandboxes.remove(pod)
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
            return [view_of(p, self.lab) for p in self._pods.values()]

        return self._call(views)

    def get(self, uid: str) -> PodView | None:
        async def view() -> PodView | None:
            pod = self._pods.get(uid)
            return view_of(pod, self.lab) if pod else None

        return self._call(view)

    def find(self, namespace: str, name: str) -> PodView | None:
        async def view() -> PodView | None:
            for pod in self._pods.values():
                if pod.namespace == namespace and pod.name == name and pod.terminating is None:
                    return view_of(pod, self.lab)
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
        answer = self._call(
            lambda: self._containers.app_request(self._pod(uid), container, request), timeout + 15
        )
        reply = answer.get("reply")
        if answer.get("ok") and isinstance(reply, dict) and reply.get("token") != token:
            answer = {"ok": False, "error": f"reply carried token {reply.get('token')!r}, not ours"}
        return answer

    def recreate_sandbox(self, uid: str, timeout: float = 30.0) -> PodView:
        """Replace the pod's sandbox as a runtime restart would: stop its containers, delete its
        namespace, create a new one (new inode, new IP) and run the pod again from its first
        init container; the status is reported again. Returns the view with the new sandbox."""
        return self._call(lambda: self._recreate(uid), timeout)

    def _pod(self, uid: str) -> PodState:
        pod = self._pods.get(uid)
        if pod is None:
            raise KeyError(f"no pod {uid} on {self.node_name}")
        return pod

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
                stray = PodState(obj=obj, dir=self.workdir, log_dir=self.workdir, inits=[], containers=[])
                self._detach(self._confirm_deletion(stray))
                return
            if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before we (re)started: nothing to run
            pod = new_pod(obj, self.workdir)
            self._pods[uid] = pod
            pod.runner = asyncio.create_task(self._run_pod(pod))
            return
        pod.obj = obj
        if pod.terminating is not None:
            return
        if meta.get("deletionTimestamp"):
            pod.terminating = asyncio.create_task(self._terminate(pod, confirm=True))
            return
        self._volumes.refresh_downward(pod)

    def _detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- a pod's life --------------------------------------------------------------------------

    async def _run_pod(self, pod: PodState) -> None:
        try:
            await self._sandboxes.create_retrying(pod)
            if not pod.volumes_ready:
                await self._volumes.prepare(pod)
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
            await asyncio.gather(*(self._containers.stop(pod, c, self.node.stop_timeout) for c in sidecars))
            await self._publish(pod)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("pod %s/%s on %s", pod.namespace, pod.name, self.node_name)
            pod.error = f"{type(exc).__name__}: {exc}"

    async def _run_init(self, pod: PodState, c: ContainerState) -> bool:
        """Run one init container until it succeeds (True), or fails for good (False)."""
        while True:
            code = await self._containers.run_once(pod, c)
            if code == 0:
                c.status.ready = True
                c.failures = 0
                await self._publish(pod)
                return True
            if pod.restart_policy == "Never":
                await self._publish(pod)
                return False
            await self._back_off(pod, c)

    async def _supervise(self, pod: PodState, c: ContainerState) -> None:
        """Run a container (or a native sidecar) and restart it as its restart policy says."""
        while True:
            code = await self._containers.run_once(pod, c)
            policy = "Always" if c.status.sidecar else pod.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                await self._publish(pod)
                return
            await self._back_off(pod, c)

    async def _back_off(self, pod: PodState, c: ContainerState) -> None:
        c.failures += 1
        delay = kubelet.backoff(c.failures, self.node.backoff_initial, self.node.backoff_max)
        c.status.last_state = c.status.state
        who = f"container={c.name} pod={pod.name}_{pod.namespace}({pod.uid})"
        message = f"back-off {delay:g}s restarting failed {who}"
        c.status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        await self._publish(pod)
        await asyncio.sleep(delay)

    async def _halt(self, pod: PodState, grace: float) -> None:
        """Cancel the pod's tasks and stop all its containers."""
        tasks = [t for t in [pod.runner, *(c.task for c in pod.all_containers())] if t is not None]
        await cancel_all(tasks)
        pod.runner = None
        for c in pod.all_containers():
            c.task = None
        await asyncio.gather(*(self._containers.stop(pod, c, grace) for c in pod.all_containers()))

    def _grace(self, pod: PodState) -> float:
        seconds = pod.meta.get("deletionGracePeriodSeconds")
        if not isinstance(seconds, int):
            seconds = pod.spec.get("terminationGracePeriodSeconds")
        return float(min(self.node.stop_timeout, seconds if isinstance(seconds, int) else 30))

    async def _terminate(self, pod: PodState, *, confirm: bool) -> None:
        """The pod is being deleted: stop it, remove its sandbox and files, confirm the deletion."""
        try:
            await self._halt(pod, self._grace(pod))
            await self._sandboxes.remove(pod)
            shutil.rmtree(pod.dir, ignore_errors=True)
            if confirm:
                await self._confirm_deletion(pod)
        except Exception as exc:
            log.exception("tearing down pod %s/%s", pod.namespace, pod.name)
            pod.error = f"teardown: {type(exc).__name__}: {exc}"
        finally:
            self._pods.pop(pod.uid, None)

    async def _confirm_deletion(self, pod: PodState) -> None:
        """The kubelet's final delete: grace period 0, only this pod (UID precondition)."""
        api = self.node.the_api()
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": pod.uid},
        }
        try:
            response = await api.client.request(
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
        await self._halt(pod, self.node.stop_timeout)
        await self._sandboxes.remove(pod)
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
        return view_of(pod, self.lab)

    # -- status ------------------------------------------------------------------------------

    async def _publish(self, pod: PodState) -> None:
        """Patch the pod's status subresource with what the stand-in knows now."""
        api = self.node.the_api()
        async with pod.status_lock:
            sb = pod.sandbox
            status = kubelet.pod_status(
                conditions=pod.conditions,
                restart_policy=pod.restart_policy,
                sandbox_ready=sb is not None and sb.ready,
                pod_ips=sb.ips if sb and sb.ready else [],
                host_ips=self.node.host_ips(),
                start_time=pod.start_time or kubelet.now(),
                inits=[c.status for c in pod.inits],
                containers=[c.status for c in pod.containers],
            )
            try:
                await api.merge_patch(f"{pod.path}/status", {"metadata": {"uid": pod.uid}, "status": status})
            except ApiError as exc:
                if exc.status in (404, 409) or pod.terminating is not None:
                    return  # gone, or the name now belongs to another pod
                log.warning("status of %s/%s: %s", pod.namespace, pod.name, exc)
                note = f"status patch refused: {exc}"
                if note not in pod.notes:
                    pod.notes.append(note)
