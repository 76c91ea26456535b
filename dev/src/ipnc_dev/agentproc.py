"""The agent as its own process (the real ``run`` command), for tests that kill or restart it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLI = Path(sys.executable).with_name("istio-pod-network-controller")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(self, kubeconfig: Path, node: str, *, workers: int = 4, extra: tuple[str, ...] = ()) -> None:
        self.kubeconfig, self.node, self.workers, self.extra = kubeconfig, node, workers, extra
        self.port = _free_port()
        self.log = Path(tempfile.mkstemp(prefix="ipnc-agent-", suffix=".log")[1])
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(  # noqa: S603 -- our own CLI, fixed flags
                [str(CLI), "run", f"--kubeconfig={self.kubeconfig}", f"--node-name={self.node}",
                 f"--listen-address=127.0.0.1:{self.port}", f"--workers={self.workers}", *self.extra],
                stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"agent exited {self.popen.returncode}:\n{self.logs()[-3000:]}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent not ready in {timeout}s:\n{self.logs()[-3000:]}")

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric (sum over labels when it has some)."""
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name) and not line.startswith("#"):
                key = line.split(" ")[0]
                if key == name or key.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.popen is not None
        self.popen.send_signal(sig)
        return self.popen.wait(30)

    def stop(self) -> int:
        """SIGTERM, and the exit status (0 when it drained cleanly)."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        return self.kill(signal.SIGTERM)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.log.unlink(missing_ok=True)
