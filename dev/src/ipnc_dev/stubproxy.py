"""A stand-in for the sidecar: TCP/UDP listeners that answer each client with where it came in.

Kernel and cluster tests (and ``demo``) need something at the proxy's ports that proves a
connection was redirected and to where: each reply names the listener, the peer, and the
original destination (SO_ORIGINAL_DST for REDIRECT, the local address for TPROXY). The same
program serves as a plain application server. Started as root, it binds in one or several
network namespaces and then drops to the proxy's UID, so it behaves like a proxy running as 1337.

    python -m ipnc_dev.stubproxy --name proxy --tcp 15001 --tcp 15006 \
        [--udp 15053] [--transparent 15006] [--netns PATH ...] [--user 1337[:1337]] [--record]

Prints ``ready`` on stdout once every socket is bound; with ``--record``, then one JSON line per
answered connection or datagram (the report sent to the client), so that whoever started the
stub (the node stand-in) can tell what reached it and where it was originally addressed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Sequence

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the IPv6 one (IP6T_SO_ORIGINAL_DST) has the same value
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IP_PKTINFO = 8  # not in Python 3.11's socket module
IPV6_TRANSPARENT = 75
CLONE_NEWNET = 0x40000000
TOKEN_LIMIT = 512

_recording = False  # --record
_record_lock = threading.Lock()


def record(report: dict[str, object]) -> None:
    """With ``--record``: print ``report`` as one JSON line on stdout (whole lines, any thread)."""
    if _recording:
        with _record_lock:
            print(json.dumps(report), flush=True)


def original_dst(conn: socket.socket) -> tuple[str, int] | None:
    """The destination a REDIRECTed TCP connection was addressed to, or None if it was not NATed."""
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    except OSError:
        return None


def setns(path: str) -> None:
    """Move this (single-threaded, test-only) process into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def parse_user(user: str | None) -> tuple[int, int] | None:
    if not user:
        return None
    uid_text, _, gid_text = user.partition(":")
    return int(uid_text), int(gid_text or uid_text)


def drop_to(ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    os.setgroups([])
    os.setgid(ids[1])
    os.setuid(ids[0])


def _new_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, ids: tuple[int, int] | None
) -> socket.socket:
    """A socket owned by ``ids``: netfilter's owner match looks at the credentials the socket was
    created with, so a proxy's sockets must be created as the proxy's UID, not as root."""
    if ids is None:
        return socket.socket(family, kind)
    os.setegid(ids[1])
    os.seteuid(ids[0])
    try:
        return socket.socket(family, kind)
    finally:
        os.seteuid(0)
        os.setegid(0)


def _report(name: str, index: int, proto: str, port: int, local: object, peer: object) -> dict[str, object]:
    return {
        "server": name,
        "netns": index,
        "proto": proto,
        "port": port,
        "local": list(local[:2]) if isinstance(local, tuple) else None,
        "peer": list(peer[:2]) if isinstance(peer, tuple) else None,
        "uid": os.geteuid(),
    }


def _serve_tcp(sock: socket.socket, name: str, index: int, port: int) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        threading.Thread(target=_answer_tcp, args=(conn, peer, name, index, port), daemon=True).start()


def _answer_tcp(conn: socket.socket, peer: object, name: str, index: int, port: int) -> None:
    with conn:
        conn.settimeout(5)
        data = b""
        try:
            while b"\n" not in data and len(data) < TOKEN_LIMIT:
                chunk = conn.recv(TOKEN_LIMIT)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        report = _report(name, index, "tcp", port, conn.getsockname(), peer)
        orig = original_dst(conn)
        report["orig"] = list(orig) if orig else None
        report["token"] = data.decode(errors="replace").strip()
        record(report)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(report).encode() + b"\n")


def _serve_udp(sock: socket.socket, name: str, index: int, port: int) -> None:
    """Answer each datagram from the address it was sent to (as a DNS server does), so that
    conntrack can un-NAT a REDIRECTed query's reply."""
    v4 = sock.family == socket.AF_INET
    level, kind = (socket.IPPROTO_IP, IP_PKTINFO) if v4 else (SOL_IPV6, socket.IPV6_PKTINFO)
    while True:
        try:
            data, ancillary, _, peer = sock.recvmsg(TOKEN_LIMIT, socket.CMSG_SPACE(32))
        except OSError:
            return
        local: tuple[str, int] | None = None
        reply_info: list[tuple[int, int, bytes]] = []
        for cmsg_level, cmsg_type, cmsg_data in ancillary:
            if (cmsg_level, cmsg_type) != (level, kind):
                continue
            if v4:  # struct in_pktinfo: ifindex, spec_dst, addr
                dst = cmsg_data[8:12]
                reply_info = [(level, kind, struct.pack("=I4s4s", 0, dst, bytes(4)))]
                local = (socket.inet_ntop(socket.AF_INET, dst), port)
            else:  # struct in6_pktinfo: addr, ifindex
                dst = cmsg_data[:16]
                reply_info = [(level, kind, dst + struct.pack("=I", 0))]
                local = (socket.inet_ntop(socket.AF_INET6, dst), port)
        report = _report(name, index, "udp", port, local or sock.getsockname(), peer)
        report["orig"] = None
        report["token"] = data.decode(errors="replace").strip()
        record(report)
        with contextlib.suppress(OSError):
            sock.sendmsg([json.dumps(report).encode()], reply_info, 0, peer)


def _bind(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    port: int,
    transparent: bool,
    ids: tuple[int, int] | None,
) -> socket.socket:
    sock = _new_socket(family, kind, ids)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    if kind == socket.SOCK_DGRAM:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            sock.setsockopt(SOL_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def bind_all(
    tcp: Sequence[int], udp: Sequence[int], transparent: Sequence[int], ids: tuple[int, int] | None
) -> list[tuple[socket.socket, int]]:
    """Bind every port, IPv4 and (where the namespace has it) IPv6."""
    bound: list[tuple[socket.socket, int]] = []
    families = [socket.AF_INET]
    if os.path.exists("/proc/net/if_inet6") and socket.has_ipv6:
        families.append(socket.AF_INET6)
    for family in families:
        for port in tcp:
            bound.append((_bind(family, socket.SOCK_STREAM, port, port in transparent, ids), port))
        for port in udp:
            bound.append((_bind(family, socket.SOCK_DGRAM, port, False, ids), port))
    return bound


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stubproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="proxy")
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--transparent", type=int, action="append", default=[])
    parser.add_argument("--netns", action="append", default=[])
    parser.add_argument("--user", default=None, help="UID[:GID] to run as once bound")
    parser.add_argument("--record", action="store_true", help="print each report on stdout too")
    args = parser.parse_args(argv)
    global _recording
    _recording = args.record

    ids = parse_user(args.user)
    spaces: list[tuple[int, list[tuple[socket.socket, int]]]] = []
    if args.netns:
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        for index, path in enumerate(args.netns):
            setns(path)
            spaces.append((index, bind_all(args.tcp, args.udp, args.transparent, ids)))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
    else:
        spaces.append((0, bind_all(args.tcp, args.udp, args.transparent, ids)))
    drop_to(ids)

    for index, socks in spaces:
        for sock, port in socks:
            target = _serve_tcp if sock.type == socket.SOCK_STREAM else _serve_udp
            threading.Thread(target=target, args=(sock, args.name, index, port), daemon=True).start()
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # serve until the parent closes our stdin or kills us
    return 0


if __name__ == "__main__":
    sys.exit(main())
