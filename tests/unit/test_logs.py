"""proxy.logs: a JSON log line carries what the text line carries, as one JSON object."""

from __future__ import annotations

import json
import logging
import sys

from proxy.logs import TEXT_FORMAT, JsonFormatter, formatter


def record(msg: str = "backend %s is down: %s", args=("pg2", "timeout"), exc_info=None, **extra) -> logging.LogRecord:
    return logging.getLogger("pgsplit.monitor").makeRecord(
        "pgsplit.monitor", logging.WARNING, __file__, 10, msg, args, exc_info, extra=extra or None)


def test_a_line_has_time_level_logger_message() -> None:
    line = JsonFormatter().format(record())
    assert "\n" not in line
    data = json.loads(line)
    assert list(data) == ["time", "level", "logger", "message"]
    assert data["level"] == "WARNING" and data["logger"] == "pgsplit.monitor"
    assert data["message"] == "backend pg2 is down: timeout"
    assert data["time"].endswith("+00:00") and "T" in data["time"]


def test_the_same_content_as_the_text_line() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        exc_info = sys.exc_info()
    text = logging.Formatter(TEXT_FORMAT).format(record(exc_info=exc_info))
    data = json.loads(JsonFormatter().format(record(exc_info=exc_info)))
    head, _, traceback = text.partition("\n")
    assert head.endswith(f"WARNING pgsplit.monitor: {data['message']}")
    assert data["exception"] == traceback
    assert "ValueError: bad value" in data["exception"]


def test_extra_fields_follow_and_do_not_replace_the_core_ones() -> None:
    data = json.loads(JsonFormatter().format(record(backend="pg2", lag_bytes=123, level="x", where=object())))
    assert data["backend"] == "pg2" and data["lag_bytes"] == 123
    assert data["level"] == "WARNING"  # an extra cannot hide the record's level
    assert data["where"].startswith("<object object")  # not JSON: written as its str()


def test_formatter_by_name() -> None:
    assert isinstance(formatter("json"), JsonFormatter)
    assert formatter("text")._fmt == TEXT_FORMAT
