"""Tools for testing services and drivers built on leaderwatch.

- :func:`capture_events`: collect the library's log events as dicts.
- :mod:`leaderwatch.testing.runner`: run one node of any driver as a
  process that prints each leadership transition as a JSON line
  (``python -m leaderwatch.testing.runner local --directory D --endpoint H:P``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from leaderwatch.logs import event_of

__all__ = ["capture_events"]


class _Collector(logging.Handler):
    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        found = event_of(record)
        if found is None:
            return
        event, fields = found
        self.events.append({**fields, "event": event, "log_level": record.levelname.lower()})


@contextlib.contextmanager
def capture_events(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Collect every leaderwatch log event at ``level`` and above while the block runs.

    Yields a list that fills as events happen; each item is the event's
    fields plus ``event`` (its name) and ``log_level`` (``"info"``, ...).
    The ``leaderwatch`` logger's level is restored on exit.
    """
    events: list[dict[str, Any]] = []
    logger = logging.getLogger("leaderwatch")
    handler = _Collector(events)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
