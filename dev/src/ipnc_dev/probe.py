"""A client that stands in for a pod's application (or its proxy) and makes connections on request.

Tests drive it over stdin/stdout, one JSON object per line, so one long-lived process per role
and namespace answers many probes quickly, every socket created with the role's UID: that UID
is what the redirect rules match on. Started as root, it enters its namespaces, then drops.

    python -m ipnc_dev.probe [--netns PATH ...] [--user 1000[:1000]]

request  {"op": "tcp"|"udp", "host": "192.0.2.1", "port": 80, "token": "x", "ns": 0,
          "timeout": 3, "source": "127.0.0.6"}
reply    {"ok": true, "reply": {...the server's report...}} or {"ok": false, "error": "..."}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _exchange(request: dict[str, object]) -> dict[str, object]:
    host = str(request["host"])
    port = int(str(request["port"]))
    token = str(request.get("token", ""))
    timeout = float(str(request.get("timeout", 3)))
    kind = socket.SOCK_STREAM if request.get("op") == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(host), kind) as sock:
        sock.settimeout(timeout)
        source = request.get("source")
        if isinstance(source, str):
            sock.bind((source, 0))
        if kind == socket.SOCK_STREAM:
            sock.connect((host, port))
            sock.sendall(token.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        else:
            sock.sendto(token.encode(), (host, port))
            data, sender = sock.recvfrom(4096)
            reply = json.loads(data)
            reply["sender"] = list(sender[:2])
            return {"ok": True, "reply": reply}
    if not data:
        return {"ok": False, "error": "connection closed without a reply"}
    reply = json.loads(data)
    return {"ok": True, "reply": reply}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", action="append", default=[])
    parser.add_argument("--user", default=None, help="UID[:GID] to run as once in place")
    args = parser.parse_args(argv)

    # Keep one descriptor per namespace; switching needs privileges, so with --user we can only
    # serve one namespace (entered before dropping).
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in args.netns]
    if args.user and len(fds) > 1:
        parser.error("--user works with at most one --netns")
    if fds and _libc().setns(fds[0], CLONE_NEWNET) != 0:
        parser.error(f"cannot enter {args.netns[0]}")
    if args.user:
        uid_text, _, gid_text = args.user.partition(":")
        os.setgroups([])
        os.setgid(int(gid_text or uid_text))
        os.setuid(int(uid_text))
    current = 0
    print(json.dumps({"ready": True, "uid": os.geteuid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            index = int(request.get("ns", 0))
            if fds and index != current:
                if _libc().setns(fds[index], CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
                current = index
            answer = _exchange(request)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
