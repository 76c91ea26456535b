"""The mark's hand-off in real network namespaces: the agent's listener is reachable from inside
the pod's namespace only, the real waiter (the CLI, as an unprivileged user inside the namespace)
takes a mark handed over there without its file ever changing, refuses one for another namespace,
and a name taken inside the pod leaves the file to decide."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from ipnc_dev.netlab import Netlab
from ipnc_dev.podinfo_volume import write_podinfo
from istio_pod_network_controller import names
from istio_pod_network_controller.handoff import ADDRESS
from istio_pod_network_controller.node.handoff import MAX_CONNECTIONS, Handoffs, listen_in
from istio_pod_network_controller.node.netns import Netns, netns_cookie

CLI = str(Path(sys.executable).with_name("istio-pod-network-controller"))
WAITER_USER = "65532"

CONNECT = f"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({ADDRESS!r})
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
s.settimeout(10)
data = b""
while chunk := s.recv(65536):
    data += chunk
print("got", data.decode())
"""

SQUAT = f"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({ADDRESS!r}); s.listen(1)
print("bound", flush=True)
time.sleep(30)
"""


def inside(path: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={path}", *argv]


def waiter(path: str, podinfo: Path, timeout: float) -> subprocess.Popen[str]:
    """The waiter CLI inside ``path``'s namespace, as a non-root user without capabilities."""
    drop = [
        "setpriv",
        f"--reuid={WAITER_USER}",
        f"--regid={WAITER_USER}",
        "--clear-groups",
        "--inh-caps=-all",
    ]
    argv = [*drop, sys.executable, CLI, "init", "--file", str(podinfo / names.PODINFO_ANNOTATIONS)]
    return subprocess.Popen(  # noqa: S603 -- fixed argv
        inside(path, *argv, "--timeout", f"{timeout:g}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def podinfo_dir(tmp_path: Path, annotations: dict[str, str]) -> Path:
    folder = tmp_path / "podinfo"
    write_podinfo(folder, annotations)
    tmp_path.chmod(0o755)
    for item in [folder, *folder.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return folder


def mark_for(ns: Netns, cookie: int | None) -> str:
    detail: dict[str, object] = {"netnsInode": ns.inode, "rulesetSha256": "ab" * 32, "mode": "iptables"}
    if cookie is not None:
        detail["netnsCookie"] = cookie
    return json.dumps(detail)


def test_the_listener_answers_inside_its_namespace_only(lab: Netlab) -> None:
    pod, other = lab.add_netns("pod"), lab.add_netns("other")
    with Netns(pod) as ns:
        opened = listen_in(ns)
        assert opened.listener is not None, opened.why
        assert opened.cookie == netns_cookie(ns)
        results: list[str] = []

        async def scenario() -> tuple[str, str]:
            handoffs = Handoffs(on_result=results.append)
            handoffs.open("uid-1", ns.id, opened)
            elsewhere = await asyncio.to_thread(
                subprocess.run, inside(other, sys.executable, "-c", CONNECT), capture_output=True, text=True
            )
            # Connected before the mark is ready: held until it is.
            here = subprocess.Popen(  # noqa: S603 -- fixed argv
                inside(pod, sys.executable, "-c", CONNECT), stdout=subprocess.PIPE, text=True
            )
            await asyncio.sleep(0.3)
            assert here.poll() is None
            assert handoffs.ready("uid-1", names.STATUS_INITIALIZED, '{"netnsInode": 1}')
            out, _ = await asyncio.to_thread(here.communicate, timeout=10)
            handoffs.close("uid-1", "waiter_done")
            return elsewhere.stdout, out

        elsewhere, here_out = asyncio.run(scenario())
    assert elsewhere.startswith("refused"), elsewhere
    assert here_out.startswith("got "), here_out
    assert json.loads(here_out[4:]) == {"status": "initialized", "detail": '{"netnsInode": 1}'}
    assert results == ["served"]


def test_the_waiter_takes_the_mark_handed_over_while_its_file_says_nothing(
    lab: Netlab, tmp_path: Path
) -> None:
    pod = lab.add_netns("pod")
    podinfo = podinfo_dir(tmp_path, {})
    with Netns(pod) as ns:
        opened = listen_in(ns)
        assert opened.listener is not None, opened.why

        async def scenario() -> tuple[int, str, str, float]:
            handoffs = Handoffs()
            handoffs.open("uid-1", ns.id, opened)
            started = time.monotonic()
            proc = waiter(pod, podinfo, timeout=20)
            await asyncio.sleep(0.5)
            assert proc.poll() is None, proc.communicate()
            handoffs.ready("uid-1", names.STATUS_INITIALIZED, mark_for(ns, opened.cookie))
            out, err = await asyncio.to_thread(proc.communicate, timeout=20)
            handoffs.close_all()
            return proc.returncode, out, err, time.monotonic() - started

        code, out, err, took = asyncio.run(scenario())
    assert code == 0, (out, err)
    assert f"pod initialized for network namespace {ns.inode}, mark handed over by the agent" in out, out
    assert took < 15  # far inside the waiter's timeout: the file never changed


def test_a_mark_for_another_namespace_is_not_taken(lab: Netlab, tmp_path: Path) -> None:
    pod = lab.add_netns("pod")
    podinfo = podinfo_dir(tmp_path, {})
    with Netns(pod) as ns:
        opened = listen_in(ns)
        assert opened.listener is not None and opened.cookie is not None, opened.why

        async def scenario() -> tuple[int, str, str]:
            handoffs = Handoffs()
            handoffs.open("uid-1", ns.id, opened)
            proc = waiter(pod, podinfo, timeout=2)
            assert opened.cookie is not None
            handoffs.ready("uid-1", names.STATUS_INITIALIZED, mark_for(ns, opened.cookie + 1))
            out, err = await asyncio.to_thread(proc.communicate, timeout=20)
            handoffs.close_all()
            return proc.returncode, out, err

        code, out, err = asyncio.run(scenario())
    assert code == 1, (out, err)
    assert "timed out" in out + err
    assert "ignored: the agent's hand-off" in err and "cookie is not ours" in err, err


def test_a_name_taken_inside_the_pod_leaves_the_file_to_decide(lab: Netlab) -> None:
    pod = lab.add_netns("pod")
    squatter = subprocess.Popen(  # noqa: S603 -- fixed argv
        inside(pod, sys.executable, "-c", SQUAT), stdout=subprocess.PIPE, text=True
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "bound"
        with Netns(pod) as ns:
            opened = listen_in(ns)
            results: list[str] = []

            async def scenario() -> None:
                handoffs = Handoffs(on_result=results.append)
                handoffs.open("uid-1", ns.id, opened)
                assert len(handoffs) == 0
                assert not handoffs.ready("uid-1", names.STATUS_INITIALIZED, "{}")

            asyncio.run(scenario())
        assert opened.listener is None and "in use" in opened.why, opened
        assert opened.cookie is not None
        assert results == ["unavailable"]
    finally:
        squatter.kill()
        squatter.wait()


def test_a_flood_of_connections_is_taken_up_to_the_bound_only(lab: Netlab) -> None:
    count = 12
    pod = lab.add_netns("pod")
    flood = f"""
import socket
held, refused = [], 0
for _ in range({count}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect({ADDRESS!r}); held.append(s)
    except OSError:
        refused += 1
import time; time.sleep(1.0)
got = 0
for s in held:
    s.setblocking(True); s.settimeout(5)
    try:
        got += bool(s.recv(65536))
    except OSError:
        pass
print(len(held), refused, got)
"""
    with Netns(pod) as ns:
        opened = listen_in(ns)
        assert opened.listener is not None

        async def scenario() -> str:
            handoffs = Handoffs()
            handoffs.open("uid-1", ns.id, opened)
            proc = subprocess.Popen(  # noqa: S603 -- fixed argv
                inside(pod, sys.executable, "-c", flood), stdout=subprocess.PIPE, text=True
            )
            await asyncio.sleep(0.5)
            handoffs.ready("uid-1", names.STATUS_INITIALIZED, "{}")
            out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
            handoffs.close_all()
            return out

        held, refused, got = (int(x) for x in asyncio.run(scenario()).split())
    # Connections beyond the ones taken sit in the backlog, then are dropped when the listener
    # closes: whatever the flood, the agent sends the mark at most MAX_CONNECTIONS times.
    assert got == MAX_CONNECTIONS, (held, refused, got)
