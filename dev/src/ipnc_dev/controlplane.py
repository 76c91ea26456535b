"""A real Kubernetes control plane on loopback: etcd and kube-apiserver, nothing else.

The agent, the waiter, the webhook and the chart all talk to the Kubernetes API, and what they
depend on -- watch semantics, resourceVersions, field selectors, patch types, RBAC, PodSecurity and
webhook admission -- is exactly what a fake would get wrong. So the cluster tests (and ``dev
cluster``, for a person) run the real programs the way controller-runtime's envtest does: no
kubelet, scheduler or controller-manager (the node stand-in plays the kubelet's part).

What it sets up, in a private temporary folder that is removed again on exit:

* certificates made here (``cryptography``): a CA, the API server's serving certificate, an admin
  client certificate in ``system:masters``, and the service-account signing key pair, so that
  ServiceAccount tokens can be requested (TokenRequest) and components run under their real RBAC;
* etcd, plain HTTP on a free loopback port (loopback only, throw-away data, no fsync);
* kube-apiserver on a free loopback port: authorization ``Node,RBAC``; PodSecurity and the
  admission webhooks enabled as in a real cluster; the ServiceAccount admission plugin disabled
  (without a controller-manager no namespace has its ``default`` ServiceAccount, and that plugin
  would reject every pod for it);
* an admin kubeconfig.

Start-up waits for ``/readyz`` and records how long it took (``ready_seconds``). If anything fails,
both processes are stopped, the folder is removed, and the error carries the tail of both logs.
The child processes also get ``PR_SET_PDEATHSIG`` so that they die with the process that started
them even if it is killed outright (start the control plane from a thread that outlives it, e.g.
the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import Client, KubeConfig

from . import binaries

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "ipnc-admin"
LOG_TAIL_LINES = 40

_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (the message carries the tail of both logs)."""


# --------------------------------------------------------------------------------------------
# certificates


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files the control plane and its clients use."""

    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_signing_key: Path
    sa_public_key: Path


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.CertificateBuilder:
    """A week-long certificate for ``key``: a CA (signs certificates and CRLs) or a leaf (signs)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    builder = _builder(subject, issuer, key, ca=False).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> Certificates:
    """Create a CA, the API server's serving certificate, an admin client certificate in
    ``system:masters`` and a service-account signing key pair, as PEM files in ``folder``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipnc-test-ca")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    serving_key = ec.generate_private_key(ec.SECP256R1())
    dns_names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
    ]
    serving_cert = _issue(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        key=serving_key,
        issuer=ca_name,
        issuer_key=ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin_cert = _issue(
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
            ]
        ),
        key=admin_key,
        issuer=ca_name,
        issuer_key=ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_pub = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    folder.mkdir(parents=True, exist_ok=True)
    return Certificates(
        ca_cert=_write(folder / "ca.crt", _cert_pem(ca_cert)),
        serving_cert=_write(folder / "apiserver.crt", _cert_pem(serving_cert)),
        serving_key=_write(folder / "apiserver.key", _key_pem(serving_key)),
        admin_cert=_write(folder / "admin.crt", _cert_pem(admin_cert)),
        admin_key=_write(folder / "admin.key", _key_pem(admin_key)),
        sa_signing_key=_write(folder / "sa.key", _key_pem(sa_key)),
        sa_public_key=_write(folder / "sa.pub", sa_pub),
    )


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class _Process:
    """One child process with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")  # append: a restarted server keeps the earlier log
        try:
            self.popen = subprocess.Popen(  # noqa: S603 - argument list of a binary we built
                self.argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop them in order
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            self._log.close()
            raise

    def exited(self) -> int | None:
        return self.popen.poll()

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


# --------------------------------------------------------------------------------------------
# the control plane


def _kubeconfig_dict(server: str, ca_cert: Path, user: Mapping[str, str], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca_cert)}}],
        "users": [{"name": name, "user": dict(user)}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    }


def _write_kubeconfig(path: Path, conf: Mapping[str, Any]) -> Path:
    return _write(path, yaml.safe_dump(dict(conf), sort_keys=False).encode())


class ControlPlane:
    """A running etcd + kube-apiserver pair; use as a context manager::

    with ControlPlane.start() as cp:
        client = cp.client()
        token = cp.service_account_token("ns", "agent")
    """

    def __init__(self, workdir: Path, *, keep_workdir: bool = False) -> None:
        self.workdir = workdir
        self.keep_workdir = keep_workdir
        self.etcd_url = ""
        self.server = ""
        self.kubeconfig_path = workdir / "kubeconfig"
        self.certs: Certificates | None = None
        self.ready_seconds = 0.0
        self.timings: dict[str, float] = {}
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._kubectl: Path | None = None
        self._stopped = False

    # -- start / stop ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        binary_paths: Mapping[str, Path] | None = None,
        ready_timeout: float = 90.0,
        workdir_parent: Path | None = None,
        keep_workdir: bool = False,
        extra_apiserver_args: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
        attempts: int = 3,
        service_account_admission: bool = False,
        kubelet_client: bool = False,
    ) -> ControlPlane:
        """Start etcd and kube-apiserver and wait until the API server is ready.

        ``binary_paths`` overrides where etcd/kube-apiserver/kubectl are (default: ``binaries``).
        ``log`` receives progress lines (default: stderr). A start that fails because a port
        picked as free was taken meanwhile is retried, up to ``attempts`` times in all.

        For a cluster with real nodes (``ipnc_dev.realnode``): ``service_account_admission``
        keeps the ServiceAccount admission plugin on (a controller-manager creates the ``default``
        ServiceAccounts, and pods then get their token volume), and ``kubelet_client`` makes the
        API server authenticate to kubelets with the admin certificate (kubelets refuse anonymous
        logs and exec); its files exist only once the folder does, so no extra argument can name
        them. Flags in ``extra_apiserver_args`` come last: a repeated plain flag overrides an
        earlier one (``--advertise-address``), a repeated list flag appends to it.
        """
        say = log if log is not None else _stderr
        paths = dict(binary_paths) if binary_paths else binaries.find_all(binaries.KUBE_BINARIES)
        for attempt in range(1, attempts + 1):
            workdir = Path(tempfile.mkdtemp(prefix="ipnc-controlplane-", dir=workdir_parent))
            cp = cls(workdir, keep_workdir=keep_workdir)
            try:
                cp._start(
                    paths,
                    ready_timeout,
                    extra_apiserver_args,
                    say,
                    service_account_admission=service_account_admission,
                    kubelet_client=kubelet_client,
                )
                return cp
            except _PortTaken as e:
                cp.stop()
                if attempt == attempts:
                    raise ControlPlaneError(str(e)) from None
                say(f"control plane: {e}; retrying with other ports")
            except BaseException:
                cp.stop()
                raise
        raise AssertionError("unreachable")

    def _start(
        self,
        paths: Mapping[str, Path],
        ready_timeout: float,
        extra_apiserver_args: Sequence[str],
        say: Callable[[str], None],
        *,
        service_account_admission: bool = False,
        kubelet_client: bool = False,
    ) -> None:
        t0 = time.monotonic()
        self._kubectl = paths.get("kubectl")
        self.certs = certs = make_certificates(self.workdir / "pki")
        self.timings["certificates"] = time.monotonic() - t0

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.server = f"https://127.0.0.1:{api_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = self.workdir / "etcd"
        data_dir.mkdir(mode=0o700)
        self._etcd = _Process(
            "etcd",
            [
                str(paths["etcd"]),
                "--name=default",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            self.workdir / "etcd.log",
            self.workdir,
        )
        deadline = t0 + ready_timeout
        self._wait_etcd(deadline)
        self.timings["etcd"] = time.monotonic() - t0

        self._apiserver_argv = [
            str(paths["kube-apiserver"]),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={certs.serving_cert}",
            f"--tls-private-key-file={certs.serving_key}",
            f"--client-ca-file={certs.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={certs.sa_public_key}",
            f"--service-account-signing-key-file={certs.sa_signing_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=PodSecurity,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            *([] if service_account_admission else ["--disable-admission-plugins=ServiceAccount"]),
            "--allow-privileged=true",
            "--profiling=false",
            *(
                [
                    f"--kubelet-client-certificate={certs.admin_cert}",
                    f"--kubelet-client-key={certs.admin_key}",
                ]
                if kubelet_client
                else []
            ),
            *extra_apiserver_args,
        ]
        self._apiserver = _Process(
            "kube-apiserver", self._apiserver_argv, self.workdir / "kube-apiserver.log", self.workdir
        )
        _write_kubeconfig(
            self.kubeconfig_path,
            _kubeconfig_dict(
                self.server,
                certs.ca_cert,
                {"client-certificate": str(certs.admin_cert), "client-key": str(certs.admin_key)},
                "ipnc-test",
            ),
        )
        self._wait_apiserver(deadline)
        self.ready_seconds = time.monotonic() - t0
        self.timings["kube-apiserver"] = self.ready_seconds
        say(
            f"control plane ready in {self.ready_seconds:.1f} s "
            f"(certificates {self.timings['certificates']:.1f} s, etcd {self.timings['etcd']:.1f} s); "
            f"kubeconfig: {self.kubeconfig_path}"
        )

    def _check_running(self, proc: _Process) -> None:
        code = proc.exited()
        if code is None:
            return
        log = tail(proc.log_path)
        if "address already in use" in log:
            raise _PortTaken(f"{proc.name} could not bind its port")
        raise ControlPlaneError(self._failure(f"{proc.name} exited with status {code} while starting"))

    def _failure(self, what: str) -> str:
        parts = [what]
        for proc in (self._etcd, self._apiserver):
            if proc is not None:
                parts.append(f"--- last lines of {proc.name}'s log ({proc.log_path.name}) ---")
                parts.append(tail(proc.log_path) or "(empty)")
        return "\n".join(parts)

    def _wait_etcd(self, deadline: float) -> None:
        assert self._etcd is not None
        while True:
            self._check_running(self._etcd)
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(self._failure("etcd did not become healthy in time"))
            time.sleep(0.05)

    def _wait_apiserver(self, deadline: float) -> None:
        assert self._apiserver is not None
        ctx = self.ssl_context()
        last = ""
        while True:
            self._check_running(self._apiserver)
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = e.read().decode("utf-8", "replace")
            except OSError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    self._failure(f"kube-apiserver was not ready in time; last /readyz answer:\n{last}")
                )
            time.sleep(0.1)

    def restart_apiserver(self, *, down_seconds: float = 0.0, ready_timeout: float = 60.0) -> None:
        """Stop kube-apiserver (SIGTERM), wait ``down_seconds``, start it again on the same port
        and wait until it is ready: clients see their watches break and must reconnect.

        Call it from the thread that started the control plane (in tests: the main thread): the
        server is killed when the thread that started it ends (PR_SET_PDEATHSIG is per thread)."""
        assert self._apiserver is not None, "not started"
        self._apiserver.stop()
        time.sleep(down_seconds)
        self._apiserver = _Process(
            "kube-apiserver", self._apiserver_argv, self.workdir / "kube-apiserver.log", self.workdir
        )
        self._wait_apiserver(time.monotonic() + ready_timeout)

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd, and remove the temporary folder. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                proc.stop()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """Process ids of etcd and kube-apiserver (for tests of the harness itself)."""
        return [p.popen.pid for p in (self._etcd, self._apiserver) if p is not None]

    def exit_codes(self) -> dict[str, int | None]:
        """Each process's exit status, or None while it runs."""
        return {p.name: p.exited() for p in (self._etcd, self._apiserver) if p is not None}

    def logs(self) -> dict[str, str]:
        """The tails of both logs, by process name."""
        return {p.name: tail(p.log_path) for p in (self._etcd, self._apiserver) if p is not None}

    # -- clients -----------------------------------------------------------------------------

    def _certs(self) -> Certificates:
        if self.certs is None:
            raise ControlPlaneError("control plane not started")
        return self.certs

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context that trusts the API server and authenticates as the admin."""
        certs = self._certs()
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        ctx.load_cert_chain(str(certs.admin_cert), str(certs.admin_key))
        return ctx

    @property
    def admin_client_config(self) -> KubeConfig:
        """The admin kubeconfig (``system:masters``) as a lightkube ``KubeConfig``."""
        return KubeConfig.from_file(self.kubeconfig_path)

    def client(self, config: KubeConfig | None = None, **kwargs: Any) -> Client:
        """A lightkube client; the admin's unless ``config`` is given."""
        return Client(config or self.admin_client_config, trust_env=False, **kwargs)

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int = 3600,
        create: bool = True,
    ) -> str:
        """A bearer token for ServiceAccount ``namespace/name`` (TokenRequest). The namespace and
        the ServiceAccount are created first when ``create`` is true and they do not exist."""
        from lightkube import ApiError
        from lightkube.models.authentication_v1 import TokenRequestSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Namespace, ServiceAccount, ServiceAccountToken

        with self.client() as client:
            if create:
                for obj in (
                    Namespace(metadata=ObjectMeta(name=namespace)),
                    ServiceAccount(metadata=ObjectMeta(name=name, namespace=namespace)),
                ):
                    try:
                        client.create(obj)
                    except ApiError as e:
                        if e.status.code != 409:
                            raise
            spec = TokenRequestSpec(audiences=list(audiences), expirationSeconds=expiration_seconds)
            request = ServiceAccountToken(metadata=ObjectMeta(name=name, namespace=namespace), spec=spec)
            result = client.create(request, name, namespace=namespace)
            if result.status is None or not result.status.token:
                raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
            return str(result.status.token)

    def kubeconfig_for_token(self, token: str, path: Path, *, name: str = "ipnc-test") -> Path:
        """Write a kubeconfig that authenticates with ``token``; returns ``path``."""
        return _write_kubeconfig(
            path, _kubeconfig_dict(self.server, self._certs().ca_cert, {"token": token}, name)
        )

    def write_service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, *, create: bool = True
    ) -> Path:
        """Write a kubeconfig for ServiceAccount ``namespace/name`` (in the control plane's
        folder unless ``path`` is given) and return its path."""
        token = self.service_account_token(namespace, name, create=create)
        path = path or self.workdir / f"kubeconfig-sa-{namespace}-{name}"
        return self.kubeconfig_for_token(token, path, name=f"{namespace}-{name}")

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the test kubectl against this control plane (admin unless ``kubeconfig``); its
        discovery cache in this control plane's folder, unless ``args`` name one (never ~/.kube)."""
        kubectl = self._kubectl or binaries.find("kubectl")
        argv = [str(kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig_path}"]
        if not any(a.startswith("--cache-dir") for a in args):
            argv.append(f"--cache-dir={self.workdir / 'kube-cache'}")
        argv += args
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return subprocess.run(  # noqa: S603 - argument list
            argv, input=input, capture_output=True, text=True, check=check, timeout=timeout, env=env
        )


class _PortTaken(Exception):
    pass


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[ControlPlane]:
    """``with running() as cp:`` -- the same as ``with ControlPlane.start(**kwargs) as cp:``."""
    cp = ControlPlane.start(**kwargs)
    try:
        yield cp
    finally:
        cp.stop()
