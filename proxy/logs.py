"""The formats of pgsplit's log lines on stderr: text for a person, JSON for a log shipper.

Owns: the formatters. Both carry the same content (time, level, logger, message, a
traceback); JSON adds any `extra=` fields of a record. Neither adds anything the message
did not have, so what keeps secrets out of the text log keeps them out of the JSON one.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the
    record's extra fields, and `exception` / `stack` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in line:
                line[key] = value
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field JSON cannot encode is written as its str()
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str, worker: int | None = None) -> logging.Formatter:
    """The formatter of `log_format` ("text" or "json", the config's key); a worker of
    `pgsplit run --workers N` names itself (JSON: the field "worker")."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(
        "%(name)s:", f"%(name)s [worker {worker}]:"))


class WorkerField(logging.Filter):
    """Puts the worker's number on every record (JSON lines carry it as "worker")."""

    def __init__(self, worker: int):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True
