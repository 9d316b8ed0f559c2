"""Getting leaderwatch's structured log events out, the way your application likes them.

leaderwatch logs through the standard :mod:`logging` module under
``leaderwatch.*`` logger names and never configures logging itself. Each
record's message reads ``event key=value ...``; the event name and fields
are also attached to the record as data. Pick one of:

- plain ``logging``: ``logging.basicConfig(level=logging.INFO)`` prints
  ``leader_state_changed node_id='a' ...`` lines to stderr;
- JSON lines: ``handler.setFormatter(leaderwatch.logs.JSONFormatter())``;
- structlog: put :func:`structlog_fields` in the ``foreign_pre_chain`` of a
  ``structlog.stdlib.ProcessorFormatter`` so each leaderwatch record becomes
  a structlog event dict (``event`` = the event name, plus its fields).

Every event name is stable snake_case and documented where it is emitted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["JSONFormatter", "event_of", "structlog_fields"]


def event_of(record: logging.LogRecord) -> tuple[str, dict[str, Any]] | None:
    """The ``(event, fields)`` of a leaderwatch record, ``None`` for any other record."""
    event = getattr(record, "leaderwatch_event", None)
    if not isinstance(event, str):
        return None
    fields = getattr(record, "leaderwatch_fields", None)
    return event, dict(fields) if isinstance(fields, dict) else {}


class JSONFormatter(logging.Formatter):
    """Formats each record as one JSON object: time, level, logger, event and fields.

    Records that do not come from leaderwatch get their message as ``event``.
    Values JSON cannot hold are written with ``repr``.
    """

    def format(self, record: logging.LogRecord) -> str:
        found = event_of(record)
        event, fields = found if found is not None else (record.getMessage(), {})
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
            **fields,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=repr)


def structlog_fields(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: turn a leaderwatch record into its event name and fields.

    Use it in ``structlog.stdlib.ProcessorFormatter(foreign_pre_chain=[...])``;
    other records pass through unchanged.
    """
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        found = event_of(record)
        if found is not None:
            event, fields = found
            event_dict.update(fields)
            event_dict["event"] = event
    return event_dict
