"""Every live leaderwatch object, held weakly, for observers such as :mod:`leaderwatch.prometheus`.

The constructors of watches, drivers, tasks, nodes and client caches call
:func:`track`; nothing else is wired per object. The registry never keeps an
object alive: once garbage-collected, it is gone from :func:`live`.

Each object gets a *label*, unique among the live objects of its kind: the
name it was tracked with, or ``name#2``, ``name#3``, … while another live
object of that kind holds the name (tests build many ``ManualDriver()`` named
``manual``; one series per object keeps the metrics output valid). A label
never changes for the life of its object.

Thread-safe: objects may be built in any thread, and :func:`live` may be
called from any thread (a metrics server's, typically). Tracking costs a
lock and a weak dictionary insertion per constructed object; nothing is done
per request.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Final, Literal, TypeVar

import anyio

__all__ = ["KINDS", "Kind", "clock_offset", "live", "note_event_loop_clock", "track"]

Kind = Literal["watch", "driver", "task", "node", "client"]
KINDS: Final[tuple[Kind, ...]] = ("watch", "driver", "task", "node", "client")

_T = TypeVar("_T")

_lock = threading.Lock()
_by_label: dict[Kind, weakref.WeakValueDictionary[str, object]] = {
    kind: weakref.WeakValueDictionary() for kind in KINDS
}
_clock_offsets: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()


def track(kind: Kind, obj: object, name: str) -> str:
    """Add ``obj`` (held weakly) under a label unique among live ``kind`` objects; return it."""
    with _lock:
        known = _by_label[kind]
        label = name
        suffix = 2
        while label in known:
            label = f"{name}#{suffix}"
            suffix += 1
        known[label] = obj
    return label


def live(kind: Kind, cls: type[_T]) -> list[tuple[str, _T]]:
    """The live ``kind`` objects that are ``cls`` instances, with their labels (tracking order)."""
    with _lock:
        items = list(_by_label[kind].items())
    return [(label, obj) for label, obj in items if isinstance(obj, cls)]


def note_event_loop_clock(obj: object) -> None:
    """Remember how ``obj``'s event loop clock relates to ``time.monotonic()``; call in its loop.

    Lease proofs are instants on ``anyio.current_time()``'s clock, which a
    thread without an event loop cannot read (and trio's clock is offset
    from the monotonic clock); :func:`clock_offset` converts.
    """
    offset = anyio.current_time() - time.monotonic()
    with _lock:
        _clock_offsets[obj] = offset


def clock_offset(obj: object) -> float | None:
    """``anyio.current_time() - time.monotonic()`` in ``obj``'s loop, if it was noted."""
    with _lock:
        return _clock_offsets.get(obj)
