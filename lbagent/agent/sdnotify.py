"""systemd's notify protocol (sd_notify): READY, RELOADING, STOPPING, STATUS and the watchdog keep-alive."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from lbagent.logfmt import event

log = logging.getLogger("lbagent.agent")


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET when systemd (or any supervisor speaking its protocol) set one;
    does nothing otherwise, so the same agent runs under systemd, in a lab or in a terminal."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> None:
        """Sent without waiting: this runs on the agent's event loop, and a supervisor that does not read its socket
        (a full queue: net.unix.max_dgram_qlen, 10 on some machines) must not stop the agent. What cannot be sent
        now is dropped and logged; a keep-alive is sent again on the next beat."""
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
            except OSError as exc:  # BlockingIOError (the queue is full), or the socket is gone
                if fields != ("WATCHDOG=1",):
                    event(log, logging.WARNING, "notify_dropped", fields=" ".join(fields).replace("\n", " "),
                          error=f"{type(exc).__name__}: {exc}")

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match the reload with its READY=1 (Type=notify-reload).
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    async def feed_watchdog(self) -> None:
        """Runs on the agent's event loop: if the loop stalls, the keep-alives stop and systemd restarts us."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
