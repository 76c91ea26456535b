"""``demo --real-node``: the demo's story on real nodes (kubelet, containerd, runc).

The plain demo runs the agents and the webhook as processes beside node stand-ins, which is fast
and needs only the test binaries. With ``--real-node`` the same story runs on two real nodes of
``ipnc_dev.realnode`` (docs/real-node.md), which need the binaries and images ``scripts/setup``
builds: our chart is installed by helm from our image (agents as a DaemonSet, the webhook
behind its Service), the sample application's pods (frontend -> backend -> database) are shaped
as istiod injects them, and the kubelets run them: the webhook's waiter, the agent's rules, the
sidecar (the stub of the real-node tier, listening where Envoy would), and an application that
sends the requests itself (busybox, one connection per request to the next service's
ClusterIP, each reply logged). A request counts as intercepted when the sender's own sidecar
answered on its outbound port with the Service as original destination, and logged that very
connection. ``RealCluster`` tears everything down and compares the host with what it recorded
first; a difference fails the run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from istio_pod_network_controller import names
from istio_pod_network_controller.cli import PROG

from .display import Display
from .orchestration import SETUP, DemoError, Options, _tail
from .scenario import (
    DEMO_NAMESPACE,
    ISTIO_INIT,
    ISTIO_PROXY,
    OUTBOUND_PORT,
    PLACEMENT,
    SERVICE_PORT,
    SERVICES,
    W,
    init_names,
    intercepted,
    is_mutated,
    namespace_objects,
    sample_pod,
)
from .summary import HopRecord, PodRecord, Summary, print_summary, write_json

APP_UID = 1000
CLIENT_LINE = "client: "
TOKEN = "req:{number}:{pod}"
# The application of a service that calls the next one: REQUESTS connections to TARGET, each
# retried while nothing answers yet, each reply logged on one line; then it idles until SIGTERM
# (a container's PID 1 must trap it itself).
CLIENT_SCRIPT = f"""trap 'exit 0' TERM
n=1
while [ $n -le "$REQUESTS" ]; do
  i=0
  reply=""
  while [ $i -lt 10 ]; do
    reply=$(printf 'req:%s:%s\\n' "$n" "$POD_NAME" | nc -w 3 "$TARGET" {SERVICE_PORT} 2>&1)
    case "$reply" in *'"server"'*) break ;; esac
    i=$((i + 1))
    sleep 1
  done
  echo "{CLIENT_LINE}$reply"
  n=$((n + 1))
done
sleep 2147483647 &
wait
"""
IDLE_SCRIPT = "trap 'exit 0' TERM\nsleep 2147483647 &\nwait\n"
REQUESTS_TIMEOUT = 60.0


def check_prerequisites() -> None:
    """Raise DemoError naming what is not built, and ``scripts/setup``."""
    import os

    from .. import binaries
    from ..realnode import artifacts

    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root: real nodes run in namespaces, mounts and cgroups of their own. "
            f"Run it as root (sudo .venv/bin/{PROG} demo --real-node), after {SETUP}."
        )
    try:
        artifacts.node_binaries()
        artifacts.images(
            required=(artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
        )
        artifacts.cni_plugins()
        binaries.find_all(binaries.ALL_BINARIES)
    except (artifacts.ArtifactError, binaries.BinaryNotFoundError) as exc:
        raise DemoError(
            f"--real-node needs the real-node binaries and images, and they are not built ({exc}). "
            f"Run {SETUP} as root: it builds them once into ~/.cache/istio-pod-network-controller."
        ) from None


def real_pod(service: str, *, stub: str, busybox: str, target: str | None, requests: int) -> dict[str, Any]:
    """``scenario.sample_pod`` made runnable on a real node: the sidecar is the stub image, the
    application is busybox calling ``target`` (the next service's ClusterIP), as a non-root user
    (a busybox image runs as root unless told); nothing of Istio's own containers changes."""
    pod = sample_pod(service, DEMO_NAMESPACE, PLACEMENT[service])
    spec = pod["spec"]
    for container in spec["initContainers"]:
        if container["name"] == ISTIO_PROXY:
            container["image"] = stub
            container["imagePullPolicy"] = "Never"
    app = spec["containers"][0]
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if target is not None:
        env += [{"name": "TARGET", "value": target}, {"name": "REQUESTS", "value": str(requests)}]
    app.update(
        image=busybox,
        imagePullPolicy="Never",
        command=["sh", "-c", CLIENT_SCRIPT if target is not None else IDLE_SCRIPT],
        env=env,
    )
    app["securityContext"] = {**app["securityContext"], "runAsUser": APP_UID, "runAsGroup": APP_UID}
    return pod


def client_replies(log: str) -> list[dict[str, Any]]:
    """The sidecar's answers the application logged, in order (an unparsable one as {})."""
    out: list[dict[str, Any]] = []
    for line in log.splitlines():
        if line.startswith(CLIENT_LINE):
            try:
                reply = json.loads(line[len(CLIENT_LINE) :])
            except ValueError:
                reply = {}
            out.append(reply if isinstance(reply, dict) else {})
    return out


def sidecar_tokens(log: str) -> set[str]:
    """The tokens of the connections the stub sidecar logged (one JSON object per line)."""
    tokens: set[str] = set()
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("token"), str):
                tokens.add(record["token"])
    return tokens


class RealNodeDemo:
    """Two real nodes, the chart, the sample application, its requests; ``close`` tears down."""

    def __init__(self, options: Options, display: Display) -> None:
        self.options = options
        self.display = display
        self.summary = Summary(real_node=True)
        self.stack = contextlib.ExitStack()
        self.cluster: Any = None  # ipnc_dev.realnode.RealCluster, imported when run
        self.client: Any = None
        self.service_ips: dict[str, str] = {}
        self.pods: dict[str, PodRecord] = {}

    @contextlib.contextmanager
    def step(self, activity: str) -> Any:
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
        from ..realnode import RealCluster, artifacts, install

        t0 = time.monotonic()
        self.display.line(
            f"[bold]{PROG} demo --real-node[/bold]: Istio's injected pods in a [bold]restricted[/bold] "
            "namespace on [bold]real nodes[/bold] (kubelet, containerd, runc), their iptables written by "
            "the node agent instead of istio-init"
        )
        archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
        with self.step("starting two real nodes: kubelet, containerd, runc, kube-proxy, CNI bridge") as out:
            cluster = RealCluster(nodes=2, image_archives=archives, log=self._harness_line)
            self.cluster = self.stack.enter_context(cluster)
            self.summary.resources.workdir = str(cluster.state)
            self.summary.resources.api_server = cluster.server
            names_ = ", ".join(f"{n.name} {n.plan.ip} (pods {n.plan.pod_cidr})" for n in cluster.nodes)
            out["text"] = f"real nodes Ready: {names_}"
            out["details"] = [
                f"API server {cluster.server}; each node in network and mount namespaces of its own, "
                f"state in {cluster.state}"
            ]
        self.client = self.stack.enter_context(self.cluster.client())
        with self.step("installing the chart with helm, from the image built from our Dockerfile") as out:
            release = install.install(self.cluster)
            out["text"] = (
                f"chart installed: agent DaemonSet {release.agent} (one per node), webhook Deployment "
                f"{release.webhook} behind its Service, image {release.image}"
            )
        self._prepare_namespace()
        self.summary.setup_seconds = time.monotonic() - t0
        self._deploy()
        self._requests()
        self.summary.ok = (
            all(p.ok for p in self.pods.values())
            and all(h.intercepted for h in self.summary.hops)
            and len(self.summary.hops) == self.options.requests * (len(SERVICES) - 1)
        )
        return self.summary

    def _harness_line(self, line: str) -> None:
        self.display.detail(f"[realnode] {line}")

    # -- namespace, webhook ----------------------------------------------------------------------

    def _prepare_namespace(self) -> None:
        from lightkube import ApiError, codecs
        from lightkube.resources.core_v1 import Pod

        from ..realnode import workload
        from ..realnode.processes import wait_until

        cp = self.cluster.control_plane
        with self.step(f"creating namespace {DEMO_NAMESPACE}") as out:
            for doc in namespace_objects(cp.certs.ca_cert.read_text()):
                created = self.client.create(codecs.from_dict(doc))
                if doc["kind"] == "Service":
                    self.service_ips[doc["metadata"]["name"]] = str(created.spec.clusterIP)
            self.cluster.wait_service_account(DEMO_NAMESPACE)
            out["text"] = (
                f"namespace {DEMO_NAMESPACE}: pod-security.kubernetes.io/enforce=restricted, "
                f"{names.OPT_IN}={names.OPT_IN_VALUE}"
            )
            out["details"] = [
                "services: " + ", ".join(f"{s} {ip}:{SERVICE_PORT}" for s, ip in self.service_ips.items())
            ]
        with self.step("waiting until the API server calls the webhook through its Service") as out:

            def mutated() -> bool:
                try:
                    probe = self.client.create(Pod.from_dict(workload.webhook_probe(DEMO_NAMESPACE)))
                except ApiError:
                    return False  # failurePolicy Fail while its Service is not routed yet
                self.client.delete(Pod, probe.metadata.name, namespace=DEMO_NAMESPACE, grace_period=0)
                return W in init_names(probe.to_dict())

            if not wait_until(mutated, 60.0, interval=0.5):
                raise DemoError("the API server did not call the webhook within 60 s")
            out["text"] = "webhook in effect: a probe pod came back with the waiter"
        # The webhook leaves dry runs alone: this is Istio's pod as PodSecurity judges it unaided.
        with self.step("without the controller: a server-side dry run of Istio's pod") as out:
            refusal = ""
            try:
                self.client.create(
                    Pod.from_dict(sample_pod(SERVICES[0], DEMO_NAMESPACE, PLACEMENT[SERVICES[0]])),
                    dry_run=True,
                )
            except ApiError as exc:
                message = str(exc.status.message or exc)
                marker = "violates PodSecurity"
                refusal = message[message.find(marker) :] if marker in message else message
            if refusal:
                out["text"] = (
                    "without the controller, PodSecurity refuses Istio's pod (istio-init needs NET_ADMIN)"
                )
                out["details"] = [refusal]
            else:
                out["text"] = (
                    "without the controller, Istio's pod was admitted (unexpected: is PodSecurity on?)"
                )

    # -- the sample application -----------------------------------------------------------------

    def _deploy(self) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        images = self.cluster.images
        self.display.line(
            f"[bold]deploying[/bold] {' → '.join(SERVICES)}: pods as istiod injects them, istio-init included"
        )
        self.display.begin("waiting for the kubelets to start the pods")
        for service, target in itertools.zip_longest(SERVICES, SERVICES[1:]):
            pod = real_pod(
                service,
                stub=images.stub,
                busybox=images.busybox,
                target=self.service_ips[target] if target else None,
                requests=self.options.requests,
            )
            record = PodRecord(service=service, name=pod["metadata"]["name"], node=PLACEMENT[service])
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
        from lightkube.resources.core_v1 import Pod

        deadline = time.monotonic() + self.options.timeout
        while True:
            found = {p.metadata.name: p.to_dict() for p in self.client.list(Pod, namespace=DEMO_NAMESPACE)}
            for record in self.pods.values():
                if record.name in found:
                    self._observe(record, found[record.name])
            self.display.pods = list(self.pods.values())
            if all(r.running_s is not None for r in self.pods.values()):
                self.display.activity = ""
                return
            if time.monotonic() > deadline:
                late = [r for r in self.pods.values() if r.running_s is None]
                for r in late:
                    r.problem = r.problem or "not running in time"
                    self._event(r, f"[red]not running after {self.options.timeout:g} s[/red]")
                raise DemoError(f"{len(late)} pod(s) did not start within {self.options.timeout:g} s")
            time.sleep(0.2)

    def _observe(self, record: PodRecord, obj: Mapping[str, Any]) -> None:
        now = time.monotonic() - record.created_at
        status = obj.get("status") or {}
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        record.ip = record.ip or str(status.get("podIP") or "")
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
            log = self._log(record.name, W)
            record.waiter_line = (log.strip().splitlines() or [""])[-1].removeprefix(f"{PROG} init: ")
            proof = (
                record.waiter_line.rpartition("; ")[2] if "; " in record.waiter_line else record.waiter_line
            )
            uid = next(
                (str((c.get("securityContext") or {}).get("runAsUser", "?"))
                 for c in (obj.get("spec") or {}).get("initContainers") or [] if c.get("name") == W),
                "?",
            )  # fmt: skip
            self._event(record, f"waiter passed ({W}, UID {uid}, no capabilities): {proof}", now)
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if record.initialized_s is None and conditions.get("Initialized") == "True":
            record.initialized_s = now
        if (
            record.running_s is None
            and status.get("phase") == "Running"
            and conditions.get("Ready") == "True"
        ):
            record.running_s = now
            ready = ", ".join(
                str(s.get("name")) for s in status.get("containerStatuses") or [] if s.get("ready")
            )
            self._event(
                record, f"[green]running[/green] on {record.node}: {ISTIO_PROXY} and {ready} ready", now
            )

    def _log(self, pod: str, container: str) -> str:
        """A container's log through the API server and the kubelet, as ``kubectl logs``."""
        with contextlib.suppress(Exception):
            return "".join(self.client.log(pod, namespace=DEMO_NAMESPACE, container=container))
        return ""

    # -- requests -------------------------------------------------------------------------------

    def _requests(self) -> None:
        from ..realnode.processes import wait_until

        self.display.line(
            f"[bold]requests[/bold] {' → '.join(SERVICES)}: each application connects to the next "
            "service's ClusterIP itself, and logs the answer"
        )
        self.display.begin("waiting for the applications' requests")
        by_service = {r.service: r for r in self.pods.values()}
        senders = [(by_service[s], t) for s, t in itertools.pairwise(SERVICES)]

        def answered() -> bool:
            return all(
                len(client_replies(self._log(sender.name, sender.service))) >= self.options.requests
                for sender, _ in senders
            )

        wait_until(answered, REQUESTS_TIMEOUT, interval=1.0)
        for number in range(1, self.options.requests + 1):
            for sender, target in senders:
                self._hop(number, sender, target, by_service[target])
        self.display.activity = ""

    def _hop(self, number: int, source: PodRecord, service: str, target: PodRecord) -> None:
        address = self.service_ips[service]
        hop = HopRecord(
            request=number,
            source=source.name,
            source_node=source.node,
            service=service,
            address=address,
            port=SERVICE_PORT,
            target_pods=[target.name],
            target_nodes=[target.node],
        )
        replies = client_replies(self._log(source.name, source.service))
        reply = replies[number - 1] if len(replies) >= number else None
        token = TOKEN.format(number=number, pod=source.name)
        if reply and reply.get("token") == token:
            hop.answered_by = f"{reply.get('server')}:{reply.get('port')}"
            hop.original_destination = reply.get("orig")
            hop.recorded_by_sidecar = token in sidecar_tokens(self._log(source.name, ISTIO_PROXY))
            hop.intercepted = intercepted(reply, address, recorded_by_sidecar=hop.recorded_by_sidecar)
        else:
            hop.error = (
                "no answer logged" if reply is None else f"unexpected answer: {json.dumps(reply)[:200]}"
            )
        source.requests_sent += 1
        source.requests_intercepted += int(hop.intercepted)
        self.summary.hops.append(hop)
        arrow = f"request {number}: {source.name} ({source.node}) → {service} {address}:{SERVICE_PORT}"
        if hop.intercepted:
            self.display.line(
                f"  {arrow}  [green]captured[/green] by {source.name}'s {ISTIO_PROXY} on :{OUTBOUND_PORT}, "
                f"original destination {address}:{SERVICE_PORT} (its log has the connection)"
            )
        else:
            got = (
                hop.error or f"answered by {hop.answered_by}, original destination {hop.original_destination}"
            )
            self.display.line(f"  {arrow}  [red]not intercepted[/red]: {got}")

    # -- keep, teardown ---------------------------------------------------------------------------

    def keep(self, stop: threading.Event) -> None:
        from .. import binaries

        kubectl = binaries.find("kubectl")
        kubeconfig = self.cluster.kubeconfig_path
        self.summary.kept = True
        self.display.plain()
        self.display.plain("[bold]Left running[/bold] on real nodes; explore it from another shell:")
        self.display.plain(f"  export KUBECONFIG={kubeconfig}")
        self.display.plain(f"  {kubectl} get pods -n {DEMO_NAMESPACE} -o wide")
        self.display.plain(f"  {kubectl} logs -n {DEMO_NAMESPACE} {next(iter(self.pods), 'POD')} -c {W}")
        self.display.plain(f"KUBECONFIG={kubeconfig}")
        self.display.plain("Press Ctrl-C to stop it and remove everything.")
        while not stop.wait(1.0):
            self.cluster.check_alive()

    def failure_context(self) -> list[str]:
        lines: list[str] = []
        for record in self.pods.values():
            text = _tail(self._log(record.name, W), 3) if self.client is not None else ""
            if text:
                lines += [f"--- {record.name} {W} ---", text]
        return lines

    def close(self) -> None:
        self.stack.close()


def run(options: Options) -> int:
    """``demo --real-node``: 0 only when every pod initialized and ran, every request was
    intercepted and the host is as it was; 1 otherwise (with one line saying why)."""
    from ..realnode import HostChanged, Terminated

    try:
        check_prerequisites()
    except DemoError as exc:
        import sys

        print(f"{PROG} demo: {exc}", file=sys.stderr)
        return 1
    display = Display(live=options.live)
    demo = RealNodeDemo(options, display)
    summary = demo.summary
    stop = threading.Event()
    t0 = time.monotonic()

    def fail(text: str) -> None:
        summary.ok = False
        summary.failure = summary.failure or text

    try:
        try:
            demo.run()
            summary.seconds = time.monotonic() - t0
            display.close()
            summary.pods = list(demo.pods.values())
            print_summary(display, summary)
            if options.keep:
                write_json(options.json_summary, summary)
                demo.keep(stop)
        except (KeyboardInterrupt, Terminated) as exc:
            if not summary.kept:
                fail(f"interrupted ({type(exc).__name__})")
            display.close()
            display.plain(f"\n{PROG} demo: interrupted: cleaning up")
        except Exception as exc:  # reported once, here
            fail(str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}")
            display.close()
            summary.pods = list(demo.pods.values())
            display.fail(f"{PROG} demo failed: {summary.failure}")
            for line in demo.failure_context():
                display.detail(line)
    finally:
        display.close()
        t1 = time.monotonic()
        started = demo.cluster is not None
        if started:
            display.plain(
                "tearing down: pods, real nodes, control plane; then comparing the host with before …"
            )
        try:
            demo.close()
            summary.host = "as it was" if started else ""
        except HostChanged as exc:
            summary.host = "; ".join(exc.differences)
            fail(f"the host is not as it was: {summary.host}")
            display.fail(str(exc))
        except Exception as exc:  # a cleanup step failed: say so, the run failed
            fail(f"cleanup: {exc}")
            display.fail(f"cleanup: {exc}")
        summary.teardown_seconds = time.monotonic() - t1
        summary.seconds = time.monotonic() - t0
        summary.pods = list(demo.pods.values())
        if summary.host == "as it was":
            display.plain(
                f"removed everything ({summary.teardown_seconds:.1f} s); the harness compared the host "
                "with its record from before: it is as it was"
            )
        write_json(options.json_summary, summary)
    return 0 if summary.ok else 1
