"""Carry TCP connections between network namespaces through a unix socket, which every namespace can reach (it lives
in the file system): the tests' kube-apiserver listens on the host's 127.0.0.1, and the lab's LB namespaces reach it
at their own 127.0.0.1:6443.

    python -m tests.k8s.bridge unix-to-tcp SOCKET 127.0.0.1:PORT   # on the host: the socket leads to the server
    python -m tests.k8s.bridge tcp-to-unix 127.0.0.1:6443 SOCKET   # in a namespace: the port leads to the socket

Bytes are relayed as they are (TLS passes through untouched). SIGSTOP on the bridge of one namespace cuts that LB
node off the API without closing its connections, as a hung control plane does; SIGCONT restores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _relay(connect: str | tuple[str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    try:
        if isinstance(connect, str):
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(connect)
        else:
            upstream_reader, upstream_writer = await asyncio.open_connection(*connect)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(argv: list[str]) -> None:
    mode, listen, connect = argv
    target: str | tuple[str, int] = _address(connect) if mode == "unix-to-tcp" else connect

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(target, reader, writer)

    if mode == "unix-to-tcp":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)
        server = await asyncio.start_unix_server(handle, listen)
        os.chmod(listen, 0o600)
    elif mode == "tcp-to-unix":
        host, port = _address(listen)
        server = await asyncio.start_server(handle, host, port, reuse_address=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}: unix-to-tcp or tcp-to-unix")
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
