"""ExaBGP's API process: relays its stdin to lbagent's unix socket and the socket back to its stdout."""

from __future__ import annotations

import os
import selectors
import socket
import sys

_CHUNK = 65536


def relay(socket_path: str, stdin: int = 0, stdout: int = 1) -> int:
    """Relay bytes both ways until either side closes; 0 on a clean close, 1 on an error."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_path)
    except OSError as error:
        print(f"exabgp_bridge: cannot connect to {socket_path}: {error}", file=sys.stderr)
        return 1
    sock.setblocking(False)
    os.set_blocking(stdin, False)
    os.set_blocking(stdout, False)
    # ExaBGP blocks once its pipe to us is full, so stdin is always read and the
    # socket side is buffered in memory however slow the agent is.
    to_agent = bytearray()
    to_exabgp = bytearray()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    stdout_registered = False
    try:
        while True:
            selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if to_agent else 0))
            if to_exabgp and not stdout_registered:
                selector.register(stdout, selectors.EVENT_WRITE)
            elif not to_exabgp and stdout_registered:
                selector.unregister(stdout)
            stdout_registered = bool(to_exabgp)
            for key, events in selector.select():
                try:
                    if key.fd == stdin:
                        data = os.read(stdin, _CHUNK)
                        if not data:
                            # ExaBGP is gone: hand over what it said last (its shutdown notice)
                            sock.settimeout(1.0)
                            sock.sendall(to_agent)
                            return 0
                        to_agent += data
                    elif key.fd == stdout:
                        del to_exabgp[: os.write(stdout, to_exabgp)]
                    else:
                        if events & selectors.EVENT_READ:
                            data = sock.recv(_CHUNK)
                            if not data:
                                return 0
                            to_exabgp += data
                        if events & selectors.EVENT_WRITE and to_agent:
                            del to_agent[: sock.send(to_agent)]
                except (BlockingIOError, InterruptedError):
                    continue
    except OSError as error:
        print(f"exabgp_bridge: {error}", file=sys.stderr)
        return 1
    finally:
        selector.close()
        sock.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lbagent.l3.exabgp_bridge SOCKET_PATH", file=sys.stderr)
        return 2
    return relay(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
