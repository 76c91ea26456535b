"""``demo``: the whole system doing its job for real on one machine, in one command.

Someone who clones the project has no cluster at hand, and a list of passing tests does not show
what the controller is for. This module assembles the test harness's real parts into the story
the project tells: Istio's injected pods, which need NET_ADMIN for their istio-init, are
admitted into a namespace that enforces the ``restricted`` Pod Security level, get their redirect
rules from the node agent instead, wait for them in an unprivileged init container, start, and
their outbound traffic is captured by their sidecar.

Nothing is faked that runs here for real: etcd and kube-apiserver (``controlplane``), the
chart rendered by helm (its Namespace, ServiceAccounts and RBAC are applied, its
MutatingWebhookConfiguration too, pointed at the webhook on loopback with a caBundle, and the
agent's and webhook's arguments are taken from its DaemonSet and Deployment), one ``run`` agent
per node under the chart's ServiceAccount, the ``webhook`` process, and two node stand-ins
(``standin``: real network namespaces, cgroups and processes for the pods of one node name
each). The pods of the sample application (frontend -> backend -> database) are injected by
Istio's own istiod when ``scripts/build-istio`` has built it (``istiod``: Istio's charts
helm-installed, istiod a local process, the pods created un-injected so that its injector
and then our webhook mutate them), else created as Istio's saved injection output has them. A
pod's app stub then connects to the next service's ClusterIP; with one bridge per
stand-in, pods on different nodes cannot reach each other at all, which does not matter: the
outbound capture hands every connection to the sender's own sidecar stub, which records the
original destination. That is what is shown and counted.

Everything is torn down at the end (or on Ctrl-C, or SIGTERM): processes, network namespaces and
their veths, cgroups, temporary folders. ``--keep`` leaves it running for kubectl until Ctrl-C.
The output is a live table on a terminal and plain lines with timings otherwise; a JSON summary
(``--json-summary``) lets a test check the outcome and what had to be cleaned up.

This module runs it: prerequisites, start and stop of every part, the steps of the story,
signals. The pods and what counts as success are in ``scenario``, the records and the summary in
``summary``, the terminal output in ``display``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from istio_pod_network_controller import names
from istio_pod_network_controller.cli import PROG

from .display import Display
from .scenario import (
    DEMO_NAMESPACE,
    ISTIO_INIT,
    ISTIO_PROXY,
    NODES,
    OUTBOUND_PORT,
    PLACEMENT,
    SERVICE_PORT,
    SERVICES,
    W,
    application_pod,
    init_names,
    intercepted,
    is_mutated,
    namespace_objects,
    sample_pod,
    webhook_probe_pod,
)
from .summary import HopRecord, PodRecord, Summary, print_summary, write_json

if TYPE_CHECKING:  # imported when used: `--help` and the prerequisite check stay light
    from ..agentproc import AgentProcess
    from ..controlplane import ControlPlane
    from ..istiod import Istiod
    from ..standin import NodeStandIn
    from ..webhookproc import WebhookProcess

log = logging.getLogger(__name__)

SETUP = "./scripts/setup"
CONTROLLER_NAMESPACE = "istio-pod-network-controller"  # where the chart installs the controller

# What the node stand-in and the agent run, besides the test binaries (found in /usr/sbin too).
SYSTEM_TOOLS = (
    "ip", "nsenter", "setpriv", "unshare", "sysctl",
    "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore",
)  # fmt: skip
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How long the demo waits for Istio's charts and istiod (its own readiness wait is 90 s).
ISTIOD_START_LIMIT = 150.0


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


# -- the demo --------------------------------------------------------------------------------------


@dataclass
class Options:
    keep: bool = False
    requests: int = 3
    timeout: float = 60.0
    json_summary: Path | None = None
    live: bool | None = None  # None: when stdout is a terminal
    real_node: bool = False  # real kubelets, containerd and runc (``demo.realnode``)


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
        # Istio's own injector, when scripts/build-istio has built istiod (else None: the pods are
        # created as Istio's saved injection output has them).
        self.istiod: Istiod | None = None
        self._istiod_start: Future[Istiod | None] | None = None
        self._istiod_pool: ThreadPoolExecutor | None = None
        self._istiod_handle: Istiod | None = None  # from before its install: teardown stops it

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
        self._start_istiod()
        self._install_controller()
        self._start_nodes_and_components()
        self._wait_for_istiod()
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

    # -- Istio's injector ------------------------------------------------------------------------

    def _start_istiod(self) -> None:
        """Install Istio's charts and start istiod (when built) in the background: it takes a
        few seconds, which the controller's start overlaps."""
        from .. import istiod

        cp = self.cp

        def start() -> Istiod | None:
            # As ``istiod.start_if_built``, but the handle is kept from before the install: a
            # Ctrl-C fails helm or kubectl half-way, and the teardown still removes its folder.
            build = istiod.find_build()
            if build is None:
                return None
            self._istiod_handle = istiod.Istiod(cp, build)
            return self._istiod_handle.install().start()

        pool = self._istiod_pool = ThreadPoolExecutor(1, thread_name_prefix="istiod")
        self._istiod_start = pool.submit(start)
        # Registered before the later parts' callbacks, so run after them, and before the control
        # plane's: whatever the start came to (even after a Ctrl-C), istiod is stopped.
        self.stack.callback(self._stop_istiod)

    def _stop_istiod(self) -> None:
        start, pool = self._istiod_start, self._istiod_pool
        if start is not None:
            with contextlib.suppress(Exception):
                start.result(timeout=ISTIOD_START_LIMIT)
        if self._istiod_handle is not None:
            self._istiod_handle.stop()  # its process, if any, and its folder
        if pool is not None:
            pool.shutdown(wait=False)

    def _wait_for_istiod(self) -> None:
        with self.step("Istio's injection: istiod with Istio's charts, when built") as out:
            assert self._istiod_start is not None
            try:
                self.istiod = self._istiod_start.result(timeout=ISTIOD_START_LIMIT)
            except Exception as exc:
                raise DemoError(f"istiod did not start: {_tail(str(exc), 3)}") from None
            if self.istiod is not None:
                out["text"] = (
                    f"Istio injection: istiod {self.istiod.build.version}, built from the pinned "
                    "module, with Istio's charts"
                )
                popen = self.istiod.popen
                self.summary.resources.add_pid(popen.pid if popen is not None else None)
                self.summary.injection = f"istiod {self.istiod.build.version}"
                out["details"] = [
                    f"istiod listens on {self.istiod.address}; the API server calls its injector "
                    "through the chart's MutatingWebhookConfiguration, then ours (named after it)"
                ]
            else:
                out["text"] = (
                    "Istio injection: Istio's saved injection output "
                    "(istiod is not built: scripts/build-istio)"
                )
                self.summary.injection = "saved"

    @property
    def real_injection(self) -> bool:
        return self.istiod is not None

    def _pod(self, service: str, node: str) -> dict[str, Any]:
        """The sample pod to create: un-injected for istiod's injector, else as Istio's saved
        injection output has it."""
        make = application_pod if self.real_injection else sample_pod
        return make(service, DEMO_NAMESPACE, node)

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

        with self.step(f"creating namespace {DEMO_NAMESPACE}") as out:
            # istiod publishes its own CA in every namespace; without it, the control plane's stands in.
            docs = namespace_objects(None if self.real_injection else self._ca_pem())
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
            pod = self._pod(SERVICES[0], PLACEMENT[SERVICES[0]])
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
            # pods until one comes back mutated (no stand-in runs a pod without a node). With
            # istiod's injector in the path, PodSecurity refuses them until ours is called too.
            deadline = time.monotonic() + 20
            last = ""
            for attempt in range(1, 1000):
                probe = webhook_probe_pod(attempt, sidecar=not self.real_injection)
                created: dict[str, Any] = {}
                try:
                    created = self.client.create(Pod.from_dict(probe)).to_dict()
                except ApiError as exc:
                    last = str(exc.status.message or exc)
                with contextlib.suppress(ApiError):
                    self.client.delete(
                        Pod, probe["metadata"]["name"], namespace=DEMO_NAMESPACE, grace_period=0
                    )
                if W in init_names(created):
                    break
                if time.monotonic() > deadline:
                    raise DemoError(f"the API server did not call the webhook within 20 s {last}".strip())
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

        how = (
            "created un-injected; istiod's injector adds istio-init and istio-proxy, then our webhook"
            if self.real_injection
            else "pods as istiod injects them (Istio's saved injection output), istio-init included"
        )
        self.display.line(f"[bold]deploying[/bold] {' → '.join(SERVICES)}: {how}")
        self.display.begin("waiting for the pods to be programmed and to start")
        for service in SERVICES:
            record = PodRecord(service=service, name="", node=PLACEMENT[service])
            pod = self._pod(service, record.node)
            record.name = pod["metadata"]["name"]
            record.created_at = time.monotonic()
            try:
                created = self.client.create(Pod.from_dict(pod)).to_dict()
            except ApiError as exc:
                raise DemoError(f"pod {record.name} was refused: {exc.status.message}") from None
            record.uid = str(created["metadata"]["uid"])
            record.admitted = True
            record.init_containers = init_names(created)
            record.mutated = is_mutated(created)
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
            hop.intercepted = intercepted(reply, address, recorded_by_sidecar=hop.recorded_by_sidecar)
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


def run(options: Options) -> int:
    """The ``demo`` command: 0 only when every pod initialized and ran and every request was
    intercepted; 1 otherwise (with one line saying why)."""
    if options.real_node:
        from . import realnode

        return realnode.run(options)
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
            print_summary(display, summary)
            if options.keep:

                def wait() -> None:
                    while not stop.wait(1.0):
                        for name, code in demo.cp.exit_codes().items():
                            if code is not None:
                                raise DemoError(f"{name} exited with status {code}")

                summary.kept = True
                write_json(options.json_summary, summary)  # rewritten after the teardown
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
            display.plain("tearing down: pods, node stand-ins, agents, webhook, istiod, control plane …")
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
        write_json(options.json_summary, summary)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if summary.ok else 1
