"""A throwaway network of real namespaces for kernel tests, cluster tests and the demo.

One "node" namespace holds a bridge; each "pod" namespace is joined to it by a veth pair, with
an IPv4 and optionally an IPv6 address and default routes via the bridge. The node namespace
has no uplink, so no packet of a test ever reaches the real host or beyond. Every namespace,
link and process created here is removed by ``close()`` (also on failure: use it as a context
manager), and names carry a random prefix so concurrent runs do not collide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

NETNS_DIR = Path("/run/netns")
APP_UID = 1000
PROXY_UID = 1337


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod-like namespace on the lab's bridge."""

    name: str  # the `ip netns` name
    ipv4: str
    ipv6: str | None

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def ips(self) -> list[str]:
        return [self.ipv4] + ([self.ipv6] if self.ipv6 else [])


class Process:
    """A child process the lab started; stopped by the lab at close."""

    def __init__(self, popen: subprocess.Popen[str], what: str) -> None:
        self.popen, self.what = popen, what
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def read_line(self, timeout: float = 10) -> str:
        """The child's next stdout line, or RuntimeError if it does not come in time."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._stdout().readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            err = ""
            if self.popen.poll() is not None and self.popen.stderr is not None:
                err = self.popen.stderr.read()
            raise RuntimeError(f"{self.what}: no output within {timeout}s {err.strip()}")
        return box[0]

    def _stdout(self) -> IO[str]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(3)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Probe(Process):
    """A client in one or more namespaces, creating its sockets as one UID (see probe)."""

    def request(self, **request: object) -> dict[str, object]:
        with self._lock:
            assert self.popen.stdin is not None
            self.popen.stdin.write(json.dumps(request) + "\n")
            self.popen.stdin.flush()
            timeout = float(str(request.get("timeout", 3))) + 10
            answer: dict[str, object] = json.loads(self.read_line(timeout))
            return answer

    def tcp(
        self, host: str, port: int, *, ns: int = 0, timeout: float = 3, source: str | None = None
    ) -> dict[str, object]:
        """Connect, send a random token, return the reply (``{"ok": ..., "reply": {...}}``)."""
        token = secrets.token_hex(8)
        answer = self.request(
            op="tcp", host=host, port=port, ns=ns, timeout=timeout, token=token, source=source
        )
        _check_token(answer, token)
        return answer

    def udp(self, host: str, port: int, *, ns: int = 0, timeout: float = 3) -> dict[str, object]:
        token = secrets.token_hex(8)
        answer = self.request(op="udp", host=host, port=port, ns=ns, timeout=timeout, token=token)
        _check_token(answer, token)
        return answer


def _check_token(answer: dict[str, object], token: str) -> None:
    """A reply must echo our random token: a server that just happens to be there cannot fake it."""
    reply = answer.get("reply")
    if answer.get("ok") and isinstance(reply, dict) and reply.get("token") != token:
        answer["ok"] = False
        answer["error"] = f"reply carried token {reply.get('token')!r}, not ours"


def _python_module(module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", f"ipnc_dev.{module}", *args]


@dataclass
class Netlab:
    """See the module docstring. ``subnet`` must be private to the lab (it never leaves it)."""

    subnet4: str = "10.250.0.0/24"
    subnet6: str = "fd00:ab:cd::/64"
    prefix: str = field(default_factory=lambda: "ipnc" + secrets.token_hex(3))
    pods: list[Pod] = field(default_factory=list)
    _processes: list[Process] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _started: bool = False

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    @property
    def bridge_ipv4(self) -> str:
        return str(ipaddress.ip_network(self.subnet4)[1])

    @property
    def bridge_ipv6(self) -> str:
        return str(ipaddress.ip_network(self.subnet6)[1])

    def __enter__(self) -> Netlab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        self._add_netns(self.node)
        net4, net6 = ipaddress.ip_network(self.subnet4), ipaddress.ip_network(self.subnet6)
        _ip("link", "add", "br0", "type", "bridge", netns=self.node)
        _ip("addr", "add", f"{self.bridge_ipv4}/{net4.prefixlen}", "dev", "br0", netns=self.node)
        _ip("addr", "add", f"{self.bridge_ipv6}/{net6.prefixlen}", "dev", "br0", "nodad", netns=self.node)
        _ip("link", "set", "br0", "up", netns=self.node)
        self._started = True

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def add_netns(self, suffix: str) -> str:
        """A bare namespace (lo up, no links) removed at close; returns its path."""
        name = f"{self.prefix}-{suffix}"
        self._add_netns(name)
        return str(NETNS_DIR / name)

    def add_isolated(self, suffix: str, address: str) -> str:
        """A namespace whose ``eth0`` (a veth pair with both ends inside) holds ``address`` (CIDR),
        with a default route through it: enough for outbound connects to be routed, and so
        redirected, while nothing can leave the namespace.
        Cheaper than a pod on the bridge when many namespaces are needed. Returns its path."""
        path = self.add_netns(suffix)
        script = "link add eth0 type veth peer name eth0p\nlink set eth0p up\n"
        script += f"addr add {address} dev eth0\nlink set eth0 up\nroute add default dev eth0\n"
        done = subprocess.run(  # noqa: S603 -- fixed argv; the script is built from our own values
            ["ip", "-n", Path(path).name, "-batch", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ip -batch in {path}: {done.stderr.strip()}")
        return path

    def add_pod(self, suffix: str, *, ipv6: bool = True) -> Pod:
        """A pod namespace on the bridge, addressed from the lab's subnets."""
        index = len(self.pods) + 2
        net4, net6 = ipaddress.ip_network(self.subnet4), ipaddress.ip_network(self.subnet6)
        pod = Pod(f"{self.prefix}-{suffix}", str(net4[index]), str(net6[index]) if ipv6 else None)
        self._add_netns(pod.name)
        veth = f"v{self.prefix[4:]}{index}"
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.name, netns=self.node)
        _ip("link", "set", veth, "master", "br0", "up", netns=self.node)
        _ip("addr", "add", f"{pod.ipv4}/{net4.prefixlen}", "dev", "eth0", netns=pod.name)
        if pod.ipv6:
            _ip("addr", "add", f"{pod.ipv6}/{net6.prefixlen}", "dev", "eth0", "nodad", netns=pod.name)
        _ip("link", "set", "eth0", "up", netns=pod.name)
        _ip("route", "add", "default", "via", self.bridge_ipv4, netns=pod.name)
        if pod.ipv6:
            _ip("-6", "route", "add", "default", "via", self.bridge_ipv6, netns=pod.name)
        self.pods.append(pod)
        return pod

    def remove_netns(self, path_or_name: str) -> None:
        """Delete one of the lab's namespaces now (as a vanishing sandbox would)."""
        name = Path(path_or_name).name
        _ip("netns", "del", name, check=False)
        if name in self._namespaces:
            self._namespaces.remove(name)

    def spawn(self, argv: Sequence[str], *, what: str, stdin: bool = False) -> Process:
        popen = subprocess.Popen(  # noqa: S603 -- argv lists built by this module
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = Process(popen, what)
        self._processes.append(proc)
        return proc

    def stub_proxy(
        self,
        netns: Sequence[str],
        *,
        name: str = "proxy",
        tcp: Sequence[int] = (15001, 15006),
        udp: Sequence[int] = (),
        transparent: Sequence[int] = (),
        user: int | None = PROXY_UID,
    ) -> Process:
        """Listeners in each namespace of ``netns`` (paths), run as ``user`` once bound."""
        args = [f"--name={name}"] + [f"--netns={p}" for p in netns]
        args += [f"--tcp={p}" for p in tcp] + [f"--udp={p}" for p in udp]
        args += [f"--transparent={p}" for p in transparent]
        if user is not None:
            args.append(f"--user={user}")
        proc = self.spawn(_python_module("stubproxy", args), what=f"stub {name}", stdin=True)
        line = proc.read_line(20)
        if line.strip() != "ready":
            raise RuntimeError(f"stub {name} did not start: {line!r}")
        return proc

    def probe(self, netns: Sequence[str], *, user: int | None = APP_UID) -> Probe:
        """A client in ``netns`` (one path when ``user`` is set), creating sockets as ``user``."""
        args = [f"--netns={p}" for p in netns] + ([f"--user={user}"] if user is not None else [])
        proc = self.spawn(_python_module("probe", args), what="probe", stdin=True)
        probe = Probe(proc.popen, f"probe in {list(netns)} as {user}")
        self._processes[-1] = probe
        ready = json.loads(probe.read_line(20))
        if not ready.get("ready"):
            raise RuntimeError(f"probe did not start: {ready}")
        return probe

    def sleeper(self, netns: str | None) -> Process:
        """A ``sleep`` process in ``netns`` (a path; None: this one), e.g. a fake pod's pause."""
        argv = ["nsenter", f"--net={netns}", "sleep", "3600"] if netns else ["sleep", "3600"]
        proc = self.spawn(argv, what="sleeper")
        if netns:
            want, deadline = os.stat(netns).st_ino, time.monotonic() + 10
            while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != want:
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sleeper did not enter {netns}")
                time.sleep(0.001)
        return proc

    def close(self) -> None:
        for proc in reversed(self._processes):
            with contextlib.suppress(Exception):
                proc.stop()
        self._processes.clear()
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()


def namespaces_with_prefix(prefix: str) -> list[str]:
    """Names of the `ip netns` namespaces that start with ``prefix`` (for leak checks)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
