"""The webhook as its own process (the real ``webhook`` command) behind a real API server.

For the cluster tests and ``demo``: serving certificates made here, the chart's webhook
ServiceAccount and RBAC (so the webhook runs with exactly the permissions the chart grants), the
process on a loopback port, and a MutatingWebhookConfiguration whose caBundle and URL point at
it, scoped to the namespaces the caller names.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import chart
from .controlplane import ControlPlane
from .webhook_tls import ServingPair, make_serving_pair

START_TIMEOUT = 20.0
RBAC_TIMEOUT = 10.0


def webhook_kubeconfig(control_plane: ControlPlane, namespace: str, path: Path) -> Path:
    """A kubeconfig for the chart's webhook ServiceAccount in ``namespace``, under the chart's
    RBAC (applied first), once the authorizer lets it read namespaces."""
    accounts = chart.apply_rbac(control_plane, namespace)
    deadline = time.monotonic() + RBAC_TIMEOUT
    with control_plane.client() as client:
        while not chart.can(client, namespace, accounts.webhook, "get", "namespaces"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"RBAC for {accounts.user(accounts.webhook)} not in effect")
            time.sleep(0.1)
    return control_plane.write_service_account_kubeconfig(namespace, accounts.webhook, path, create=False)


class WebhookProcess:
    """``istio-pod-network-controller webhook`` on 127.0.0.1, a free port, with its own certificate."""

    def __init__(
        self, kubeconfig: Path | None, *, extra: Sequence[str] = (), folder: Path | None = None
    ) -> None:
        self.kubeconfig, self.extra = kubeconfig, tuple(extra)
        self.folder = folder or Path(tempfile.mkdtemp(prefix="ipnc-webhook-"))
        self.pair: ServingPair = make_serving_pair()
        self.cert_file, self.key_file = self.folder / "tls.crt", self.folder / "tls.key"
        self.log_path = self.folder / "webhook.log"
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mutate"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        """The log as JSON records (a line that is not one is kept as ``{"line": ...}``)."""
        found: list[dict[str, Any]] = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            found.append(record if isinstance(record, dict) else {"line": line})
        return found

    def rss_mib(self) -> float:
        """The process's resident memory."""
        assert self.popen is not None
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts this process's certificate."""
        return ssl.create_default_context(cadata=self.pair.ca.pem.decode())

    def start(self) -> WebhookProcess:
        self.pair.write(self.cert_file, self.key_file)
        argv = [
            sys.executable, "-m", "istio_pod_network_controller.cli", "webhook",
            f"--tls-cert-file={self.cert_file}", f"--tls-private-key-file={self.key_file}",
            "--address=127.0.0.1", "--port=0", "--shutdown-grace=0",
            *([f"--kubeconfig={self.kubeconfig}"] if self.kubeconfig else ["--namespace-lookup=off"]),
            *self.extra,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=log, env=env)  # noqa: S603
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.logs().splitlines():
                record = json.loads(line) if line.startswith("{") else {}
                if record.get("msg") == "webhook serving":
                    self.port = int(str(record["address"]).rpartition(":")[2])
                    return self
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the webhook did not start:\n{self.logs()[-3000:]}")

    def stop(self) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def configuration(
        self, name: str, namespaces: Sequence[str], *, entries: Sequence[str] = ("inject",)
    ) -> dict[str, Any]:
        """A MutatingWebhookConfiguration for this process, for pods of ``namespaces`` only;
        one webhook per entry (two entries: every pod is also sent to it a second time)."""

        def webhook(entry: str) -> dict[str, Any]:
            return {
                "name": f"{entry}.pod-network-controller.istio.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 10,
                "clientConfig": {"url": self.url, "caBundle": base64.b64encode(self.pair.ca.pem).decode()},
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(namespaces)}
                    ]
                },
            }

        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [webhook(entry) for entry in entries],
        }
