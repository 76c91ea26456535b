"""The only paths between the host and the nodes' network namespaces: one small process.

* node -> API server: in each node's network namespace, a listener on the API server's VIP (an
  address on the node's own ``lo``) whose connections are forwarded to the API server on the
  host's loopback. The host gets no address, link or route for it.
* API server -> cluster: kube-apiserver's egress selector sends its ``cluster`` traffic (kubelet
  logs and exec, the service proxy, webhooks behind a Service) as HTTP CONNECT over a unix
  socket; this process dials each target from inside node-1's network namespace, where pod IPs
  are routed and kube-proxy turns ClusterIPs into pods -- what konnectivity does in a real cluster.
  Only IP addresses of the cluster's own networks are dialled: nothing else is reachable from
  there anyway, and a name or any other address is refused.

A socket belongs to the network namespace it was created in, whichever thread uses it later: the
loop's thread switches into a node's namespace (``setns`` acts on the calling thread only) just to
create a socket, and back. Started by the harness:

    python -m ipnc_dev.realnode.relay --api-port P --vip 10.250.0.1 --node-netns /proc/H/ns/net ...
        --egress-socket PATH --egress-netns /proc/H1/ns/net --allow 10.244.0.0/16 ...

prints ``ready`` once every listener is up, and one line per refused CONNECT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
HEADER_LIMIT = 8192
DIAL_TIMEOUT = 10.0
CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)
_home_fd = -1


class Refused(ValueError):
    """A CONNECT this relay does not make; the message says why."""


def parse_connect(
    head: bytes, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> tuple[str, int]:
    """The target of an HTTP CONNECT request head, if it is an IP address in ``allowed``."""
    if len(head) > HEADER_LIMIT:
        raise Refused("request head too long")
    try:
        first = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise Refused("request line is not ASCII") from None
    parts = first.split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[2].startswith("HTTP/1."):
        raise Refused(f"not a CONNECT request: {first[:80]!r}")
    host, sep, port_text = parts[1].rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Refused(f"not host:port: {parts[1][:80]!r}")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise Refused(f"not an IP address: {host[:80]!r}") from None
    if not any(address in net for net in allowed):
        raise Refused(f"{address} is outside the cluster's networks")
    return str(address), int(port_text)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns_fd: int, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket of the network namespace ``netns_fd`` (created there, usable from anywhere)."""
    _setns(netns_fd)
    try:
        return socket.socket(family, kind)
    finally:
        try:
            _setns(_home_fd)
        except OSError as e:  # this thread is now in a node's namespace: nothing it does is safe
            print(f"relay: cannot return to the host's network namespace: {e}", flush=True)
            os._exit(70)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()


class Relay:
    def __init__(
        self,
        *,
        api_port: int,
        egress_netns: int,
        allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        self.api_port = api_port
        self.egress_netns = egress_netns
        self.allowed = list(allowed)

    async def to_apiserver(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.api_port), DIAL_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            print(f"relay: API server not reachable: {e!r}", flush=True)
            writer.close()
            return
        await _splice((reader, writer), upstream)

    async def egress(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DIAL_TIMEOUT)
            host, port = parse_connect(head, self.allowed)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket_in(self.egress_netns, family, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), DIAL_TIMEOUT)
            upstream = await asyncio.open_connection(sock=sock)
        except (Refused, OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            if sock is not None:
                sock.close()
            print(f"relay: CONNECT refused: {e}", flush=True)
            with contextlib.suppress(OSError):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await _splice((reader, writer), upstream)


async def serve(args: argparse.Namespace) -> None:
    global _home_fd
    _home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    node_fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in args.node_netns]
    egress_fd = os.open(args.egress_netns, os.O_RDONLY | os.O_CLOEXEC)
    relay = Relay(
        api_port=args.api_port,
        egress_netns=egress_fd,
        allowed=[ipaddress.ip_network(a) for a in args.allow],
    )
    servers: list[asyncio.Server] = []
    for fd in node_fds:
        listener = socket_in(fd, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.vip, args.api_port))
        listener.listen(256)
        listener.setblocking(False)
        servers.append(await asyncio.start_server(relay.to_apiserver, sock=listener))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.egress_socket)
    servers.append(await asyncio.start_unix_server(relay.egress, args.egress_socket, limit=HEADER_LIMIT))
    os.chmod(args.egress_socket, 0o600)
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ipnc_dev.realnode.relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--node-netns", action="append", required=True)
    parser.add_argument("--egress-socket", required=True)
    parser.add_argument("--egress-netns", required=True)
    parser.add_argument("--allow", action="append", required=True, help="a network CONNECT may reach")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except OSError as e:
        print(f"relay: {e}", flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
