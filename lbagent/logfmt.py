"""Structured logs: one event per line as logfmt key=value pairs, readable in journald and by machines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_FIELDS = "lbagent_fields"


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with its fields; the message is the event name."""
    logger.log(level, name, extra={_FIELDS: fields}, stacklevel=2)


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if text == "" or any(ch in text for ch in ' ="\\') or not text.isprintable():
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # Control characters never reach a log line: a peer or a file must not be able to forge an event.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=info logger=lbagent.bgp event=announce prefix=192.0.2.10/32`."""

    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self._with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self._with_time:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            parts.append(f"ts={ts}.{int(record.msecs):03d}Z")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"event={_quote(record.getMessage())}"]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str = "info", with_time: bool = True) -> None:
    """Send every lbagent log to stderr; under systemd, journald adds its own timestamp (pass with_time=False)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(with_time))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
