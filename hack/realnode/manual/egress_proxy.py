"""HTTP CONNECT proxy on a unix socket for the by-hand real node (hack/realnode/manual/up).

kube-apiserver runs on host loopback; its egress selector sends the "cluster" traffic (kubelet
logs/exec, service proxy, webhooks behind Services) here as CONNECT requests, and this process,
started inside a node's network namespace, dials the target from there. Reference only: the
Python harness replaces it. Usage: egress_proxy.py SOCKET_PATH
"""

import asyncio
import os
import sys

HEADER_LIMIT = 8192
DIAL_TIMEOUT = 10.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DIAL_TIMEOUT)
        if len(head) > HEADER_LIMIT:
            raise ValueError("request header too long")
        method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        if method != "CONNECT":
            raise ValueError(f"not a CONNECT: {method}")
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), DIAL_TIMEOUT
        )
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
        print(f"egress: refused: {e!r}", flush=True)
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _main(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(_handle, path, limit=HEADER_LIMIT)
    os.chmod(path, 0o600)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
