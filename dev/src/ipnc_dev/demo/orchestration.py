"""``demo``: the whole system doing its job for real on one machine, in one command.

Someone who clones the project has no cluster at hand, and a list of passing tests does not show
what the controller is for. This module assembles the test harness's real parts into the story
the project tells (issue 8): Istio's injected pods, which need NET_ADMIN for their istio-init, are
admitted into a namespace that enforces the ``restricted`` Pod Security level, get their redirect
rules from the node agent instead, wait for them in an unprivileged init container, start, and
their outbound traffic is captured by their sidecar.

Nothing is faked that runs here for real: etcd and kube-apiserver (``controlplane``), the
chart rendered by helm (its Namespace, ServiceAccounts and RBAC are applied, its
MutatingWebhookConfiguration too, pointed at the webhook on loopback with a caBundle, and the
agent's and webhook's arguments are taken from its DaemonSet and Deployment), one ``run`` agent
per node under the chart's ServiceAccount, the ``webhook`` process, and two node stand-ins
(``standin``: real network namespaces, cgroups and processes for the pods of one node name
each). Each pod of the sample application (frontend -> backend -> database) is shaped as istiod
injects it. Its app stub then connects to the next service's ClusterIP; with one bridge per
stand-in, pods on different nodes cannot reach each other at all, which does not matter: the
outbound capture hands every connection to the sender's own sidecar stub, which records the
original destination. That is what is shown and counted.

Everything is torn down at the end (or on Ctrl-C, or SIGTERM): processes, network namespaces and
their veths, cgroups, temporary folders. ``--keep`` leaves it running for kubectl until Ctrl-C.
The output is a live table on a terminal and plain lines with timings otherwise; a JSON summary
(``--json-summary``) lets a test check the outcome and what had to be cleaned up.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from istio_pod_network_controller import names

if TYPE_CHECKING:  # imported when used: `--help` and the prerequisite check stay light
    from ..agentproc import AgentProcess
    from ..controlplane import ControlPlane
    from ..standin import NodeStandIn
    from ..webhookproc import WebhookProcess

log = logging.getLogger(__name__)

PROG = "istio-pod-network-controller"
SETUP = "./scripts/setup"

CONTROLLER_NAMESPACE = "istio-pod-network-controller"
DEMO_NAMESPACE = "mesh-demo"
NODES = ("node-1", "node-2")
# Each service calls the next; placed so that both hops cross from one node to the other.
SERVICES = ("frontend", "backend", "database")
PLACEMENT = {"frontend": "node-1", "backend": "node-2", "database": "node-1"}
SERVICE_PORT = 80
APP_PORT = 8080
PROXY_IMAGE = "docker.io/istio/proxyv2:1.26.2"
APP_IMAGE = "registry.example/mesh-demo/{service}:1.0"
PROXY_UID = 1337
OUTBOUND_PORT = 15001
ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"
W = names.WAITER_CONTAINER

# What the node stand-in and the agent run, besides the test binaries (found in /usr/sbin too).
SYSTEM_TOOLS = (
    "ip", "nsenter", "setpriv", "unshare", "sysctl",
    "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore",
)  # fmt: skip
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What istiod's injection template writes for istio-init (REDIRECT mode, Istio's default ports)
# and for the sidecar.
ISTIO_INIT_ARGS = (
    "istio-iptables", "-p", str(OUTBOUND_PORT), "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT",
    "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info",
)  # fmt: skip
PROXY_ARGS = (
    "proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning",
    "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
)  # fmt: skip
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (one line where possible)."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (a BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way swallows it)."""


# -- prerequisites ---------------------------------------------------------------------------------


def check_prerequisites() -> None:
    """Raise DemoError naming what is missing (root, a tool, a test binary, cgroups), and the fix."""
    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root: it creates network namespaces, cgroups and iptables rules. "
            f"Run it as root (sudo .venv/bin/{PROG} demo), after {SETUP}."
        )
    missing = [t for t in SYSTEM_TOOLS if not (shutil.which(t) or shutil.which(t, path=TOOL_PATH))]
    if missing:
        raise DemoError(
            f"missing system tools: {', '.join(missing)}. Run {SETUP} as root (it installs iptables, "
            "nftables, iproute2 and util-linux)."
        )
    from .. import binaries

    try:
        binaries.find_all(binaries.ALL_BINARIES)
    except binaries.BinaryNotFoundError as exc:
        name = str(exc).split("'")[1] if "'" in str(exc) else "etcd"
        raise DemoError(
            f"the test binary {name!r} (etcd, kube-apiserver, kubectl, helm) is missing. Run {SETUP}: "
            "it builds them once into ~/.cache/istio-pod-network-controller/testbin (or set "
            "KUBEBUILDER_ASSETS to a folder holding etcd, kube-apiserver and kubectl)."
        ) from None
    from ..cgroups import mounts

    if not ({"v2", "pids"} & set(mounts())):
        raise DemoError("neither a cgroup v2 tree nor a cgroup v1 pids tree is mounted on this machine")


# -- the sample application, as istiod injects it --------------------------------------------------


def _istio_init() -> dict[str, Any]:
    """istio-init as istiod's sidecar template writes it (REDIRECT mode, default ports)."""
    return {
        "name": ISTIO_INIT,
        "image": PROXY_IMAGE,
        "args": list(ISTIO_INIT_ARGS),
        "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "10m", "memory": "40Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
    }


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _istio_proxy(service: str, namespace: str) -> dict[str, Any]:
    """istio-proxy as a native sidecar (an init container with restartPolicy Always)."""
    env: list[dict[str, Any]] = [
        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
        {"name": "CA_ADDR", "value": "istiod.istio-system.svc:15012"},
        {"name": "POD_NAME", **_field("metadata.name")},
        {"name": "POD_NAMESPACE", **_field("metadata.namespace")},
        {"name": "INSTANCE_IP", **_field("status.podIP")},
        {"name": "SERVICE_ACCOUNT", **_field("spec.serviceAccountName")},
        {"name": "HOST_IP", **_field("status.hostIP")},
        {"name": "PROXY_CONFIG", "value": "{}\n"},
        {"name": "ISTIO_META_POD_PORTS", "value": json.dumps([{"name": "http", "containerPort": APP_PORT}])},
        {"name": "ISTIO_META_APP_CONTAINERS", "value": service},
        {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
        {"name": "ISTIO_META_NODE_NAME", **_field("spec.nodeName")},
        {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
        {"name": "ISTIO_META_WORKLOAD_NAME", "value": service},
        {"name": "ISTIO_META_OWNER", "value": f"kubernetes://apis/v1/namespaces/{namespace}/pods/{service}"},
        {"name": "ISTIO_META_MESH_ID", "value": "cluster.local"},
        {"name": "TRUST_DOMAIN", "value": "cluster.local"},
    ]
    mounts = [
        ("/var/run/secrets/workload-spiffe-uds", "workload-socket"),
        ("/var/run/secrets/credential-uds", "credential-socket"),
        ("/var/run/secrets/workload-spiffe-credentials", "workload-certs"),
        ("/var/run/secrets/istio", "istiod-ca-cert"),
        ("/var/run/secrets/istio/crl", "istio-ca-crl"),
        ("/var/lib/istio/data", "istio-data"),
        ("/etc/istio/proxy", "istio-envoy"),
        ("/var/run/secrets/tokens", "istio-token"),
        ("/etc/istio/pod", "istio-podinfo"),
    ]
    return {
        "name": ISTIO_PROXY,
        "image": PROXY_IMAGE,
        "args": list(PROXY_ARGS),
        "env": env,
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "readinessProbe": {
            "failureThreshold": 4,
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 15,
            "timeoutSeconds": 3,
        },
        "startupProbe": {
            "failureThreshold": 600,
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
        },
        "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "10m", "memory": "40Mi"}},
        "restartPolicy": "Always",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
        },
        "volumeMounts": [{"mountPath": path, "name": name} for path, name in mounts],
    }


def _istio_volumes() -> list[dict[str, Any]]:
    return [
        {"name": "workload-socket", "emptyDir": {}},
        {"name": "credential-socket", "emptyDir": {}},
        {"name": "workload-certs", "emptyDir": {}},
        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-data", "emptyDir": {}},
        {
            "name": "istio-podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                ]
            },
        },
        {
            "name": "istio-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "istio-ca",
                            "expirationSeconds": 43200,
                            "path": "istio-token",
                        }
                    }
                ]
            },
        },
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        {"name": "istio-ca-crl", "configMap": {"name": "istio-ca-crl", "optional": True}},
    ]


def pod_suffix() -> str:
    """Five characters, as a ReplicaSet's pods get."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(5))


def sample_pod(service: str, namespace: str, node: str, name: str | None = None) -> dict[str, Any]:
    """The sample application's pod for ``service`` as istiod's sidecar injector returns it
    (istio-init with NET_ADMIN, istio-proxy as a native sidecar, Istio's volumes and
    annotations), bound to ``node``. Its own container is written for ``restricted``, as an
    application in such a namespace must be; only Istio's istio-init is not."""
    status = {
        "initContainers": [ISTIO_INIT, ISTIO_PROXY],
        "containers": None,
        "volumes": [v["name"] for v in _istio_volumes()],
        "imagePullSecrets": None,
        "revision": "default",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name or f"{service}-{pod_suffix()}",
            "namespace": namespace,
            "labels": {
                "app": service,
                "version": "v1",
                "security.istio.io/tlsMode": "istio",
                "service.istio.io/canonical-name": service,
                "service.istio.io/canonical-revision": "v1",
            },
            "annotations": {
                "istio.io/rev": "default",
                "kubectl.kubernetes.io/default-container": service,
                "kubectl.kubernetes.io/default-logs-container": service,
                "prometheus.io/path": "/stats/prometheus",
                "prometheus.io/port": "15020",
                "prometheus.io/scrape": "true",
                names.SIDECAR_STATUS: json.dumps(status, separators=(",", ":")),
            },
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [_istio_init(), _istio_proxy(service, namespace)],
            "containers": [
                {
                    "name": service,
                    "image": APP_IMAGE.format(service=service),
                    "ports": [{"containerPort": APP_PORT, "name": "http", "protocol": "TCP"}],
                    "securityContext": copy.deepcopy(RESTRICTED_CONTAINER),
                }
            ],
            "volumes": _istio_volumes(),
        },
    }


def added_capabilities(pod: Mapping[str, Any]) -> list[str]:
    """Every capability any container of the pod adds."""
    found: list[str] = []
    spec = pod.get("spec") or {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            found += ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
    return found


def init_names(pod: Mapping[str, Any]) -> list[str]:
    return [str(c.get("name")) for c in (pod.get("spec") or {}).get("initContainers") or []]


# -- what the demo records -------------------------------------------------------------------------


@dataclass
class PodRecord:
    """One pod of the sample application, as the demo saw it (seconds from its creation)."""

    service: str
    name: str
    node: str
    uid: str = ""
    ip: str = ""
    admitted: bool = False
    mutated: bool = False  # waiter first, no istio-init, no capability added, args kept
    init_containers: list[str] = field(default_factory=list)
    programmed_s: float | None = None
    apply_ms: float | None = None
    rules: int | None = None
    backend: str = ""
    netns_inode: int | None = None
    waiter_s: float | None = None
    waiter_line: str = ""
    initialized_s: float | None = None
    running_s: float | None = None
    problem: str = ""
    requests_sent: int = 0
    requests_intercepted: int = 0
    reached_directly: int = 0
    created_at: float = 0.0  # monotonic; not reported

    @property
    def ok(self) -> bool:
        return self.mutated and self.programmed_s is not None and self.running_s is not None


@dataclass
class HopRecord:
    """One connection of a request: the app of ``source`` to ``service``'s ClusterIP."""

    request: int
    source: str
    source_node: str
    service: str
    address: str
    port: int
    target_pods: list[str]
    target_nodes: list[str]
    intercepted: bool = False
    answered_by: str = ""  # "<container>:<port>" of the listener that answered
    original_destination: list[Any] | None = None
    recorded_by_sidecar: bool = False  # the sender's sidecar stub logged this very connection
    ms: float = 0.0
    error: str = ""


@dataclass
class Resources:
    """What the demo created, so that a test can check it is all gone afterwards."""

    workdir: str = ""
    api_server: str = ""  # kubectl keeps no cache for it under ~/.kube
    netns_prefixes: list[str] = field(default_factory=list)
    cgroup_tops: list[str] = field(default_factory=list)
    netns_inodes: list[int] = field(default_factory=list)
    processes: list[list[int]] = field(default_factory=list)  # [pid, start time in clock ticks]

    def add_pid(self, pid: int | None) -> None:
        if pid is None:
            return
        start = process_start(pid)
        if start is not None and [pid, start] not in self.processes:
            self.processes.append([pid, start])


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@dataclass
class Summary:
    ok: bool = False
    failure: str = ""
    seconds: float = 0.0
    setup_seconds: float = 0.0
    teardown_seconds: float = 0.0
    kept: bool = False
    pods: list[PodRecord] = field(default_factory=list)
    hops: list[HopRecord] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for pod in data["pods"]:
            pod.pop("created_at", None)
        data["pods_total"] = len(self.pods)
        data["pods_running"] = sum(1 for p in self.pods if p.ok)
        data["requests_total"] = len(self.hops)
        data["requests_intercepted"] = sum(1 for h in self.hops if h.intercepted)
        return data


# -- display ---------------------------------------------------------------------------------------


def _cell(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "…" if value is None else f"{value:.{digits}f} {unit}"


class Display:
    """Progress as it happens: a live pod table under the event lines on a terminal, plain lines
    with timings otherwise (CI, pipes). Both print the same event lines."""

    def __init__(self, *, live: bool | None = None) -> None:
        from rich.console import Console

        interactive = sys.stdout.isatty() if live is None else live
        self.console = Console(
            highlight=False,
            soft_wrap=not interactive,
            width=None if interactive else 200,
            force_terminal=interactive,
        )
        self.interactive = interactive
        self.t0 = time.monotonic()
        self.activity = ""
        self.pods: list[PodRecord] = []
        self._live: Any = None
        if interactive:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._render,
                console=self.console,
                refresh_per_second=10,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _stamp(self) -> str:
        return f"[dim]{self.elapsed():6.1f}s[/dim]"

    def line(self, text: str) -> None:
        self.console.print(f"{self._stamp()}  {text}")

    def plain(self, text: str = "") -> None:
        self.console.print(text)

    def begin(self, activity: str) -> None:
        """What the demo is doing now (shown with a spinner on a terminal)."""
        self.activity = activity

    def done(self, text: str, seconds: float | None = None) -> None:
        took = f" [dim]({seconds:.1f} s)[/dim]" if seconds is not None else ""
        self.line(f"[green]✓[/green] {text}{took}")
        self.activity = ""

    def detail(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.console.print(f"{'':9}    [dim]{line}[/dim]", markup=True)

    def fail(self, text: str) -> None:
        self.line(f"[red]✗ {text}[/red]")

    def _render(self) -> Any:
        from rich.console import Group
        from rich.spinner import Spinner

        parts: list[Any] = []
        if self.pods:
            parts.append(pod_table(self.pods, live=True, wide=self.console.width >= 100))
        if self.activity:
            parts.append(Spinner("dots", text=f" {self.activity}"))
        return Group(*parts)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def pod_table(pods: Sequence[PodRecord], *, live: bool = False, wide: bool = True) -> Any:
    """Pods, one row each: mutated by the webhook, programmed by the agent (seconds after the pod
    was created, and the agent's own apply time), initialized, running, requests intercepted."""
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD if live else (box.ASCII2 if wide else box.SIMPLE),
        title=None if live else "Summary",
        padding=(0, 1),
    )
    # An 80-column terminal gets the essentials; the mutation is in each pod's first event line.
    headers = ["pod", "node", *(["pod IP", "mutated"] if wide else []), "rules", "apply"]
    headers += ["initialized", "running", "requests"]
    for header in headers:
        table.add_column(
            header, justify="left" if header in ("pod", "node", "pod IP") else "right", no_wrap=True
        )
    for p in pods:
        mutated = "…" if not p.admitted else ("✓" if p.mutated else "✗")
        applied = f"{p.apply_ms:.0f} ms" if p.apply_ms is not None else "…"
        sent = f"{p.requests_intercepted}/{p.requests_sent}" if p.requests_sent else "-"
        row = [p.name, p.node, *([p.ip or "…", mutated] if wide else []), _cell(p.programmed_s), applied]
        row += [_cell(p.initialized_s), _cell(p.running_s), sent]
        table.add_row(*row)
    return table


# -- the demo --------------------------------------------------------------------------------------


@dataclass
class Options:
    keep: bool = False
    requests: int = 3
    timeout: float = 60.0
    json_summary: Path | None = None
    live: bool | None = None  # None: when stdout is a terminal


def workdir_parent() -> Path:
    """The temporary folder, if every UID can pass through it (containers run as other UIDs and
    read their volumes below it); else /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    with contextlib.suppress(OSError):
        if all(os.stat(p).st_mode & 0o001 for p in (base, *base.parents)):
            return base
    return Path("/tmp")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Demo:
    """Sets everything up, runs the story, and tears it all down (``close``)."""

    def __init__(self, options: Options, display: Display) -> None:
        self.options = options
        self.display = display
        self.summary = Summary()
        self.stack = contextlib.ExitStack()
        self.workdir = Path()
        self._cp: ControlPlane | None = None
        self.client: Any = None  # lightkube Client (admin); lightkube has no type hints
        self.nodes: dict[str, NodeStandIn] = {}
        self.agents: dict[str, AgentProcess] = {}
        self._webhook: WebhookProcess | None = None
        self.agent_kubeconfig = Path()
        self.webhook_kubeconfig = Path()
        self.chart_objects: list[dict[str, Any]] = []
        self.service_ips: dict[str, str] = {}
        self.pods: dict[str, PodRecord] = {}  # by pod name

    @property
    def cp(self) -> ControlPlane:
        if self._cp is None:
            raise DemoError("the control plane is not running")
        return self._cp

    @property
    def webhook(self) -> WebhookProcess:
        if self._webhook is None:
            raise DemoError("the webhook is not running")
        return self._webhook

    # -- steps --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, activity: str) -> Iterator[dict[str, Any]]:
        """Time one step; the body puts its one-line result in ``out["text"]``."""
        self.display.begin(activity)
        out: dict[str, Any] = {"text": activity}
        t0 = time.monotonic()
        yield out
        seconds = time.monotonic() - t0
        self.summary.steps.append({"step": activity, "seconds": round(seconds, 3)})
        self.display.done(str(out["text"]), seconds)
        for extra in out.get("details", []):
            self.display.detail(str(extra))

    def run(self) -> Summary:
        t0 = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="ipnc-demo-", dir=workdir_parent()))
        os.chmod(self.workdir, 0o755)  # containers run as other UIDs and read their volumes below it
        self.summary.resources.workdir = str(self.workdir)
        self.stack.callback(shutil.rmtree, self.workdir, True)
        self._log_to_file()
        self.display.line(
            f"[bold]{PROG} demo[/bold]: Istio's injected pods in a [bold]restricted[/bold] namespace, "
            "their iptables written by the node agent instead of istio-init"
        )
        self._start_cluster()
        self._install_controller()
        self._start_nodes_and_components()
        self._prepare_namespace()
        self._register_webhook()
        self.summary.setup_seconds = time.monotonic() - t0
        self._deploy()
        self._requests()
        self.summary.ok = all(p.ok for p in self.pods.values()) and all(
            h.intercepted for h in self.summary.hops
        )
        self.summary.ok = self.summary.ok and len(self.summary.hops) == self.options.requests * (
            len(SERVICES) - 1
        )
        return self.summary

    def _log_to_file(self) -> None:
        handler = logging.FileHandler(self.workdir / "demo.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        for noisy in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.stack.callback(root.removeHandler, handler)
        self.stack.callback(handler.close)

    def _start_cluster(self) -> None:
        from .. import chart
        from ..controlplane import ControlPlane

        with ThreadPoolExecutor(1) as pool:
            # helm needs no cluster for `helm template`: render while the control plane starts.
            rendering: Future[str] = pool.submit(chart.template, CONTROLLER_NAMESPACE)
            with self.step("starting the control plane: etcd and kube-apiserver on loopback") as out:
                messages: list[str] = []
                self._cp = ControlPlane.start(workdir_parent=self.workdir, log=messages.append)
                self.stack.callback(self.cp.stop)
                for pid in self.cp.pids:
                    self.summary.resources.add_pid(pid)
                self.summary.resources.api_server = self.cp.server
                out["text"] = f"control plane ready: etcd and kube-apiserver on {self.cp.server}"
            with self.step("rendering the chart with helm") as out:
                self.chart_objects = chart.parse(rendering.result())
                kinds = sorted({str(o.get("kind")) for o in self.chart_objects})
                out["text"] = (
                    f"chart rendered by helm: {len(self.chart_objects)} objects ({', '.join(kinds)})"
                )
        self.client = self.cp.client()
        self.stack.callback(self.client.close)

    def _chart_object(self, kind: str, suffix: str = "") -> dict[str, Any]:
        for obj in self.chart_objects:
            if obj.get("kind") == kind and str(obj["metadata"]["name"]).endswith(suffix):
                return obj
        raise DemoError(f"the chart rendered no {kind} named *{suffix}")

    def _chart_args(self, kind: str, drop: Sequence[str]) -> list[str]:
        """The chart's arguments for its agent (DaemonSet) or webhook (Deployment) container,
        less the subcommand and the flags that only make sense inside a pod."""
        obj = self._chart_object(kind)
        container = obj["spec"]["template"]["spec"]["containers"][0]
        args = [str(a) for a in container.get("args") or []][1:]
        return [a for a in args if a.split("=", 1)[0] not in drop]

    def _apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        """``kubectl apply`` as the admin, its discovery cache in the demo's folder (not ~/.kube)."""
        from .. import chart

        cache = f"--cache-dir={self.workdir / 'kubectl-cache'}"
        done = self.cp.kubectl(cache, "apply", "-f", "-", input=chart.dump(objects), check=False)
        if done.returncode != 0:
            raise DemoError(f"kubectl apply failed: {(done.stderr or done.stdout).strip()}")

    def _install_controller(self) -> None:
        from .. import chart

        with self.step("applying the chart's Namespace, ServiceAccounts and RBAC") as out:
            wanted = {"Namespace"} | set(chart.RBAC_KINDS)
            objects = [o for o in self.chart_objects if o.get("kind") in wanted]
            self._apply(objects)
            agent_sa = self._chart_object("ServiceAccount", "-agent")["metadata"]["name"]
            webhook_sa = self._chart_object("ServiceAccount", "-webhook")["metadata"]["name"]
            deadline = time.monotonic() + 15
            while not (
                chart.can(self.client, CONTROLLER_NAMESPACE, agent_sa, "list", "pods")
                and chart.can(self.client, CONTROLLER_NAMESPACE, webhook_sa, "get", "namespaces")
            ):
                if time.monotonic() > deadline:
                    raise DemoError("the chart's RBAC did not take effect within 15 s")
                time.sleep(0.05)
            self.agent_kubeconfig = self.cp.write_service_account_kubeconfig(
                CONTROLLER_NAMESPACE, agent_sa, self.workdir / "kubeconfig-agent", create=False
            )
            self.webhook_kubeconfig = self.cp.write_service_account_kubeconfig(
                CONTROLLER_NAMESPACE, webhook_sa, self.workdir / "kubeconfig-webhook", create=False
            )
            kinds = ", ".join(
                f"{k} {sum(1 for o in objects if o['kind'] == k)}"
                for k in sorted({o["kind"] for o in objects})
            )
            out["text"] = f"chart applied: {kinds}"
            out["details"] = [
                f"agent and webhook get tokens of ServiceAccounts {agent_sa} and {webhook_sa}: "
                "exactly the chart's permissions"
            ]

    def _start_nodes_and_components(self) -> None:
        from ..agentproc import AgentProcess
        from ..standin import NodeStandIn
        from ..webhookproc import WebhookProcess

        agent_args = self._chart_args("DaemonSet", drop=("--proc-root", "--listen-address", "--workers"))
        workers = next(
            (
                int(a.split("=", 1)[1])
                for a in self._chart_args("DaemonSet", ())
                if a.startswith("--workers=")
            ),
            4,
        )
        webhook_args = self._chart_args(
            "Deployment", drop=("--port", "--tls-cert-file", "--tls-private-key-file")
        )
        with self.step(
            f"starting node stand-ins {' and '.join(NODES)}, one agent per node, the webhook"
        ) as out:
            # The agents and the webhook are separate processes: start them first, they load while
            # the stand-ins make their bridges.
            for node in NODES:
                agent = AgentProcess(self.agent_kubeconfig, node, workers=workers, extra=tuple(agent_args))
                self.agents[node] = agent
                self.stack.callback(agent.close)
                self.stack.callback(agent.stop)
                agent.start()
                assert agent.popen is not None
                self.summary.resources.add_pid(agent.popen.pid)
            folder = self.workdir / "webhook"
            folder.mkdir()
            self._webhook = WebhookProcess(self.webhook_kubeconfig, extra=webhook_args, folder=folder)
            self.stack.callback(self.webhook.stop)
            for node in NODES:
                standin = NodeStandIn(
                    node,
                    self.cp.kubeconfig_path,
                    workdir_parent=self.workdir,
                    backoff_initial=0.5,
                    backoff_max=2.0,
                    stop_timeout=2.0,
                )
                self.nodes[node] = standin
                self.stack.callback(standin.close)
                standin.start()
                assert standin.lab is not None
                self.summary.resources.netns_prefixes.append(standin.lab.prefix)
                self.summary.resources.cgroup_tops.append(standin.cgroup_top)
            self.webhook.start()
            assert self.webhook.popen is not None
            self.summary.resources.add_pid(self.webhook.popen.pid)
            for agent in self.agents.values():
                agent.wait_ready()
            subnets = ", ".join(f"{n} {s.lab.subnet4}" for n, s in self.nodes.items() if s.lab)
            out["text"] = f"2 nodes ({subnets}), agents ready, webhook serving on {self.webhook.url}"
            out["details"] = [
                f"agent: {PROG} run --node-name=NODE --workers={workers} {' '.join(agent_args)} "
                "(the chart's DaemonSet)",
                f"webhook: {PROG} webhook {' '.join(webhook_args)} (the chart's Deployment)",
                "each node has its own bridge and no route to the other's: "
                "pods on different nodes cannot reach each other",
            ]

    def _prepare_namespace(self) -> None:
        from lightkube import codecs

        labels = {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/audit": "restricted",
            names.OPT_IN: names.OPT_IN_VALUE,
            "istio-injection": "enabled",
        }
        with self.step(f"creating namespace {DEMO_NAMESPACE}") as out:
            docs: list[dict[str, Any]] = [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": DEMO_NAMESPACE, "labels": labels},
                },
                {  # what istiod publishes in every namespace (the sidecar mounts it)
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "istio-ca-root-cert", "namespace": DEMO_NAMESPACE},
                    "data": {"root-cert.pem": self._ca_pem()},
                },
            ]
            for service in SERVICES:
                docs.append(
                    {
                        "apiVersion": "v1",
                        "kind": "ServiceAccount",
                        "metadata": {"name": service, "namespace": DEMO_NAMESPACE},
                    }
                )
                docs.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {
                            "name": service,
                            "namespace": DEMO_NAMESPACE,
                            "labels": {"app": service},
                        },
                        "spec": {
                            "selector": {"app": service},
                            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
                        },
                    }
                )
            for doc in docs:
                created = self.client.create(codecs.from_dict(doc))
                if doc["kind"] == "Service":
                    self.service_ips[doc["metadata"]["name"]] = str(created.spec.clusterIP)
            out["text"] = (
                f"namespace {DEMO_NAMESPACE}: pod-security.kubernetes.io/enforce=restricted, "
                f"{names.OPT_IN}={names.OPT_IN_VALUE}"
            )
            out["details"] = [
                "services: " + ", ".join(f"{s} {ip}:{SERVICE_PORT}" for s, ip in self.service_ips.items())
            ]
        # The point of it all, before the controller's webhook is in the path: Istio's pod is refused.
        with self.step("without the controller: a server-side dry run of Istio's pod") as out:
            pod = sample_pod(SERVICES[0], DEMO_NAMESPACE, PLACEMENT[SERVICES[0]])
            refusal = self._dry_run(pod)
            if refusal:
                out["text"] = (
                    "without the controller, PodSecurity refuses Istio's pod (istio-init needs NET_ADMIN)"
                )
                out["details"] = [refusal]
            else:
                out["text"] = (
                    "without the controller, Istio's pod was admitted (unexpected: is PodSecurity on?)"
                )

    def _ca_pem(self) -> str:
        certs = self.cp.certs
        if certs is None:
            raise DemoError("the control plane has no certificates")
        return certs.ca_cert.read_text()

    def _dry_run(self, pod: dict[str, Any]) -> str:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            self.client.create(Pod.from_dict(pod), dry_run=True)
        except ApiError as exc:
            message = str(exc.status.message or exc)
            marker = "violates PodSecurity"
            return message[message.find(marker) :] if marker in message else message
        return ""

    def _register_webhook(self) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        with self.step("registering the chart's MutatingWebhookConfiguration") as out:
            config = copy.deepcopy(self._chart_object("MutatingWebhookConfiguration"))
            bundle = base64.b64encode(self.webhook.pair.ca.pem).decode()
            for hook in config["webhooks"]:
                # The chart points at its Service; here the webhook runs on loopback.
                hook["clientConfig"] = {"url": self.webhook.url, "caBundle": bundle}

            self._apply([config])
            # The API server picks the configuration up asynchronously: create unscheduled probe
            # pods until one comes back mutated (no stand-in runs a pod without a node).
            deadline = time.monotonic() + 20
            for attempt in range(1, 1000):
                probe: dict[str, Any] = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"webhook-probe-{attempt}", "namespace": DEMO_NAMESPACE},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": n,
                                "image": "registry.example/probe",
                                "securityContext": copy.deepcopy(RESTRICTED_CONTAINER),
                            }
                            for n in ("app", ISTIO_PROXY)
                        ],
                    },
                }
                created = self.client.create(Pod.from_dict(probe)).to_dict()
                with contextlib.suppress(ApiError):
                    self.client.delete(
                        Pod, probe["metadata"]["name"], namespace=DEMO_NAMESPACE, grace_period=0
                    )
                if W in init_names(created):
                    break
                if time.monotonic() > deadline:
                    raise DemoError("the API server did not call the webhook within 20 s")
                time.sleep(0.1)
            entries = ", ".join(h["name"] for h in config["webhooks"])
            out["text"] = f"webhook configuration {config['metadata']['name']} in effect ({entries})"
            out["details"] = [
                f"clientConfig: {self.webhook.url} with the webhook's CA as caBundle "
                "(in a cluster: the chart's Service)"
            ]

    # -- the sample application ---------------------------------------------------------------

    def _deploy(self) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        self.display.line(
            f"[bold]deploying[/bold] {' → '.join(SERVICES)}: pods as istiod injects them, istio-init included"
        )
        self.display.begin("waiting for the pods to be programmed and to start")
        for service in SERVICES:
            record = PodRecord(service=service, name="", node=PLACEMENT[service])
            pod = sample_pod(service, DEMO_NAMESPACE, record.node)
            record.name = pod["metadata"]["name"]
            record.created_at = time.monotonic()
            try:
                created = self.client.create(Pod.from_dict(pod)).to_dict()
            except ApiError as exc:
                raise DemoError(f"pod {record.name} was refused: {exc.status.message}") from None
            record.uid = str(created["metadata"]["uid"])
            record.admitted = True
            record.init_containers = init_names(created)
            annotations = created["metadata"].get("annotations") or {}
            record.mutated = (
                record.init_containers[:1] == [W]
                and ISTIO_INIT not in record.init_containers
                and not added_capabilities(created)
                and names.IPTABLES_ARGS in annotations
            )
            self.pods[record.name] = record
            self.display.pods = list(self.pods.values())
            if record.mutated:
                self._event(
                    record,
                    f"admitted under restricted, mutated: {ISTIO_INIT} → {W} (init containers: "
                    f"{', '.join(record.init_containers)}; no capability added)",
                )
            else:
                self._event(
                    record, f"[red]admitted but not mutated as expected: {record.init_containers}[/red]"
                )
        self._watch()

    def _event(self, record: PodRecord, text: str, at: float | None = None) -> None:
        at = time.monotonic() - record.created_at if at is None else at
        self.display.line(f"  [cyan]{record.name:<16}[/cyan] [dim]+{at:5.2f}s[/dim]  {text}")

    def _watch(self) -> None:
        """Follow each pod through the API (as kubectl would) until all run, or the timeout."""
        from lightkube.resources.core_v1 import Pod

        deadline = time.monotonic() + self.options.timeout
        while True:
            found = {p.metadata.name: p.to_dict() for p in self.client.list(Pod, namespace=DEMO_NAMESPACE)}
            for record in self.pods.values():
                obj = found.get(record.name)
                if obj is not None:
                    self._observe(record, obj)
            self.display.pods = list(self.pods.values())
            if all(r.running_s is not None for r in self.pods.values()):
                self.display.activity = ""
                return
            if time.monotonic() > deadline:
                late = [r for r in self.pods.values() if r.running_s is None]
                for r in late:
                    r.problem = r.problem or "not running in time"
                    self._event(
                        r, f"[red]not running after {self.options.timeout:g} s[/red]: {self._diagnose(r)}"
                    )
                raise DemoError(f"{len(late)} pod(s) did not start within {self.options.timeout:g} s")
            time.sleep(0.02)

    def _observe(self, record: PodRecord, obj: Mapping[str, Any]) -> None:
        now = time.monotonic() - record.created_at
        status = obj.get("status") or {}
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        record.ip = record.ip or str(status.get("podIP") or "")
        standin = self.nodes[record.node]
        view = standin.get(record.uid)
        if view is not None:
            self.summary.resources.add_pid(view.sandbox_pid)
            for c in view.containers.values():
                for pid in c.pids:
                    self.summary.resources.add_pid(pid)
            if view.netns_inode and view.netns_inode not in self.summary.resources.netns_inodes:
                self.summary.resources.netns_inodes.append(view.netns_inode)
        mark = annotations.get(names.STATUS)
        if record.programmed_s is None and mark == names.STATUS_INITIALIZED:
            detail = json.loads(annotations.get(names.DETAIL) or "{}")
            record.programmed_s = now
            record.apply_ms = detail.get("applyMs")
            record.rules = detail.get("rules")
            record.backend = str(detail.get("backend") or "")
            record.netns_inode = detail.get("netnsInode")
            self._event(
                record,
                f"programmed by the agent on {detail.get('node', record.node)}: {record.rules} rules "
                f"({record.backend}) in {record.apply_ms} ms, netns {record.netns_inode}, pod IP {record.ip}",
                now,
            )
        elif mark == names.STATUS_ERROR and not record.problem:
            record.problem = str(json.loads(annotations.get(names.DETAIL) or "{}").get("error", "error"))
            self._event(record, f"[red]the agent reports an error: {record.problem}[/red]")
        waiter: Mapping[str, Any] = next(
            (s for s in status.get("initContainerStatuses") or [] if s.get("name") == W), {}
        )
        ended = (waiter.get("state") or {}).get("terminated")
        if record.waiter_s is None and ended and ended.get("exitCode") == 0:
            record.waiter_s = now
            line = ""
            with contextlib.suppress(Exception):
                line = standin.logs(record.uid, W).strip().splitlines()[-1]
            record.waiter_line = line.removeprefix(f"{PROG} init: ")
            proof = (
                record.waiter_line.rpartition("; ")[2] if "; " in record.waiter_line else record.waiter_line
            )
            self._event(
                record, f"waiter passed ({W}, UID {self._waiter_uid(obj)}, no capabilities): {proof}", now
            )
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if record.initialized_s is None and conditions.get("Initialized") == "True":
            record.initialized_s = now
        if (
            record.running_s is None
            and status.get("phase") == "Running"
            and conditions.get("Ready") == "True"
        ):
            record.running_s = now
            ready = [s.get("name") for s in status.get("containerStatuses") or [] if s.get("ready")]
            self._event(
                record, f"[green]running[/green]: {ISTIO_PROXY} and {', '.join(map(str, ready))} ready", now
            )

    @staticmethod
    def _waiter_uid(obj: Mapping[str, Any]) -> str:
        for c in (obj.get("spec") or {}).get("initContainers") or []:
            if c.get("name") == W:
                return str((c.get("securityContext") or {}).get("runAsUser", "?"))
        return "?"

    def _diagnose(self, record: PodRecord) -> str:
        standin = self.nodes[record.node]
        view = standin.get(record.uid)
        if view is None:
            return "the node stand-in has not seen it"
        states = ", ".join(f"{c.name}={c.state}({c.reason})" for c in view.containers.values())
        waiter = ""
        with contextlib.suppress(Exception):
            waiter = _tail(standin.logs(record.uid, W), 2)
        return f"{states}; error={view.error!r}; waiter: {waiter}"

    # -- requests ------------------------------------------------------------------------------

    def _route_check(self, source_node: str, target_ip: str) -> str:
        """What the source node's network says about the target pod's IP (``ip route get``)."""
        lab = self.nodes[source_node].lab
        if lab is None:
            return "the node is gone"
        done = subprocess.run(  # noqa: S603 - fixed argv
            ["ip", "-n", lab.node, "route", "get", target_ip],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        text = (done.stderr or done.stdout).strip().splitlines()
        answer = text[0] if text else f"exit {done.returncode}"
        return answer.removeprefix("RTNETLINK answers: ")

    def _requests(self) -> None:
        self.display.line(
            f"[bold]requests[/bold] {' → '.join(SERVICES)}: each app connects to the next service's ClusterIP"
        )
        self.display.begin("sending requests")
        by_service: dict[str, list[PodRecord]] = {}
        for record in self.pods.values():
            by_service.setdefault(record.service, []).append(record)
        hops = list(itertools.pairwise(SERVICES))
        for source_service, target_service in hops:
            source, targets = by_service[source_service][0], by_service[target_service]
            for target in targets:
                if target.node != source.node and target.ip:
                    verdict = self._route_check(source.node, target.ip)
                    self.display.detail(
                        f"{target.name} ({target.ip}) runs on {target.node}; from {source.node}: "
                        f"`ip route get {target.ip}` → {verdict}. "
                        f"No matter: {source.name}'s sidecar takes the connection."
                    )
        for number in range(1, self.options.requests + 1):
            for source_service, target_service in hops:
                source = by_service[source_service][0]
                self._hop(number, source, target_service, by_service[target_service])
        for record in self.pods.values():  # nothing reached an application around its sidecar
            with contextlib.suppress(Exception):
                record.reached_directly = len(self.nodes[record.node].connections(record.uid, record.service))
        self.display.activity = ""

    def _hop(self, number: int, source: PodRecord, service: str, targets: Sequence[PodRecord]) -> None:
        address = self.service_ips[service]
        hop = HopRecord(
            request=number,
            source=source.name,
            source_node=source.node,
            service=service,
            address=address,
            port=SERVICE_PORT,
            target_pods=[t.name for t in targets],
            target_nodes=[t.node for t in targets],
        )
        standin = self.nodes[source.node]
        t0 = time.monotonic()
        answer = standin.app_request(source.uid, source.service, address, SERVICE_PORT, timeout=3.0)
        hop.ms = round((time.monotonic() - t0) * 1000, 1)
        reply = answer.get("reply") if answer.get("ok") else None
        if isinstance(reply, dict):
            hop.answered_by = f"{reply.get('server')}:{reply.get('port')}"
            hop.original_destination = reply.get("orig")
            token = reply.get("token")
            with contextlib.suppress(Exception):
                hop.recorded_by_sidecar = any(
                    r.get("token") == token for r in standin.connections(source.uid, ISTIO_PROXY)
                )
            hop.intercepted = (
                reply.get("server") == ISTIO_PROXY
                and reply.get("port") == OUTBOUND_PORT
                and hop.original_destination == [address, SERVICE_PORT]
                and hop.recorded_by_sidecar
            )
        else:
            hop.error = str(answer.get("error") or answer)
        source.requests_sent += 1
        source.requests_intercepted += int(hop.intercepted)
        self.summary.hops.append(hop)
        arrow = f"request {number}: {source.name} ({source.node}) → {service} {address}:{SERVICE_PORT}"
        if hop.intercepted:
            self.display.line(
                f"  {arrow}  [green]captured[/green] by {source.name}'s {ISTIO_PROXY} on :{OUTBOUND_PORT}, "
                f"original destination {address}:{SERVICE_PORT} [dim]({hop.ms} ms)[/dim]"
            )
        else:
            got = (
                hop.error or f"answered by {hop.answered_by}, original destination {hop.original_destination}"
            )
            self.display.line(f"  {arrow}  [red]not intercepted[/red]: {got}")

    # -- keep, teardown ------------------------------------------------------------------------

    def keep(self, wait: Callable[[], None]) -> None:
        """Print how to look around, then wait (until Ctrl-C or SIGTERM)."""
        from .. import binaries

        kubectl = binaries.find("kubectl")
        kubeconfig = self.cp.kubeconfig_path
        self.summary.kept = True
        self.display.plain()
        self.display.plain("[bold]Left running[/bold]; explore it from another shell:")
        self.display.plain(f"  export KUBECONFIG={kubeconfig}")
        self.display.plain(f"  {kubectl} get pods -n {DEMO_NAMESPACE} -o wide")
        self.display.plain(
            f"  {kubectl} get pod -n {DEMO_NAMESPACE} {next(iter(self.pods), 'POD')} "
            f"-o jsonpath='{{.metadata.annotations}}'"
        )
        self.display.plain(f"  {kubectl} get events -n {DEMO_NAMESPACE}")
        self.display.plain(f"KUBECONFIG={kubeconfig}")
        self.display.plain("Press Ctrl-C to stop it and remove everything.")
        wait()

    def failure_context(self) -> list[str]:
        """The last lines of the components' logs, for a failed run."""
        logs: list[tuple[str, Callable[[], str]]] = [(f"agent {n}", a.logs) for n, a in self.agents.items()]
        if self._webhook is not None:
            logs.append(("webhook", self._webhook.logs))
        logs.append(("demo", (self.workdir / "demo.log").read_text))
        lines: list[str] = []
        for name, read in logs:
            text = ""
            with contextlib.suppress(Exception):
                text = _tail(read(), 8)
            if text:
                lines += [f"--- {name} ---", text]
        return lines

    def close(self) -> None:
        """Tear everything down, last started first; every step runs even if one fails."""
        self.stack.close()


# -- entry point -----------------------------------------------------------------------------------


def _print_summary(display: Display, summary: Summary) -> None:
    display.plain()
    wide = display.console.width >= 100
    display.console.print(pod_table(summary.pods, wide=wide))
    legend = "mutated: the webhook replaced istio-init by the waiter, no capability added; " if wide else ""
    display.plain(
        f"{legend}rules: when the agent's mark came (after the pod's creation); apply: the agent's own "
        "time to write and verify them; initialized: all init containers done (waiter, sidecar); "
        "running: ready; requests: caught by the sender's sidecar"
    )
    running = sum(1 for p in summary.pods if p.ok)
    intercepted = sum(1 for h in summary.hops if h.intercepted)
    direct = sum(p.reached_directly for p in summary.pods)
    verdict = "[green]OK[/green]" if summary.ok else "[red]FAILED[/red]"
    display.plain(
        f"{verdict}: {running}/{len(summary.pods)} pods initialized and running under restricted, "
        f"{intercepted}/{len(summary.hops)} requests intercepted by the sender's sidecar with their original "
        f"destination, {direct} reached an application around its sidecar; "
        f"set-up {summary.setup_seconds:.1f} s, total {summary.seconds:.1f} s"
    )


def _write_json(path: Path | None, summary: Summary) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    tmp.replace(path)


def run(options: Options) -> int:
    """The ``demo`` command: 0 only when every pod initialized and ran and every request was
    intercepted; 1 otherwise (with one line saying why)."""
    try:
        check_prerequisites()
    except DemoError as exc:
        print(f"{PROG} demo: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise Interrupted(signal.Signals(signum).name)

    def ignore(signum: int, frame: FrameType | None) -> None:
        stop.set()  # already tearing down: finish that first

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    display = Display(live=options.live)
    demo = Demo(options, display)
    t0 = time.monotonic()
    summary = demo.summary
    try:
        try:
            demo.run()
            summary.seconds = time.monotonic() - t0
            display.close()
            summary.pods = list(demo.pods.values())
            _print_summary(display, summary)
            if options.keep:

                def wait() -> None:
                    while not stop.wait(1.0):
                        for name, code in demo.cp.exit_codes().items():
                            if code is not None:
                                raise DemoError(f"{name} exited with status {code}")

                summary.kept = True
                _write_json(options.json_summary, summary)  # rewritten after the teardown
                demo.keep(wait)
        except Interrupted as exc:
            if not summary.failure and not summary.kept:
                summary.ok = False
                summary.failure = f"interrupted ({exc})"
            display.close()
            display.plain(f"\n{PROG} demo: {exc}: cleaning up")
        except Exception as exc:
            summary.ok = False
            summary.failure = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
            if stop.is_set():  # a terminal's Ctrl-C also stopped the agents: that is not the story
                summary.failure = f"interrupted ({summary.failure})"
            display.close()
            summary.pods = list(demo.pods.values())
            display.fail(f"{PROG} demo failed: {summary.failure}")
            for line in demo.failure_context():
                display.detail(line)
    finally:
        for sig in previous:
            signal.signal(sig, ignore)
        display.close()
        t1 = time.monotonic()
        if demo.workdir != Path():
            display.plain("tearing down: pods, node stand-ins, agents, webhook, control plane …")
        try:
            demo.close()
        except Exception as exc:  # a cleanup step failed: say so, the run failed
            summary.ok = False
            summary.failure = summary.failure or f"cleanup: {exc}"
            display.fail(f"cleanup: {exc}")
        summary.teardown_seconds = time.monotonic() - t1
        summary.seconds = time.monotonic() - t0
        summary.pods = list(demo.pods.values())
        if demo.workdir != Path():
            display.plain(f"removed everything ({summary.teardown_seconds:.1f} s)")
        _write_json(options.json_summary, summary)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if summary.ok else 1
