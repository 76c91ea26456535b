"""`webhook` as a process: flags and environment, start-up errors, serving, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from istio_pod_network_controller.testing.webhook_tls import make_serving_pair


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "istio_pod_network_controller.cli", "webhook", *args]
    return subprocess.Popen(  # noqa: S603 - argument list
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = _start(*args, env=env)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "--tls-cert-file is required"),
        (["--tls-cert-file", "c", "--tls-private-key-file", "k"], "--waiter-image is required"),
        (["--port", "70000"], "not a port"),
        (["--waiter-run-as-user", "0"], "a UID above 0"),
        (["--waiter-timeout", "0"], "more than 0"),
        (["--namespace-lookup", "maybe"], "invalid choice"),
    ],
)
def test_invalid_flags_exit_2_with_one_line(args: list[str], complaint: str) -> None:
    done = _run(*args, env={"IPNC_TLS_CERT_FILE": "", "IPNC_WAITER_IMAGE": ""})
    assert done.returncode == 2
    assert complaint in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_bad_environment_value_is_named() -> None:
    done = _run(env={"IPNC_WEBHOOK_PORT": "http"})
    assert done.returncode == 2
    assert "not a port: 'http'" in done.stderr


def test_unreadable_certificates_fail_start_up(tmp_path: Path) -> None:
    done = _run(
        "--tls-cert-file", str(tmp_path / "missing.crt"), "--tls-private-key-file", str(tmp_path / "k"),
        "--waiter-image", "i", "--namespace-lookup", "off",
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot start" in done.stderr and "missing.crt" in done.stderr


def test_serves_from_environment_settings_and_stops_on_sigterm(tmp_path: Path) -> None:
    pair = make_serving_pair()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pair.write(cert, key)
    env = {
        "IPNC_TLS_CERT_FILE": str(cert),
        "IPNC_TLS_PRIVATE_KEY_FILE": str(key),
        "IPNC_WAITER_IMAGE": "registry.example/ipnc:1",
        "IPNC_WEBHOOK_ADDRESS": "127.0.0.1",
        "IPNC_WEBHOOK_PORT": "0",
        "IPNC_NAMESPACE_LOOKUP": "off",
        "IPNC_SHUTDOWN_GRACE": "0",
    }
    proc = _start(env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        record = json.loads(line)
        assert record["msg"] == "webhook serving", line
        port = int(record["address"].rpartition(":")[2])
        ctx = ssl.create_default_context(cadata=pair.ca.pem.decode())
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=ctx, timeout=5) as answer:
            assert answer.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
