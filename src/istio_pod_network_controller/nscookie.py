"""The cookie of a network namespace: how the agent and the waiter agree on "this sandbox".

A namespace's inode number is handed out again once the namespace is gone, and a recreated
sandbox often gets its predecessor's; its cookie (``getsockopt(SO_NETNS_COOKIE)``, Linux 5.14+)
is never reused while the machine runs. Any process can read its own namespace's cookie from a
socket, without privileges. Standard library only: the waiter imports this.
"""

from __future__ import annotations

import errno
import socket
import struct

SO_NETNS_COOKIE = 71  # getsockopt(SOL_SOCKET): the socket's network namespace's 64-bit cookie


def own_netns_cookie() -> int | None:
    """The cookie of the calling thread's network namespace; None when the kernel has none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        return socket_netns_cookie(sock)


def socket_netns_cookie(sock: socket.socket) -> int | None:
    """The cookie of the network namespace ``sock`` was made in; None when the kernel has none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise
    (cookie,) = struct.unpack("=Q", raw)
    return int(cookie)
