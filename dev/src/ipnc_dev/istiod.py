"""Istio's own control plane in a test cluster: its Helm charts installed, istiod as a local process.

The cluster tests need the injector users run, not a copy of its output: istiod built from the
pinned module (``scripts/build-istio``) and installed the way Istio's documentation says, ``helm
install`` of its ``base`` and ``istiod`` charts from the module's ``manifests/charts``. The charts'
objects all go into the cluster as they are (CRDs, the injector's ConfigMaps, the
MutatingWebhookConfiguration, RBAC, the Deployment and its Service). Only where istiod runs
differs: the plain control plane has no kubelet, so istiod runs here as a process, with the
Deployment's own arguments and environment, under a token of the chart's ``istiod``
ServiceAccount (so under the chart's RBAC).

How the API server reaches it: the chart's webhook points at Service ``istiod[-REV]`` port 443.
The API server resolves a Service by its ClusterIP, or, for an ``ExternalName`` Service, by that
name, and checks the certificate against ``<service>.<namespace>.svc`` either way. So the
Service is turned into an ``ExternalName`` of a loopback address of its own (one per istiod, on
the loopback network 127.0.0.0/8), where istiod's webhook listens on port 443: the API server
calls the injector through the chart's own webhook configuration, verifies istiod's own serving
certificate, and with the CA bundle that istiod itself patches into that configuration. (On real
nodes, ``realnode.istiod`` runs the same process in a node's network and routes the Service there.)

What Istio itself would program for a pod, the yardstick of our rules, comes from Istio's own code
too: ``istio_init_rules`` runs Istio's istio-iptables with an istio-init's arguments and
environment, ``cni_plugin_rules`` runs Istio's CNI plugin's ADD for a pod of the cluster (both in
dry run, printing the iptables-restore input they would feed).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chart
from .controlplane import ControlPlane

ISTIO_NAMESPACE = "istio-system"
READY_TIMEOUT = 90.0


class IstiodError(RuntimeError):
    """istiod could not be installed or did not become ready (the message carries its log tail)."""


@dataclass(frozen=True)
class IstioBuild:
    """What ``scripts/build-istio`` leaves in its cache: the binaries and the module's source."""

    version: str
    pilot_discovery: Path
    cni_rules: Path
    istio_iptables: Path
    source: Path

    @property
    def charts(self) -> Path:
        return self.source / "manifests" / "charts"


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("IPNC_ISTIO_CACHE"):
        return Path(env["IPNC_ISTIO_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "istio-pod-network-controller" / "istio"


def pinned_version(root: Path | None = None) -> str:
    """The istio.io/istio version hack/istio/go.mod pins."""
    root = root or chart.repo_root()
    for line in (root / "hack" / "istio" / "go.mod").read_text().splitlines():
        words = line.split()
        if "istio.io/istio" in words:
            return words[words.index("istio.io/istio") + 1]
    raise IstiodError("hack/istio/go.mod pins no istio.io/istio version")


def module_source(root: Path | None = None) -> Path | None:
    """The pinned module's folder in the Go module cache, as Go itself reports it for
    hack/istio (None when Go or the module is missing)."""
    root = root or chart.repo_root()
    try:
        run = subprocess.run(  # noqa: S603 - argument list
            [shutil.which("go") or "/usr/local/go/bin/go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio"],
            cwd=root / "hack" / "istio",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return None
    found = Path(run.stdout.strip()) if run.returncode == 0 and run.stdout.strip() else None
    return found if found is not None and found.is_dir() else None


def find_build(env: Mapping[str, str] | None = None) -> IstioBuild | None:
    """The cached build of the pinned version, or None when pilot-discovery is not built."""
    version = pinned_version()
    folders = sorted(cache_dir(env).glob(f"{version}-r*"), reverse=True)
    for folder in folders:
        pilot, cni, iptables = (folder / n for n in ("pilot-discovery", "istio-cni-rules", "istio-iptables"))
        if all(b.is_file() and os.access(b, os.X_OK) for b in (pilot, cni, iptables)):
            source = module_source()
            return None if source is None else IstioBuild(version, pilot, cni, iptables, source)
    return None


def require_build() -> IstioBuild:
    found = find_build()
    if found is None:
        raise IstiodError(
            "istiod (pilot-discovery) is not built for the pinned Istio version: run scripts/build-istio"
        )
    return found


def _loopback_address() -> str:
    """A loopback address of its own, so that istiod's fixed ports (15010, 15012, 443, ...) meet
    nothing else listening."""
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


@dataclass
class Istiod:
    """One istiod revision, installed with Istio's charts and running as a local process."""

    control_plane: ControlPlane
    build: IstioBuild
    revision: str = ""
    values: Mapping[str, str] = field(default_factory=dict)
    # Where it listens: every port on this address, its webhook on ``https_port``. The defaults
    # suit the plain control plane (a loopback address of its own, the Service's port 443).
    address: str = field(default_factory=_loopback_address)
    https_port: int = 443
    # Prefix of its command line (e.g. ``nsenter --net=...`` to run it in a node's network).
    launcher: tuple[str, ...] = ()
    # (ServiceAccount, path) -> a kubeconfig for that account; default: the control plane's own
    # address with a token of the account.
    kubeconfig_writer: Callable[[str, Path], Path] | None = None
    # How the API server reaches the chart's Service; default: ExternalName (see the docstring).
    route: Callable[[Istiod], None] | None = None
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ipnc-istiod-")))
    popen: subprocess.Popen[bytes] | None = None

    @property
    def service(self) -> str:
        return f"istiod-{self.revision}" if self.revision else "istiod"

    @property
    def release(self) -> str:
        return f"istiod-{self.revision}" if self.revision else "istiod"

    @property
    def log_path(self) -> Path:
        return self.folder / "istiod.log"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- install ---------------------------------------------------------------------------------

    def helm(self, *args: str) -> str:
        kubeconfig = self.control_plane.kubeconfig_path
        env = {"KUBECACHEDIR": str(self.folder / "kube-cache")}  # not ~/.kube
        return chart.helm(*args, kubeconfig=kubeconfig, env=env).stdout

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(
            f"--cache-dir={self.folder / 'kube-cache'}", *args, input=input, check=check
        )

    def install_base(self) -> None:
        """Istio's base chart (CRDs, the validating webhook for its own resources), once."""
        listed = self.helm("list", "-n", ISTIO_NAMESPACE, "-q")
        if "istio-base" not in listed.split():
            self.helm(
                "install", "istio-base", str(self.build.charts / "base"),
                "-n", ISTIO_NAMESPACE, "--create-namespace", "--set", "defaultRevision=default",
            )  # fmt: skip

    def install(self) -> Istiod:
        self.install_base()
        values = {"global.istioNamespace": ISTIO_NAMESPACE, **self.values}
        if self.revision:
            values["revision"] = self.revision
        sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
        self.helm(
            "install", self.release, str(self.build.charts / "istio-control" / "istio-discovery"),
            "-n", ISTIO_NAMESPACE, *sets,
        )  # fmt: skip
        (self.route or Istiod.route_by_external_name)(self)
        return self

    def route_by_external_name(self) -> None:
        """The chart's Service, as an ExternalName of istiod's loopback address (see the module's
        docstring): the API server's only way to a process outside any pod network."""
        patch = {
            "spec": {
                "type": "ExternalName",
                "externalName": self.address,
                "clusterIP": None,
                "clusterIPs": None,
            }
        }
        self.kubectl(
            "-n", ISTIO_NAMESPACE, "patch", "service", self.service, "--type=merge", "-p", json.dumps(patch)
        )

    # -- run -------------------------------------------------------------------------------------

    def _deployment(self) -> dict[str, Any]:
        out = self.kubectl("-n", ISTIO_NAMESPACE, "get", "deployment", self.release, "-o", "json")
        found: dict[str, Any] = json.loads(out.stdout)
        return found

    def _argv_and_env(self) -> tuple[list[str], dict[str, str]]:
        """The Deployment's discovery container as the kubelet would start it, with the listening
        addresses moved to our loopback address and the kubeconfig of its ServiceAccount."""
        deployment = self._deployment()
        pod = deployment["spec"]["template"]
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "discovery")
        account = pod["spec"].get("serviceAccountName", "istiod")
        env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        fields = {
            "metadata.name": f"{self.release}-local-{uuid.uuid4().hex[:5]}",
            "metadata.namespace": ISTIO_NAMESPACE,
            "spec.serviceAccountName": account,
        }
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif "fieldRef" in var.get("valueFrom", {}):
                path = var["valueFrom"]["fieldRef"]["fieldPath"]
                if path in fields:
                    env[var["name"]] = fields[path]
        env.pop("KUBECONFIG", None)  # the chart's names a file in the pod
        path = self.folder / "kubeconfig"
        if self.kubeconfig_writer is not None:
            kubeconfig = self.kubeconfig_writer(account, path)
        else:
            kubeconfig = self.control_plane.write_service_account_kubeconfig(
                ISTIO_NAMESPACE, account, path, create=False
            )
        args = [a for a in container.get("args", []) if a != "discovery"]
        argv = [
            *self.launcher, str(self.build.pilot_discovery), "discovery", *args,
            f"--kubeconfig={kubeconfig}",
            f"--httpsAddr={self.address}:{self.https_port}",
            f"--httpAddr={self.address}:8080",
            f"--grpcAddr={self.address}:15010",
            f"--secureGRPCAddr={self.address}:15012",
            f"--monitoringAddr={self.address}:15014",
        ]  # fmt: skip
        return argv, env

    def start(self, timeout: float = READY_TIMEOUT) -> Istiod:
        argv, env = self._argv_and_env()
        (self.folder / "cwd").mkdir(exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(  # noqa: S603 - argument list
                argv, stdout=log, stderr=log, env=env, cwd=self.folder / "cwd", start_new_session=True
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until istiod has put its CA into its webhook configuration and answers an injection
        (a server-side dry run of a pod in a namespace labelled for it)."""
        deadline = time.monotonic() + timeout
        probe_ns = f"istiod-probe-{uuid.uuid4().hex[:6]}"
        labels = {"istio.io/rev": self.revision} if self.revision else {"istio-injection": "enabled"}
        self.kubectl("create", "namespace", probe_ns)
        self.kubectl("label", "namespace", probe_ns, *[f"{k}={v}" for k, v in labels.items()])
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": probe_ns},
            # What the ServiceAccount admission plugin would set (it is off in the plain control plane);
            # Istio's projected token volume needs it.
            "spec": {
                "serviceAccountName": "default",
                "containers": [{"name": "app", "image": "registry.example/app:1"}],
            },
        }  # fmt: skip
        last = ""
        try:
            while time.monotonic() < deadline:
                if self.popen is not None and self.popen.poll() is not None:
                    raise IstiodError(f"istiod exited with {self.popen.returncode}:\n{self.logs()[-4000:]}")
                run = self.kubectl(
                    "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod), check=False
                )
                if run.returncode == 0:
                    spec = json.loads(run.stdout)["spec"]
                    # A native sidecar is an init container.
                    names = [
                        c["name"] for c in [*spec.get("initContainers", []), *spec.get("containers", [])]
                    ]
                    if "istio-proxy" in names:
                        return
                    last = f"not injected yet (containers {names})"
                else:
                    last = run.stderr.strip()[-300:]
                time.sleep(0.5)
        finally:
            self.kubectl("delete", "namespace", probe_ns, "--wait=false", check=False)
        raise IstiodError(f"istiod did not inject within {timeout:g} s ({last}):\n{self.logs()[-4000:]}")

    def stop(self) -> int | None:
        """Stop istiod and remove its folder (its kubeconfig holds a token); the exit status."""
        code = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            code = self.popen.returncode
        shutil.rmtree(self.folder, ignore_errors=True)
        return code


def start_istiod(
    control_plane: ControlPlane,
    *,
    revision: str = "",
    values: Mapping[str, str] | None = None,
    build: IstioBuild | None = None,
) -> Istiod:
    """Install Istio's base and istiod charts into ``control_plane`` and run istiod for them;
    ``values`` are ``--set`` values of the istiod chart (``pilot.cni.enabled=true`` for CNI-mode
    injection). Stop it with ``.stop()``."""
    istiod = Istiod(control_plane, build or require_build(), revision=revision, values=dict(values or {}))
    try:
        return istiod.install().start()
    except BaseException:
        istiod.stop()  # its folder, and a process if it got that far
        raise


def injected_by_istio_alone(
    control_plane: ControlPlane, pod: Mapping[str, Any], namespace: str
) -> dict[str, Any]:
    """``pod`` as the API server admits it in ``namespace`` (a server-side dry run): in a namespace
    labelled for Istio but not opted in to us, what Istio's injector alone makes of it."""
    body = {**pod, "metadata": {**pod.get("metadata", {}), "namespace": namespace}}
    run = control_plane.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body))
    found: dict[str, Any] = json.loads(run.stdout)
    return found


def istio_rules(build: IstioBuild, pod: Mapping[str, Any], kubeconfig: Path) -> dict[str, str]:
    """What Istio itself programs for ``pod`` (as stored in the cluster), as ``{"iptables": text,
    "ip6tables": text}`` (empty texts: nothing): what its istio-init applies when it has one (Istio's
    CNI plugin skips such pods), else what Istio's CNI plugin applies."""
    has_init = any(c.get("name") == "istio-init" for c in pod["spec"].get("initContainers", []))
    return istio_init_rules(build, pod) if has_init else cni_plugin_rules(build, pod, kubeconfig)


def istio_init_rules(build: IstioBuild, pod: Mapping[str, Any]) -> dict[str, str]:
    """What the pod's istio-init applies: its arguments and literal environment, through Istio's
    istio-iptables in dry-run mode (DNS servers from this machine's /etc/resolv.conf, where the
    real one reads the pod's)."""
    init = next(c for c in pod["spec"].get("initContainers", []) if c.get("name") == "istio-init")
    args = list(init.get("args", []))
    if args[:1] == ["istio-iptables"]:
        args = args[1:]
    env = {e["name"]: e["value"] for e in init.get("env", []) if "value" in e}
    return _dry_run([str(build.istio_iptables), *args, "--dry-run"], env=env, from_file=True)


def cni_plugin_rules(build: IstioBuild, pod: Mapping[str, Any], kubeconfig: Path) -> dict[str, str]:
    """What Istio's CNI plugin applies to ``pod``, which it reads from the cluster itself: its ADD,
    in dry-run mode (``hack/istio/istio-cni-rules``). Empty where the plugin leaves the pod alone."""
    meta = pod["metadata"]
    argv = [
        str(build.cni_rules),
        f"--kubeconfig={kubeconfig}",
        f"--namespace={meta['namespace']}",
        f"--name={meta['name']}",
    ]
    return _dry_run(argv, env={}, from_file=False)


def _dry_run(argv: list[str], *, env: Mapping[str, str], from_file: bool) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="ipnc-istio-rules-") as tmp:
        out = Path(tmp) / "dry-run.txt"
        out.write_text("")
        child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "DRY_RUN_FILE_PATH": str(out)}
        run = subprocess.run(argv, capture_output=True, text=True, env=child_env, timeout=60, check=False)  # noqa: S603
        if run.returncode != 0:
            raise IstiodError(f"{Path(argv[0]).name} failed ({run.returncode}): {run.stderr[-2000:]}")
        text = out.read_text() if from_file else run.stdout
    return split_families(text)


def split_families(dry_run: str) -> dict[str, str]:
    """istio-iptables' dry-run record (the commands it would run, and the restore input it would
    feed) as the restore texts per family. The record does not say which restore command a block
    was fed to; Istio restores IPv4 first and IPv6 after, one block per table each, so a block for
    a table IPv4 already has is IPv6's."""
    texts: dict[str, list[str]] = {"iptables": [], "ip6tables": []}
    tables: dict[str, set[str]] = {"iptables": set(), "ip6tables": set()}
    block: list[str] = []
    for line in dry_run.splitlines():
        if not block and not line.startswith("*"):
            continue  # a command line (iptables-save, ...), not restore input
        block.append(line)
        if line.strip() == "COMMIT":
            table = block[0][1:].strip()
            family = "iptables" if table not in tables["iptables"] else "ip6tables"
            tables[family].add(table)
            texts[family] += block
            block = []
    return {k: "\n".join(v) + ("\n" if v else "") for k, v in texts.items()}


def our_rules(pod: Mapping[str, Any], namespace: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What our agent programs for ``pod`` (as stored, after both webhooks): the ``rules``
    command's JSON output, the same spec builder and renderer the agent uses."""
    with tempfile.TemporaryDirectory(prefix="ipnc-our-rules-") as tmp:
        path = Path(tmp) / "pod.json"
        path.write_text(json.dumps(pod))
        cli = [sys.executable, "-m", "istio_pod_network_controller.cli"]
        argv = [*cli, "rules", "--output", "json", "--pod", str(path)]
        if namespace is not None:
            ns_path = Path(tmp) / "namespace.json"
            ns_path.write_text(json.dumps(namespace))
            argv += ["--namespace", str(ns_path)]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    if run.returncode != 0:
        raise IstiodError(f"rules failed ({run.returncode}): {run.stderr[-2000:]}")
    found: dict[str, str] = json.loads(run.stdout)
    return {k: found.get(k, "") for k in ("iptables", "ip6tables")}


def normalized(text: str) -> list[str]:
    """The conformance vectors' text comparison: lines, trailing spaces and blank lines dropped."""
    return [line.rstrip() for line in text.splitlines() if line.strip()]


# -- what the istiod tests (and demo) share ----------------------------------------------------------

OPT_IN_LABEL = "istio-pod-network-controller/initialize"


def chart_webhook_configuration(webhook: Any, name: str | None = None) -> dict[str, Any]:
    """Our chart's own MutatingWebhookConfiguration (its name, its entries' selectors,
    reinvocationPolicy, failurePolicy), pointed by URL at ``webhook``, a started
    ``webhookproc.WebhookProcess``; called ``name`` when given (the API server calls
    configurations in the order of their names)."""
    rendered = chart.parse(chart.template("ipnc-system", {"fullnameOverride": "ipnc"}))
    found = next(o for o in rendered if o["kind"] == "MutatingWebhookConfiguration")
    config: dict[str, Any] = copy.deepcopy(found)
    config["metadata"] = {"name": name or found["metadata"]["name"]}
    ca = base64.b64encode(webhook.pair.ca.pem).decode()
    for entry in config["webhooks"]:
        entry["clientConfig"] = {"url": webhook.url, "caBundle": ca}
    return config


def mesh_namespace(control_plane: ControlPlane, revision: str, *, opted_in: bool) -> str:
    """A new namespace labelled for istiod ``revision`` ("default": ``istio-injection=enabled``),
    and for us when ``opted_in``."""
    name = f"{revision}-{'ours' if opted_in else 'istio'}-{uuid.uuid4().hex[:6]}"
    labels = {"istio-injection": "enabled"} if revision == "default" else {"istio.io/rev": revision}
    if opted_in:
        labels[OPT_IN_LABEL] = "true"
    control_plane.kubectl("create", "namespace", name)
    control_plane.kubectl("label", "namespace", name, *[f"{k}={v}" for k, v in labels.items()])
    return name


def workload_pod(
    name: str, *, annotations: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """An application pod for Istio to inject."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": name, **(labels or {})},
            "annotations": dict(annotations or {}),
        },
        "spec": {
            # What the ServiceAccount admission plugin would set (it is off in the plain control
            # plane); Istio's projected token volume needs it.
            "serviceAccountName": "default",
            "containers": [
                {"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080}]}
            ],
        },
    }


def gateway_pod(control_plane: ControlPlane, build: IstioBuild, namespace: str) -> dict[str, Any]:
    """The pod the Deployment of Istio's gateway chart would make (no controller-manager runs in
    the plain control plane): the chart helm-installed into ``namespace``, its pod template as a
    pod, not yet created."""
    release = "gateway"  # the same in every namespace: the proxy's environment names it
    chart.helm(
        "install", release, str(build.charts / "gateway"), "-n", namespace,
        kubeconfig=control_plane.kubeconfig_path,
    )  # fmt: skip
    run = control_plane.kubectl("-n", namespace, "get", "deployment", release, "-o", "json")
    template = json.loads(run.stdout)["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": release},
        "spec": template["spec"],
    }


def resolv_conf_servers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The nameservers istio-iptables, run on this machine, reads."""
    return [
        w[1]
        for line in path.read_text().splitlines()
        if (w := line.split()) and w[0] == "nameserver" and len(w) > 1
    ]


def without_dns_servers(text: str) -> str:
    """istio-init's DNS rules with the nameservers it took from resolv.conf dropped: the node agent
    cannot read the pod's resolv.conf, so it captures all DNS, as Istio's CNI plugin does."""
    for server in resolv_conf_servers():
        text = text.replace(f" -d {server}/32", "").replace(f" -s {server}/32", "")
    return text


def start_if_built(control_plane: ControlPlane, *, log: Callable[[str], None] = print) -> Istiod | None:
    """For ``demo``: istiod injecting for ``control_plane`` when ``scripts/build-istio`` has built
    it (one line says which injection is in use), else None: the caller falls back to Istio's
    saved injection output."""
    build = find_build()
    if build is None:
        log("Istio injection: Istio's saved injection output (istiod is not built: scripts/build-istio)")
        return None
    istiod = start_istiod(control_plane, build=build)
    log(f"Istio injection: istiod {build.version}, built from the pinned module, with Istio's charts")
    return istiod
