"""A container's runs on a node stand-in: which processes run for it (``kubelet.plan``: the
project's CLI, the stub proxy, the app stub, or the container's own command), started in the
pod's namespace and cgroups as the container's UID, how each run ends and is cleaned up, when a
stub counts as ready, and the app stub's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from . import kubelet
from .processes import kill_cgroup, killpg, tail
from .state import ContainerState, NodeContext, PodState, Run

PACKAGE = "ipnc_dev"  # the stubs and the CLI launcher run as ``python -m ipnc_dev.<module>``
READY_TIMEOUT = 30.0  # a stub that has not said "ready" by then is left unready


class Containers:
    """Runs the containers of one stand-in's pods (in its thread). ``publish`` reports a pod's
    status to the API server; ``detach`` runs a coroutine in the background."""

    def __init__(
        self,
        node: NodeContext,
        *,
        publish: Callable[[PodState], Coroutine[Any, Any, None]],
        detach: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.node = node
        self.publish = publish
        self.detach = detach

    async def run_once(self, pod: PodState, c: ContainerState) -> int:
        """Start the container, wait for its main process, record how it ended."""
        run = await self.start(pod, c)
        await self.publish(pod)
        if run.exit_code is not None:
            return run.exit_code  # could not be started
        code = kubelet.exit_code_of(await run.procs[0].wait())
        await self._finish(pod, c, run, code)
        await self.publish(pod)
        return code

    def _argv(self, plan: kubelet.Plan, name: str, netns: str) -> list[list[str]]:
        """The processes of one container: the main one first."""
        enter = [self.node.nsenter, f"--net={netns}"]
        user = f"--user={plan.uid}:{plan.gid}"
        die = [self.node.setpriv, "--pdeathsig", "KILL", "--"]

        def stub(module: str, *args: str) -> list[str]:
            return [*enter, "--", *die, self.node.python, "-m", f"{PACKAGE}.{module}", *args]

        ports = [f"--tcp={p}" for p in plan.tcp] + [f"--udp={p}" for p in plan.udp]
        if plan.kind is kubelet.Kind.CLI:
            return [[*enter, "--", self.node.python, "-m", f"{PACKAGE}.launch", user, "--", *plan.args]]
        if plan.kind is kubelet.Kind.PROXY:
            return [stub("stubproxy", f"--name={name}", *ports, user, "--record")]
        if plan.kind is kubelet.Kind.APP:
            procs = [stub("probe", user)]
            if ports:
                procs.append(stub("stubproxy", f"--name={name}", *ports, user, "--record"))
            return procs
        ids = [f"--setuid={plan.uid}", f"--setgid={plan.gid}"]
        return [[*enter, *ids, "--", *die, *plan.args]]

    async def start(self, pod: PodState, c: ContainerState) -> Run:
        sb = pod.sandbox
        assert sb is not None
        vdirs = {name: v.directory for name, v in pod.volumes.items()}
        plan = kubelet.plan(
            self.node.effective_pod(pod),
            c.spec,
            images=self.node.images,
            mount_list=kubelet.mounts(c.spec, vdirs),
            allow_root=self.node.allow_root,
        )
        if c.runs:
            c.status.restart_count += 1
        if "terminated" in c.status.state:
            c.status.last_state = c.status.state
        number = len(c.runs)
        log_dir = pod.log_dir / c.name
        log_dir.mkdir(parents=True, exist_ok=True)
        run = Run(secrets.token_hex(32), log_dir / f"{number}.log", kubelet.now(), plan.kind)
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
                for tree in self.node.trees:
                    with contextlib.suppress(OSError):  # it may have exited already
                        run.cgroup_dirs.append(
                            sb.cgroups.place(
                                proc.pid,
                                uid=pod.uid,
                                container=run.container_id,
                                driver=self.node.driver,
                                tree=tree,
                                qos=pod.qos,
                            )
                        )
        finally:
            os.close(log_fd)
        c.status.state = {"running": {"startedAt": run.started_at}}
        c.status.started = True
        if plan.kind in (kubelet.Kind.PROXY, kubelet.Kind.APP):
            self.detach(self._await_ready(pod, c, run))
        else:
            run.ready.set()
            c.status.ready = not c.status.init or c.status.sidecar
            c.started.set()
        return run

    async def _spawn(self, run: Run, argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*argv, cwd="/", start_new_session=True, **kwargs)
        run.procs.append(proc)
        self.node.spawned.add(proc.pid)
        return proc

    async def _await_ready(self, pod: PodState, c: ContainerState, run: Run) -> None:
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
            await self.publish(pod)

    async def _finish(self, pod: PodState, c: ContainerState, run: Run, code: int) -> None:
        """Record the end of a run and clean up after it: its other processes, anything its
        processes left in its cgroups, its pipes."""
        for proc in run.procs:
            killpg(proc.pid, signal.SIGKILL)
        for directory in run.cgroup_dirs:
            kill_cgroup(directory)
        for proc in run.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
            self.node.spawned.discard(proc.pid)
        for directory in run.cgroup_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
        run.exit_code = code
        message = ""
        if code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = tail(run.log_path)
        c.status.state = kubelet.terminated(
            code, started_at=run.started_at, container_id=run.container_id, message=message
        )
        c.status.ready = False
        c.status.started = False
        c.started.clear()
        if c.current is run:
            c.current = None

    async def stop(self, pod: PodState, c: ContainerState, grace: float) -> None:
        """Stop the container's current run: SIGTERM, then SIGKILL after ``grace`` seconds."""
        run = c.current
        if run is None:
            return
        for proc in run.procs:
            killpg(proc.pid, signal.SIGTERM)
        waits = [proc.wait() for proc in run.procs]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace)
        except TimeoutError:
            for proc in run.procs:
                killpg(proc.pid, signal.SIGKILL)
        main = run.procs[0].returncode if run.procs else None
        await self._finish(pod, c, run, kubelet.exit_code_of(main if main is not None else -9))

    async def app_request(self, pod: PodState, container: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Hand one request to the app stub's probe and return its answer (one JSON line)."""
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
