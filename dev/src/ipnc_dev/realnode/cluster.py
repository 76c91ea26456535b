"""``RealCluster``: one or two real Kubernetes nodes beside the test control plane.

The cluster tests simulate the kubelet; this runs the real one. Each node is a network and a
mount namespace held by a ``sleep`` process (as a kind node is a container), with containerd,
runc, the kubelet, kube-proxy and a CNI bridge inside; kube-controller-manager and kube-scheduler
run beside etcd and kube-apiserver on the host's loopback. The nodes reach the API server through
an address on their own loopback, and the API server reaches kubelets, pods and Services through
its egress selector, both over ``relay.py``: no packet of the cluster can reach an address outside
the namespaces made here. docs/real-node.md explains every setting and the start order.

Everything it changes on the host is recorded first (``hoststate.capture``) and undone on the way
out -- after an exception, Ctrl-C or SIGTERM too -- and then the host is compared with the record:
a difference raises ``HostChanged`` naming it. It stops only processes it started (and those its
containerd started, found in its namespaces and cgroups), by PID; every wait is bounded.

    with RealCluster(nodes=2) as cluster:
        cluster.kubectl("get", "nodes")
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .. import binaries
from ..controlplane import SERVICE_CLUSTER_IP_RANGE, ControlPlane
from . import artifacts, hoststate
from .config import (
    API_VIP,
    CLUSTER_CIDR,
    KUBELET_SYSCTLS,
    MAX_NODES,
    NODE_NETWORK,
    Identity,
    NodePlan,
    apiserver_args,
    cni_conflist,
    containerd_config,
    crictl_config,
    egress_selector_config,
    kube_proxy_config,
    kubelet_config,
    node_identity,
    token_auth_file,
    token_kubeconfig,
)
from .processes import (
    STOP_SECONDS,
    NsId,
    Proc,
    cgroup_hierarchies,
    create_cgroup,
    kill_pids,
    ns_of,
    pids_in_cgroups,
    pids_in_namespaces,
    remove_cgroups,
    stop_all,
    wait_until,
)

if TYPE_CHECKING:
    from lightkube import Client

COMMAND_TIMEOUT = 60.0
HOLDER_TIMEOUT = 10.0
SOCKET_TIMEOUT = 30.0
IMPORT_TIMEOUT = 300.0
DEFAULT_READY_TIMEOUT = 180.0
MAX_INODE_HOLDERS = 256
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
NODE_BINDS = (("run", "/run"), ("var-lib", "/var/lib"), ("var-log", "/var/log"))


class RealClusterError(RuntimeError):
    """The cluster could not be started or stopped; the message says what and shows logs."""


class HostChanged(RealClusterError):
    """After teardown the host differs from before it started."""

    def __init__(self, differences: Sequence[str]) -> None:
        self.differences = list(differences)
        shown = "\n  ".join(self.differences)
        super().__init__(f"the host differs from before the real cluster started:\n  {shown}")


class Terminated(BaseException):
    """SIGTERM arrived while the cluster ran: unwinds like Ctrl-C so that teardown runs."""


@dataclass
class Node:
    """A running node: its plan, the process holding its namespaces, and its programs."""

    plan: NodePlan
    holder: Proc
    namespaces: tuple[NsId, NsId]
    containerd: Proc | None = None
    kubelet: Proc | None = None
    kube_proxy: Proc | None = None
    cgroups: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass(frozen=True)
class Sandbox:
    """A pod sandbox as the node's containerd shows it: its ID, the PID of its pause process and
    the inode of its network namespace (what the agent's mark must name)."""

    id: str
    pid: int
    netns_inode: int


def _stderr(line: str) -> None:
    print(f"[realnode] {line}", file=sys.stderr, flush=True)


class RealCluster:
    """A control plane and ``nodes`` (1 or 2) real nodes; a context manager (see the module's
    docstring). ``start()``/``stop()`` are there for callers that cannot use ``with``."""

    def __init__(
        self,
        nodes: int = 1,
        *,
        state_parent: Path | None = None,
        log: Callable[[str], None] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        verify_host: bool = True,
        env: Mapping[str, str] | None = None,
        image_archives: Sequence[str] | None = None,
        kubelet_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"a real cluster has 1 to {MAX_NODES} nodes, not {nodes}")
        self.node_count = nodes
        self.run_id = secrets.token_hex(3)
        self.state = Path(state_parent or "/tmp") / f"ipnc-rn-{self.run_id}"
        self.say = log or _stderr
        self.ready_timeout = ready_timeout
        self.verify_host = verify_host
        self._env = os.environ if env is None else env
        # Which of scripts/build-images' archives to import (default: all it lists).
        self.image_archives = tuple(image_archives) if image_archives is not None else None
        # KubeletConfiguration fields set over the harness's own (see config.kubelet_config).
        self.kubelet_settings = dict(kubelet_settings or {})
        self.timings: dict[str, float] = {}
        self.nodes: list[Node] = []
        self.control_plane: ControlPlane | None = None
        self.images: artifacts.Images | None = None
        self.differences: list[str] = []
        self._bin: dict[str, Path] = {}
        self._before: hoststate.HostState | None = None
        self._procs: dict[str, Proc] = {}
        # Stopped on purpose while the cluster runs (a restarted program, an inode holder).
        self._ended_on_purpose: set[str] = set()
        self._hierarchies: list[Path] = []
        self._identities: dict[str, Identity] = {}
        self._stopped = False
        self._started_state = False
        self._previous_handlers: dict[signal.Signals, Any] = {}

    # -- what callers use ----------------------------------------------------------------------

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig (``system:masters``), on the host's loopback."""
        return self._cp().kubeconfig_path

    @property
    def server(self) -> str:
        return self._cp().server

    def _cp(self) -> ControlPlane:
        if self.control_plane is None:
            raise RealClusterError("the real cluster is not running")
        return self.control_plane

    def client(self, **kwargs: Any) -> Client:
        """A lightkube client as the admin."""
        return self._cp().client(**kwargs)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the admin, its discovery cache in the state folder (not ``~/.kube``)."""
        argv = [
            str(binaries.find("kubectl", self._env)),
            f"--kubeconfig={self.kubeconfig_path}",
            f"--cache-dir={self.state / 'kube-cache'}",
            *args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return subprocess.run(  # noqa: S603 - argument list
            argv, input=input, capture_output=True, text=True, check=check, timeout=timeout, env=env
        )

    def crictl(
        self, node: Node, *args: str, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """crictl against ``node``'s containerd (not checked: read ``returncode``)."""
        argv = [str(self._bin["crictl"]), "--config", str(node.plan.dir / "crictl.yaml"), *args]
        return subprocess.run(  # noqa: S603 - argument list
            argv, capture_output=True, text=True, timeout=timeout, check=False
        )

    def helm_env(self) -> dict[str, str]:
        """Environment for helm against this cluster (its discovery cache in the state folder)."""
        return {"KUBECACHEDIR": str(self.state / "kube-cache")}

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> RealCluster:
        self._trap_signals()
        try:
            self.start()
        except BaseException as exc:
            try:
                self.stop()
            except RealClusterError as e:
                raise e from exc  # the host not as it was matters more than why the start ended
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        except HostChanged as e:
            if exc is not None:
                raise e from exc
            raise

    def _trap_signals(self) -> None:
        """SIGTERM unwinds like Ctrl-C while the cluster runs (only the main thread gets signals)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise Terminated(signal.Signals(signum).name)

        def on_int(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        self._previous_handlers = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
            signal.SIGINT: signal.signal(signal.SIGINT, on_int),
        }

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Teardown is not interrupted by a second Ctrl-C or SIGTERM: it says so and goes on."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def wait(signum: int, frame: FrameType | None) -> None:
            self.say(f"{signal.Signals(signum).name}: tearing down, please wait")

        previous = {sig: signal.signal(sig, wait) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            # Back to what was there before the cluster started (or before this teardown).
            for sig, handler in previous.items():
                signal.signal(sig, self._previous_handlers.get(sig, handler))
            self._previous_handlers = {}

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        self._preflight()
        self._before = hoststate.capture()
        self.state.mkdir(mode=0o700)
        self._started_state = True
        self._step("control plane", self._start_control_plane)
        self._step("namespaces", self._start_namespaces)
        self._step("relay", self._start_relay)
        self._step("controllers", self._start_controllers)
        self._step("containerd", self._start_containerds)
        self._step("images", self._import_images)
        self._step("kubelets", self._start_kubelets)
        self._step("nodes ready", self._wait_nodes_ready)
        self.timings["start"] = time.monotonic() - t0
        self.say(
            f"{len(self.nodes)} real node(s) Ready in {self.timings['start']:.1f} s "
            f"(state {self.state}); kubeconfig: {self.kubeconfig_path}"
        )

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        fn()
        self.timings[name] = time.monotonic() - t

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise RealClusterError("a real node needs root (namespaces, mounts, cgroups, iptables)")
        for tool in ("unshare", "nsenter", "ip", "mount", "sleep"):
            if shutil.which(tool) is None:
                raise RealClusterError(f"{tool} is not installed (util-linux, iproute2)")
        try:
            self._bin = artifacts.node_binaries(self._env)
            self.images = artifacts.images(
                self._env,
                required=(artifacts.PAUSE_ARCHIVE, *(self.image_archives or artifacts.IMAGE_ARCHIVES)),
            )
            artifacts.cni_plugins()
            binaries.find_all(binaries.ALL_BINARIES, self._env)
        except (artifacts.ArtifactError, binaries.BinaryNotFoundError) as e:
            raise RealClusterError(str(e)) from None
        self._hierarchies = cgroup_hierarchies()
        if not self._hierarchies:
            raise RealClusterError("no cgroup hierarchy mounted under /sys/fs/cgroup")
        self.nodes = []
        for i in range(1, self.node_count + 1):
            plan = NodePlan(i, self.run_id, self.state)
            taken = [str(h / plan.cgroup_name) for h in self._hierarchies if (h / plan.cgroup_name).exists()]
            if taken:
                raise RealClusterError(f"cgroups of this run's name already exist: {', '.join(taken)}")

    def _start_control_plane(self) -> None:
        plans = [NodePlan(i, self.run_id, self.state) for i in range(1, self.node_count + 1)]
        idents = [node_identity(p, secrets.token_hex(16)) for p in plans]
        idents += [
            Identity(f"system:{name}", secrets.token_hex(16))
            for name in ("kube-proxy", "kube-controller-manager", "kube-scheduler")
        ]
        self._identities = {i.user: i for i in idents}
        tokens = self._write("tokens.csv", token_auth_file(idents))
        egress = self._write("egress.yaml", egress_selector_config(self.state / "egress.sock"))
        self.control_plane = ControlPlane.start(
            binary_paths=binaries.find_all(binaries.KUBE_BINARIES, self._env),
            workdir_parent=self.state,
            extra_apiserver_args=apiserver_args(tokens_file=tokens, egress_config=egress),
            service_account_admission=True,
            kubelet_client=True,
            log=self.say,
        )

    @property
    def api_port(self) -> int:
        port = urlparse(self._cp().server).port
        assert port is not None
        return port

    def _write(self, relative: str, text: str, mode: int = 0o600) -> Path:
        path = self.state / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def _spawn(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Proc:
        if name in self._procs:
            raise RealClusterError(f"{name} started twice")
        (self.state / "logs").mkdir(exist_ok=True)
        proc = Proc(name, argv, self.state / "logs" / f"{name}.log", env=env, cwd=self.state)
        self._procs[name] = proc
        return proc

    def _run(self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> str:
        try:
            done = subprocess.run(  # noqa: S603 - argument lists built here
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise RealClusterError(f"{' '.join(argv)}: no answer in {timeout:g} s") from None
        if done.returncode != 0:
            raise RealClusterError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def _holder(self, name: str, *, mount: bool) -> tuple[Proc, tuple[NsId, NsId]]:
        """A ``sleep`` in new network (and mount) namespaces; they live as long as it does."""
        argv = ["unshare", "--net"]
        if mount:
            argv += ["--mount", "--propagation", "slave"]
        proc = self._spawn(name, [*argv, "--", "sleep", "infinity"])
        own_net, own_mnt = ns_of(os.getpid(), "net"), ns_of(os.getpid(), "mnt")

        def unshared() -> bool:
            if proc.exited() is not None:
                raise RealClusterError(f"{name} exited with {proc.exited()}: {proc.tail()}")
            try:
                return ns_of(proc.pid, "net") != own_net and (not mount or ns_of(proc.pid, "mnt") != own_mnt)
            except OSError:
                return False

        if not wait_until(unshared, HOLDER_TIMEOUT, interval=0.02):
            raise RealClusterError(f"{name}: no new namespaces after {HOLDER_TIMEOUT:g} s: {proc.tail()}")
        return proc, (ns_of(proc.pid, "net"), ns_of(proc.pid, "mnt"))

    def _in(self, pid: int, *argv: str, mount: bool = False) -> str:
        """Run ``argv`` in the network (and mount) namespace of ``pid``."""
        return self._run(["nsenter", "-t", str(pid), *(["-m"] if mount else []), "-n", "--", *argv])

    def _start_namespaces(self) -> None:
        lab, _ = self._holder("lab-holder", mount=False)
        self._in(lab.pid, "ip", "link", "set", "lo", "up")
        self._in(lab.pid, "ip", "link", "add", "br0", "type", "bridge")
        self._in(lab.pid, "ip", "link", "set", "br0", "up")
        plans = [NodePlan(i, self.run_id, self.state) for i in range(1, self.node_count + 1)]
        for plan in plans:
            holder, namespaces = self._holder(f"{plan.name}-holder", mount=True)
            node = Node(plan, holder, namespaces)
            self.nodes.append(node)
            h = holder.pid
            for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "logs/pods", "volume-plugins",
                        "run", "var-lib", "var-log", "sysctl"):  # fmt: skip
                (plan.dir / sub).mkdir(parents=True, exist_ok=True)
            # The pair is created directly in both namespaces: the host never holds either end.
            self._run(["ip", "link", "add", plan.lab_link, "netns", str(lab.pid), "type", "veth",
                       "peer", "name", "eth0", "netns", str(h)])  # fmt: skip
            self._in(lab.pid, "ip", "link", "set", plan.lab_link, "master", "br0")
            self._in(lab.pid, "ip", "link", "set", plan.lab_link, "up")
            self._in(h, "ip", "link", "set", "lo", "up")
            self._in(h, "ip", "addr", "add", f"{API_VIP}/32", "dev", "lo")
            prefix = ipaddress.ip_network(NODE_NETWORK).prefixlen
            self._in(h, "ip", "addr", "add", f"{plan.ip}/{prefix}", "dev", "eth0")
            self._in(h, "ip", "link", "set", "eth0", "up")
            # The relay dials ClusterIPs from here: kube-proxy's OUTPUT DNAT comes after the route
            # lookup, which needs a route for the service range.
            self._in(h, "ip", "route", "add", SERVICE_CLUSTER_IP_RANGE, "dev", "eth0")
            for other in plans:
                if other.index != plan.index:
                    self._in(h, "ip", "route", "add", other.pod_cidr, "via", other.ip)
            # The node's own /run, /var/lib, /var/log: the kubelet writes device-plugins and pki
            # under /var/lib/kubelet, /var/log/containers links and libcni /var/lib/cni whatever
            # their flags say, iptables locks /run/xtables.lock.
            for sub, target in NODE_BINDS:
                self._in(h, "mount", "--bind", str(plan.dir / sub), target, mount=True)
            for key, value in KUBELET_SYSCTLS.items():
                f = self._write(f"{plan.name}/sysctl/{key.replace('/', '.')}", value + "\n", 0o644)
                self._in(h, "mount", "--bind", str(f), f"/proc/sys/{key}", mount=True)

    def _start_relay(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "ipnc_dev.realnode.relay",
            f"--api-port={self.api_port}",
            f"--vip={API_VIP}",
        ]
        argv += [f"--node-netns=/proc/{n.holder.pid}/ns/net" for n in self.nodes]
        argv += [
            f"--egress-socket={self.state / 'egress.sock'}",
            f"--egress-netns=/proc/{self.nodes[0].holder.pid}/ns/net",
        ]
        argv += [f"--allow={net}" for net in (NODE_NETWORK, CLUSTER_CIDR, SERVICE_CLUSTER_IP_RANGE)]
        relay = self._spawn("relay", argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def ready() -> bool:
            if relay.exited() is not None:
                raise RealClusterError(f"the relay exited with {relay.exited()}: {relay.tail()}")
            return "ready" in relay.tail(5).splitlines()

        if not wait_until(ready, SOCKET_TIMEOUT, interval=0.05):
            raise RealClusterError(f"the relay was not ready in {SOCKET_TIMEOUT:g} s: {relay.tail()}")

    def _kubeconfig(self, name: str, user: str, *, server: str) -> Path:
        cp = self._cp()
        assert cp.certs is not None
        text = token_kubeconfig(
            server, ca_cert=cp.certs.ca_cert, token=self._identities[user].token, tls_server_name="kubernetes"
        )
        return self._write(name, text)

    def _start_controllers(self) -> None:
        cp = self._cp()
        assert cp.certs is not None
        local = f"https://127.0.0.1:{self.api_port}"
        kcm = self._kubeconfig("kcm.kubeconfig", "system:kube-controller-manager", server=local)
        sched = self._kubeconfig("scheduler.kubeconfig", "system:kube-scheduler", server=local)
        env = {"PATH": SYSTEM_PATH, "HOME": str(self.state)}
        # --secure-port=0: no serving port at all (by default they listen on every host address).
        self._spawn("kube-controller-manager", [
            str(self._bin["kube-controller-manager"]), f"--kubeconfig={kcm}",
            f"--authentication-kubeconfig={kcm}", f"--authorization-kubeconfig={kcm}",
            "--secure-port=0", "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={cp.certs.sa_signing_key}",
            f"--root-ca-file={cp.certs.ca_cert}", f"--cluster-cidr={CLUSTER_CIDR}",
            "--allocate-node-cidrs=false", "--controllers=*,-csrsigning", "--v=1",
        ], env=env)  # fmt: skip
        self._spawn("kube-scheduler", [
            str(self._bin["kube-scheduler"]), f"--kubeconfig={sched}",
            f"--authentication-kubeconfig={sched}", f"--authorization-kubeconfig={sched}",
            "--secure-port=0", "--leader-elect=false", "--v=1",
        ], env=env)  # fmt: skip

    def _node_env(self, node: Node) -> dict[str, str]:
        return {"PATH": f"{self._bin['containerd'].parent}:{SYSTEM_PATH}", "HOME": str(node.plan.dir)}

    def _innode(self, node: Node) -> list[str]:
        return ["nsenter", "-t", str(node.holder.pid), "-m", "-n", "--"]

    def _start_containerds(self) -> None:
        assert self.images is not None
        for node in self.nodes:
            plan = node.plan
            conf = self._write(
                f"{plan.name}/containerd/config.toml",
                containerd_config(plan, runc=self._bin["runc"], pause_image=self.images.pause),
            )
            self._write(f"{plan.name}/cni/net.d/10-ipnc.conflist", cni_conflist(plan), 0o644)
            self._write(f"{plan.name}/crictl.yaml", crictl_config(plan))
            node.containerd = self._spawn(
                f"containerd-{plan.name}",
                [*self._innode(node), str(self._bin["containerd"]), "--config", str(conf)],
                env=self._node_env(node),
            )
        for node in self.nodes:
            proc = node.containerd
            assert proc is not None

            def listening(node: Node = node, proc: Proc = proc) -> bool:
                if proc.exited() is not None:
                    raise RealClusterError(f"containerd of {node.name} exited: {proc.tail()}")
                return node.plan.containerd_socket.is_socket()

            if not wait_until(listening, SOCKET_TIMEOUT):
                raise RealClusterError(f"containerd of {node.name} made no socket in {SOCKET_TIMEOUT:g} s")

    def _import_images(self) -> None:
        """Every image into every node (the nodes in parallel); pods use imagePullPolicy Never."""
        assert self.images is not None
        running: list[tuple[Node, subprocess.Popen[str]]] = []
        for node in self.nodes:
            script = " && ".join(
                f"{self._bin['ctr']} --address {node.plan.containerd_socket} -n k8s.io images import {a}"
                for a in self.images.archives(self.image_archives)
            )
            running.append((node, subprocess.Popen(  # noqa: S603 - built here from our paths
                [*self._innode(node), "sh", "-c", script],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )))  # fmt: skip
        deadline = time.monotonic() + IMPORT_TIMEOUT
        failed: list[str] = []
        try:
            for node, popen in running:
                try:
                    _, err = popen.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failed.append(f"{node.name}: image import took over {IMPORT_TIMEOUT:g} s")
                    continue
                if popen.returncode != 0:
                    failed.append(f"{node.name}: {err.strip()[-2000:]}")
        finally:
            # Interrupted or timed out: no import outlives this step (what they started in the
            # node goes with the node at teardown).
            for _, popen in running:
                if popen.poll() is None:
                    popen.kill()
                    popen.communicate()
        if failed:
            raise RealClusterError("image import failed: " + "; ".join(failed))

    def _start_kubelets(self) -> None:
        cp = self._cp()
        assert cp.certs is not None
        vip = f"https://{API_VIP}:{self.api_port}"
        proxy_kubeconfig = self._kubeconfig("kube-proxy.kubeconfig", "system:kube-proxy", server=vip)
        for node in self.nodes:
            plan = node.plan
            # The kubelet insists that its cgroupRoot exists in every hierarchy.
            create_cgroup(plan.cgroup_name, self._hierarchies, node.cgroups)
            self._write(f"{plan.name}/resolv.conf", "nameserver 127.0.0.1\n", 0o644)
            kubelet_conf = self._write(
                f"{plan.name}/kubelet.yaml",
                kubelet_config(plan, client_ca=cp.certs.ca_cert, settings=self.kubelet_settings),
            )
            kubeconfig = self._kubeconfig(
                f"{plan.name}/kubelet.kubeconfig", f"system:node:{plan.name}", server=vip
            )
            proxy_conf = self._write(
                f"{plan.name}/kube-proxy.yaml", kube_proxy_config(plan, kubeconfig=proxy_kubeconfig)
            )
            node.kubelet = self._spawn(f"kubelet-{plan.name}", [
                *self._innode(node), str(self._bin["kubelet"]), f"--config={kubelet_conf}",
                f"--kubeconfig={kubeconfig}", f"--root-dir={plan.dir / 'kubelet'}",
                f"--cert-dir={plan.dir / 'kubelet' / 'pki'}", f"--hostname-override={plan.name}",
                f"--node-ip={plan.ip}", "--v=2",
            ], env=self._node_env(node))  # fmt: skip
            node.kube_proxy = self._spawn(
                f"kube-proxy-{plan.name}",
                [*self._innode(node), str(self._bin["kube-proxy"]), f"--config={proxy_conf}", "--v=2"],
                env=self._node_env(node),
            )

    def check_alive(self) -> None:
        """Raise ``RealClusterError`` (with its log) if a process of the cluster has exited (one
        a restart replaced does not count)."""
        for proc in self._procs.values():
            if proc.name in self._ended_on_purpose:
                continue
            code = proc.exited()
            if code is not None:
                raise RealClusterError(f"{proc.name} exited with {code}:\n{proc.tail()}")

    def ready_nodes(self) -> set[str]:
        from lightkube.resources.core_v1 import Node as NodeResource

        ready: set[str] = set()
        with self.client() as client:
            for obj in client.list(NodeResource):
                conditions = (obj.status.conditions if obj.status else None) or []
                name = obj.metadata.name if obj.metadata else None
                if name and any(c.type == "Ready" and c.status == "True" for c in conditions):
                    ready.add(name)
        return ready

    def _wait_nodes_ready(self) -> None:
        wanted = {n.name for n in self.nodes}

        def all_ready() -> bool:
            self.check_alive()
            return wanted <= self.ready_nodes()

        if not wait_until(all_ready, self.ready_timeout, interval=0.25):
            tails = "\n".join(
                f"--- {n.name} kubelet ---\n{n.kubelet.tail()}" for n in self.nodes if n.kubelet
            )
            raise RealClusterError(f"nodes not Ready after {self.ready_timeout:g} s\n{tails}")

    def wait_service_account(self, namespace: str, name: str = "default", timeout: float = 60.0) -> None:
        """Until the controller-manager has made ServiceAccount ``namespace/name`` (pods are
        refused until it exists)."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import ServiceAccount

        def exists() -> bool:
            with self.client() as client:
                try:
                    client.get(ServiceAccount, name, namespace=namespace)
                except ApiError as e:
                    if e.status.code == 404:
                        return False
                    raise
            return True

        if not wait_until(exists, timeout, interval=0.2):
            raise RealClusterError(f"ServiceAccount {namespace}/{name} not created in {timeout:g} s")

    # -- what scenarios do to a running node ----------------------------------------------------

    def restart_containerd(self, node: Node, *, timeout: float = SOCKET_TIMEOUT) -> None:
        """SIGTERM ``node``'s containerd (SIGKILL after ``STOP_SECONDS``), start it again with the
        same configuration and wait until its CRI answers. Shims and containers live on."""
        old = node.containerd
        if old is None:
            raise RealClusterError(f"{node.name} has no containerd")
        node.containerd = self._restart(old)
        if not wait_until(lambda: self._cri_answers(node), timeout, interval=0.2):
            raise RealClusterError(
                f"containerd of {node.name} did not answer crictl within {timeout:g} s of its restart:\n"
                f"{node.containerd.tail()}"
            )

    def restart_kubelet(self, node: Node, *, timeout: float = SOCKET_TIMEOUT) -> None:
        """SIGTERM ``node``'s kubelet, start it again with the same flags and wait until it
        serves (its /healthz, through the API server's node proxy). Pods live on."""
        old = node.kubelet
        if old is None:
            raise RealClusterError(f"{node.name} has no kubelet")
        node.kubelet = self._restart(old)

        def serving() -> bool:
            self.check_alive()
            done = self.kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/healthz", check=False)
            return done.returncode == 0 and done.stdout.strip() == "ok"

        if not wait_until(serving, timeout, interval=0.25):
            raise RealClusterError(
                f"the kubelet of {node.name} did not serve /healthz within {timeout:g} s of its "
                f"restart:\n{node.kubelet.tail()}"
            )

    def _restart(self, old: Proc) -> Proc:
        """``old`` stopped (by its PID) and the same program started again under a new name."""
        self._ended_on_purpose.add(old.name)
        killed = stop_all([old])
        if killed:
            self.say(f"killed after {STOP_SECONDS:g} s: {', '.join(killed)}")
        base = old.name.split("#", 1)[0]
        count = sum(1 for name in self._procs if name.split("#", 1)[0] == base)
        return self._spawn(f"{base}#{count + 1}", old.argv, env=old.env)

    def _cri_answers(self, node: Node) -> bool:
        if node.containerd is not None and node.containerd.exited() is not None:
            raise RealClusterError(f"containerd of {node.name} exited: {node.containerd.tail()}")
        return self.crictl(node, "version", timeout=10).returncode == 0

    def sandbox(self, node: Node, pod_uid: str) -> Sandbox:
        """The pod's one ready sandbox on ``node``: its ID, its pause process and the inode of
        its network namespace (the machine's PID namespace is the nodes' too)."""
        label = f"io.kubernetes.pod.uid={pod_uid}"
        listed = self.crictl(node, "pods", "--label", label, "--state", "ready", "-q")
        ids = listed.stdout.split() if listed.returncode == 0 else []
        if len(ids) != 1:
            raise RealClusterError(
                f"pod {pod_uid} has {len(ids)} ready sandboxes on {node.name}, not one: "
                f"{(listed.stdout + listed.stderr).strip()}"
            )
        inspected = self.crictl(node, "inspectp", "-o", "json", ids[0])
        try:
            pid = int(json.loads(inspected.stdout)["info"]["pid"])
        except (ValueError, KeyError, TypeError):
            raise RealClusterError(
                f"crictl inspectp {ids[0]} on {node.name} gave no PID: {inspected.stderr.strip()}"
            ) from None
        self._own_pid(node, pid)
        return Sandbox(ids[0], pid, ns_of(pid, "net").inode)

    def stop_sandbox(self, node: Node, sandbox_id: str) -> None:
        """``crictl stopp``: the sandbox's containers stopped, its network namespace torn down
        (CNI DEL); the kubelet then makes the pod a new sandbox."""
        done = self.crictl(node, "stopp", sandbox_id, timeout=120)
        if done.returncode != 0:
            raise RealClusterError(f"crictl stopp {sandbox_id} on {node.name}: {done.stderr.strip()}")

    def container_pid(self, node: Node, pod_uid: str, container: str) -> int:
        """PID (in the machine's namespace) of the running container ``container`` of the pod."""
        listed = self.crictl(
            node, "ps", "--label", f"io.kubernetes.pod.uid={pod_uid}", "--name", f"^{container}$",
            "--state", "running", "-q",
        )  # fmt: skip
        ids = listed.stdout.split() if listed.returncode == 0 else []
        if len(ids) != 1:
            raise RealClusterError(
                f"pod {pod_uid} has {len(ids)} running {container} containers on {node.name}: "
                f"{(listed.stdout + listed.stderr).strip()}"
            )
        inspected = self.crictl(node, "inspect", "-o", "json", ids[0])
        try:
            pid = int(json.loads(inspected.stdout)["info"]["pid"])
        except (ValueError, KeyError, TypeError):
            raise RealClusterError(f"crictl inspect {ids[0]} on {node.name} gave no PID") from None
        self._own_pid(node, pid)
        return pid

    def signal_container(self, node: Node, pod_uid: str, container: str, signum: signal.Signals) -> int:
        """Send ``signum`` to the main process of a container on ``node`` (one the harness's
        containerd started: checked against the node's cgroups); returns its PID."""
        pid = self.container_pid(node, pod_uid, container)
        os.kill(pid, signum)
        return pid

    def signal_pid(self, node: Node, pid: int, signum: signal.Signals) -> None:
        """Send ``signum`` to ``pid``, a process of one of ``node``'s containers (checked); one
        that is gone meanwhile is not an error."""
        self._own_pid(node, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def _own_pid(self, node: Node, pid: int) -> None:
        if pid not in pids_in_cgroups(node.cgroups):
            raise RealClusterError(f"PID {pid} is not in the cgroups of {node.name}: not ours to touch")

    def node_processes(self, node: Node) -> dict[int, str]:
        """Every process in ``node``'s cgroups (its containers), with its command line."""
        out: dict[int, str] = {}
        for pid in pids_in_cgroups(node.cgroups):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            out[pid] = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
        return out

    def pause_kubelet(self, node: Node) -> None:
        """SIGSTOP ``node``'s kubelet: nothing on the node changes but what the caller does (e.g.
        ``crictl stopp``) until ``resume_kubelet``. Keep it short: the node lease is not renewed."""
        proc = node.kubelet
        if proc is None or proc.exited() is not None:
            raise RealClusterError(f"the kubelet of {node.name} is not running")
        os.kill(proc.pid, signal.SIGSTOP)

    def resume_kubelet(self, node: Node) -> None:
        """SIGCONT ``node``'s kubelet (after ``pause_kubelet``)."""
        if node.kubelet is not None and node.kubelet.exited() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.kubelet.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def next_netns_inode(self, inode: int, *, timeout: float = 15.0) -> Iterator[None]:
        """Inside the block, the next network namespace made on the machine most likely gets
        inode number ``inode``, as the kernel gives it on its own now and then: it hands out the
        lowest free number, so each lower free number is held by a namespace of ours (``unshare
        --net sleep``) until the block ends. The kernel frees a number in a work queue some time
        after the namespace's last process went: that time is measured on ``inode`` itself (a
        holder of ours gets it, goes, and a later one gets it again) and waited for twice over
        before the block runs. Raises ``RealClusterError`` when ``inode`` is not free in
        ``timeout`` seconds."""
        held: list[Proc] = []
        seen: list[int] = []  # the numbers our holders got above ``inode`` (for the error)
        deadline = time.monotonic() + timeout

        def take() -> float:
            """Hold every lower free number, then take ``inode`` and let it go; when it went."""
            while True:
                if len(held) >= MAX_INODE_HOLDERS:
                    raise RealClusterError(f"over {MAX_INODE_HOLDERS} free inode numbers below {inode}")
                holder, (net, _) = self._holder(f"inum-{len(self._procs)}", mount=False)
                self._ended_on_purpose.add(holder.name)
                if net.inode < inode:
                    held.append(holder)  # a lower free number: ours until the block ends
                    continue
                stop_all([holder])
                if net.inode == inode:
                    return time.monotonic()
                seen.append(net.inode)
                if time.monotonic() > deadline:
                    raise RealClusterError(
                        f"network namespace inode {inode} not free in {timeout:g} s (holding {len(held)} "
                        f"lower ones; the next free were {sorted(set(seen))[:10]})"
                    )
                time.sleep(0.05)

        try:
            released = take()
            freed_in = take() - released
            time.sleep(min(max(2 * freed_in, 0.5), 10.0))
            yield
        finally:
            stop_all(held)

    @contextlib.contextmanager
    def netns_inode_held(self, inode: int, *, timeout: float = 5.0) -> Iterator[bool]:
        """The opposite of ``next_netns_inode``: inside the block no new namespace can get inode
        number ``inode``, for a namespace of ours holds it once it is free (lower free numbers are
        held only while looking for it). Yields whether it was free within ``timeout`` seconds;
        if not, it is still in use, and no one else gets it either unless it is freed during the
        block."""
        lower: list[Proc] = []
        mine: Proc | None = None
        deadline = time.monotonic() + timeout
        try:
            while mine is None and time.monotonic() <= deadline and len(lower) < MAX_INODE_HOLDERS:
                holder, (net, _) = self._holder(f"inum-{len(self._procs)}", mount=False)
                self._ended_on_purpose.add(holder.name)
                if net.inode == inode:
                    mine = holder
                elif net.inode < inode:
                    lower.append(holder)
                else:
                    stop_all([holder])
                    time.sleep(0.05)
            stop_all(lower)
            yield mine is not None
        finally:
            stop_all([*lower, *([mine] if mine else [])])

    def in_netns(self, pid: int, *argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``argv`` (a host binary) in the network namespace of ``pid``; its stdout."""
        return self._run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv], timeout=timeout)

    def drain(self, node: Node, *, timeout: float = 120.0) -> None:
        """``kubectl drain``: cordoned, every pod but the DaemonSets' evicted (PodDisruptionBudgets
        respected); waits until they are gone."""
        done = self.kubectl(
            "drain", node.name, "--ignore-daemonsets", "--delete-emptydir-data",
            f"--timeout={int(timeout)}s", check=False, timeout=timeout + 30,
        )  # fmt: skip
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-2000:]
            raise RealClusterError(f"kubectl drain {node.name}: {output}")

    def uncordon(self, node: Node) -> None:
        self.kubectl("uncordon", node.name)

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Tear everything down, then compare the host with the record: raises ``HostChanged``
        (or ``RealClusterError`` when a step failed); returns what was noted on the way."""
        if self._stopped:
            return []
        self._stopped = True
        t0 = time.monotonic()
        with self._signals_deferred():
            problems = self._teardown()
            self.timings["teardown"] = time.monotonic() - t0
            if self.verify_host and self._before is not None:
                after = hoststate.capture()
                self.differences = self._before.diff(after, foreign=hoststate.foreign_to(self.run_id))
        self.say(f"torn down in {self.timings['teardown']:.1f} s")
        if self.differences:
            raise HostChanged(self.differences + [f"(teardown: {p})" for p in problems])
        if problems:
            raise RealClusterError("teardown: " + "; ".join(problems))
        return problems

    def _teardown(self) -> list[str]:
        problems: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # every step runs whatever the previous one did
                problems.append(f"{what}: {e}")

        named = self._procs.get
        first = [p for p in (named("kube-controller-manager"), named("kube-scheduler")) if p]
        first += [p for n in self.nodes for p in (n.kube_proxy, n.kubelet) if p]
        attempt("stopping kubelets and controllers", lambda: self._note_killed(stop_all(first)))
        for node in self.nodes:
            attempt(f"removing the pods of {node.name}", functools.partial(self._remove_pods, node))
        attempt(
            "stopping containerd",
            lambda: self._note_killed(stop_all([n.containerd for n in self.nodes if n.containerd])),
        )
        attempt("stopping what containerd left", self._kill_leftovers)
        rest = [p for name, p in self._procs.items() if name == "relay" or name.endswith("-holder")]
        attempt("stopping the relay and the namespaces", lambda: self._note_killed(stop_all(rest)))
        for node in self.nodes:
            attempt(f"removing the cgroups of {node.name}", functools.partial(self._remove_cgroups, node))
        if self.control_plane is not None:
            attempt("stopping the control plane", self.control_plane.stop)
        others = [p for p in self._procs.values() if p.exited() is None]
        attempt("stopping the rest", lambda: self._note_killed(stop_all(others)))
        if self._started_state:
            attempt("removing the state folder", lambda: shutil.rmtree(self.state))
        return problems

    def _note_killed(self, killed: list[str]) -> None:
        if killed:
            self.say(f"killed after {STOP_SECONDS:g} s: {', '.join(killed)}")

    def _remove_pods(self, node: Node) -> None:
        """Stop and remove every pod through the CRI: CNI DEL releases each address (and the
        bridge plugin's per-pod chains), runc removes containers and their cgroups."""
        if node.containerd is None or node.containerd.exited() is not None:
            return
        listed = self.crictl(node, "pods", "-q")
        ids = listed.stdout.split() if listed.returncode == 0 else []
        if ids:
            stopped = self.crictl(node, "stopp", *ids, timeout=120)
            if stopped.returncode != 0:
                self.say(f"crictl stopp on {node.name}: {stopped.stderr.strip()}")
        removed = self.crictl(node, "rmp", "-a", "-f", timeout=120)
        if removed.returncode != 0:
            raise RealClusterError(f"crictl rmp on {node.name}: {removed.stderr.strip()}")

    def _kill_leftovers(self) -> None:
        """Shims and containers containerd started are in the nodes' namespaces or cgroups: the
        harness made those, so whatever is still in them is its own to stop."""
        holders = {n.holder.pid for n in self.nodes}
        namespaces = {ns for n in self.nodes for ns in n.namespaces}
        found = set(pids_in_namespaces(namespaces, exclude=holders))
        for node in self.nodes:
            found |= set(pids_in_cgroups(node.cgroups))
        found -= holders
        if found:
            self.say(f"stopping {len(found)} process(es) left in the nodes: {sorted(found)}")
            left = kill_pids(found)
            if left:
                raise RealClusterError(f"processes still there after SIGKILL: {left}")

    def _remove_cgroups(self, node: Node) -> None:
        left = remove_cgroups(node.cgroups)
        if left:
            raise RealClusterError(f"cgroups not removed: {', '.join(left)}")
