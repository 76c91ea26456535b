"""`webhook` as a process: flags and environment, start-up errors, serving, SIGTERM."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ipnc_dev.webhook_tls import make_serving_pair


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
        (["--max-connections", "0"], "a whole number above 0"),
        (["--max-request-bytes", "1.5"], "a whole number above 0"),
        (["--read-timeout", "0"], "more than 0"),
        (["--idle-timeout", "-1"], "not a number of seconds"),
        (["--tls-handshake-timeout", "soon"], "not a number of seconds"),
        (["--request-timeout", "0"], "more than 0"),
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


def test_a_bad_limit_in_the_environment_is_named() -> None:
    done = _run(env={"IPNC_WEBHOOK_MAX_CONNECTIONS": "many"})
    assert done.returncode == 2
    assert "a whole number above 0: 'many'" in done.stderr


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


def _lower_open_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def test_limits_come_from_the_environment_and_the_open_files_limit_is_raised(tmp_path: Path) -> None:
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
        "IPNC_WEBHOOK_MAX_CONNECTIONS": "7",
        "IPNC_WEBHOOK_READ_TIMEOUT": "0.5",
    }
    argv = [sys.executable, "-m", "istio_pod_network_controller.cli", "webhook"]
    proc = subprocess.Popen(  # noqa: S603 - argument list
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, preexec_fn=_lower_open_files
    )
    try:
        assert proc.stderr is not None
        record = json.loads(proc.stderr.readline())
        assert record["msg"] == "webhook serving", record
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert record["openFiles"] > 256
        assert hard == resource.RLIM_INFINITY or record["openFiles"] == hard
        assert record["maxConnections"] == 7
        port = int(record["address"].rpartition(":")[2])
        ctx = ssl.create_default_context(cadata=pair.ca.pem.decode())
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            started = time.monotonic()
            assert tls.recv(1) == b""  # closed: nothing was sent within the read timeout
            assert 0.45 <= time.monotonic() - started < 10
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
