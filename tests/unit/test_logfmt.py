"""Structured log lines: one event per line, values quoted, control characters never pass through."""

from __future__ import annotations

import logging

from lbagent.logfmt import LogfmtFormatter, event


def _format(name: str, **fields: object) -> str:
    record = logging.LogRecord("lbagent.test", logging.INFO, __file__, 1, name, None, None)
    record.lbagent_fields = fields
    return LogfmtFormatter(with_time=False).format(record)


def test_fields_are_key_value_pairs() -> None:
    line = _format("vip_withdrawn", service="default/web", reason="noHealthyNodes", nodes=("a", "b"), ok=False)
    assert line == ("level=info logger=lbagent.test event=vip_withdrawn service=default/web "
                    "reason=noHealthyNodes nodes=a,b ok=false")


def test_spaces_quotes_and_control_characters_are_escaped() -> None:
    line = _format("x", error='bad "value"\nevent=forged')
    assert "\n" not in line
    assert 'error="bad \\"value\\"\\x0aevent=forged"' in line


def test_event_helper_attaches_fields(caplog: object) -> None:
    logger = logging.getLogger("lbagent.test2")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    event(logger, logging.INFO, "hello", a=1)
    assert records[0].getMessage() == "hello"
    assert records[0].lbagent_fields == {"a": 1}  # type: ignore[attr-defined]
