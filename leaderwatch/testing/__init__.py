"""Tools for testing services and drivers built on leaderwatch.

- :func:`check_driver_contract` / :func:`assert_driver_contract`: the
  conformance kit every driver passes (see :data:`CONTRACT_CHECKS`).
- :class:`LeadershipHistory`: record what many nodes reported, in-process
  or from the runner's JSON lines, and check it (one leader per epoch,
  epochs never decrease, no overlapping leaders, hints that name real
  leaders, convergence after faults).
- :func:`capture_events`: collect the library's log events as dicts.
- :mod:`leaderwatch.testing.runner`: run one node of your own driver as a
  process that prints each leadership transition as a JSON line, as
  ``leaderwatch campaign URL --endpoint H:P --format json`` does for the
  built-in drivers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from leaderwatch.logs import event_of
from leaderwatch.testing._conformance import (
    CONTRACT_CHECKS,
    ContractReport,
    ContractViolated,
    ContractViolation,
    assert_driver_contract,
    check_driver_contract,
)
from leaderwatch.testing._history import (
    Fault,
    HistoryEvent,
    HistoryLineInvalid,
    HistoryReport,
    HistoryViolated,
    HistoryViolation,
    LeadershipHistory,
    LeaderTerm,
    ViolationKind,
)

__all__ = [
    "CONTRACT_CHECKS",
    "ContractReport",
    "ContractViolated",
    "ContractViolation",
    "Fault",
    "HistoryEvent",
    "HistoryLineInvalid",
    "HistoryReport",
    "HistoryViolated",
    "HistoryViolation",
    "LeaderTerm",
    "LeadershipHistory",
    "ViolationKind",
    "assert_driver_contract",
    "capture_events",
    "check_driver_contract",
]


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
