"""Structured log events routed through the standard :mod:`logging` module.

The library never writes to stdout and never configures logging: every
event goes to the ``logging`` logger named after its module (``leaderwatch.*``)
as one record whose message is the event name followed by ``key=value``
fields. The record also carries the event name and the fields as attributes
(``leaderwatch_event``, ``leaderwatch_fields``) so a structured handler
(structlog's ``ProcessorFormatter``, a JSON formatter) keeps them as data;
see :mod:`leaderwatch.logs`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

__all__ = ["EventLogger", "get_logger"]

# The standard advice for libraries: without this, Python's last-resort
# handler would print our warnings to stderr of a program that chose no
# logging at all.
logging.getLogger("leaderwatch").addHandler(logging.NullHandler())

_DEBUG: Final = logging.DEBUG
_INFO: Final = logging.INFO
_WARNING: Final = logging.WARNING
_ERROR: Final = logging.ERROR


class _EventMessage:
    """Renders ``event key=value ...`` only when a handler formats the record."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: dict[str, Any]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        if not self.fields:
            return self.event
        rendered = " ".join(f"{key}={value!r}" for key, value in self.fields.items())
        return f"{self.event} {rendered}"


class EventLogger:
    """Emits named events with fields; costs one level check when the level is off."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    @property
    def name(self) -> str:
        """The ``logging`` logger name."""
        return self._logger.name

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        logger = self._logger
        if logger.isEnabledFor(level):
            logger.log(
                level,
                _EventMessage(event, fields),
                extra={"leaderwatch_event": event, "leaderwatch_fields": fields},
                stacklevel=3,
            )

    def debug(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at DEBUG."""
        self._emit(_DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at INFO."""
        self._emit(_INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at WARNING."""
        self._emit(_WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at ERROR."""
        self._emit(_ERROR, event, fields)


def get_logger(name: str) -> EventLogger:
    """The event logger for module ``name`` (a ``leaderwatch.*`` logger name)."""
    return EventLogger(logging.getLogger(name))
