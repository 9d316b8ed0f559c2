"""A leadership history recorded from many nodes, and the checks it must pass."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from typing import Any, Final, Literal

import anyio
from anyio.abc import TaskStatus
from pydantic import TypeAdapter, ValidationError

from leaderwatch._value import FrozenValue
from leaderwatch.channel import WatchReceiver
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    Follower,
    InvalidEndpoint,
    Leader,
    LeaderState,
    Unknown,
    observed_epoch,
    parse_endpoint,
    same_endpoint,
)

__all__ = [
    "Fault",
    "HistoryEvent",
    "HistoryLineInvalid",
    "HistoryReport",
    "HistoryViolated",
    "HistoryViolation",
    "LeaderTerm",
    "LeadershipHistory",
    "ViolationKind",
]

ViolationKind = Literal[
    "epoch_decreased",
    "epoch_led_twice",
    "epoch_names_two_leaders",
    "leaders_overlap",
    "hint_unled_epoch",
    "hint_wrong_endpoint",
    "not_converged",
]
"""What a :class:`HistoryViolation` found:

- ``epoch_decreased``: one node reported an epoch below one it reported before.
- ``epoch_led_twice``: two different nodes reported ``Leader`` at the same epoch.
- ``epoch_names_two_leaders``: one node saw two different leaders at one
  epoch (``Leader(e)`` and ``Follower(other, e)``, or two endpoints at ``e``).
- ``leaders_overlap``: two nodes were ``Leader`` at the same time for longer
  than the margin.
- ``hint_unled_epoch``: a ``Follower`` hint names an epoch no node led at
  (checked only when every candidate was recorded).
- ``hint_wrong_endpoint``: a hint names another endpoint than the one of the
  node that led at its epoch.
- ``not_converged``: after the last fault the nodes did not settle on one
  leader, every other node following it, within the bound.
"""

_MAX_LINE: Final = 1 << 20
_STATE: TypeAdapter[LeaderState] = TypeAdapter(LeaderState)


def _same_endpoint(first: str, second: str) -> bool:
    """Whether two endpoints name one address; a value no driver should publish compares as text."""
    try:
        return same_endpoint(first, second)
    except InvalidEndpoint:
        return first == second


class HistoryLineInvalid(LeaderwatchError, ValueError):
    """A JSON line is not a runner report ``{"node", "t", "state", ...}``; the message says why."""


class HistoryViolated(LeaderwatchError, AssertionError):
    """A history broke its checks; the message lists every violation with its events."""


class HistoryEvent(FrozenValue):
    """What ``node`` reported at ``t`` (``time.monotonic()``, one clock per host).

    ``state`` is ``None`` when the node stopped reporting (it exited or was
    killed): from then on it holds no state. ``index`` is the order of
    recording.
    """

    t: float
    node: str
    state: LeaderState | None
    index: int

    def describe(self) -> str:
        """``t=12.345 node: Leader(epoch=3)``, the form violation messages use."""
        shown = "gone" if self.state is None else repr(self.state)
        return f"t={self.t:.3f} {self.node}: {shown}"


class Fault(FrozenValue):
    """A fault injected into the system under test, from ``start`` to ``end`` (monotonic)."""

    kind: str
    start: float
    end: float
    target: str | None = None


class LeaderTerm(FrozenValue):
    """One node leading at one epoch, from its first ``Leader(epoch)`` report to its next report.

    ``end`` is ``math.inf`` while the term is still open at the end of the history.
    """

    node: str
    epoch: int
    start: float
    end: float


class HistoryViolation(FrozenValue):
    """One broken rule, with the events that show it and the fault in force then."""

    kind: ViolationKind
    message: str
    events: tuple[HistoryEvent, ...]
    fault: Fault | None = None

    def describe(self) -> str:
        """The message, then one line per event, then the fault if any."""
        lines = [f"{self.kind}: {self.message}"]
        lines += [f"    {event.describe()}" for event in self.events]
        if self.fault is not None:
            fault = self.fault
            target = f" on {fault.target}" if fault.target else ""
            lines.append(
                f"    during/after fault {fault.kind}{target} [{fault.start:.3f}, {fault.end:.3f}]"
            )
        return "\n".join(lines)


class HistoryReport(FrozenValue):
    """The outcome of :meth:`LeadershipHistory.check`."""

    violations: tuple[HistoryViolation, ...]
    nodes: int
    events: int
    terms: int
    """Distinct ``(node, epoch)`` leadership terms seen."""

    @property
    def ok(self) -> bool:
        """Whether no rule was broken."""
        return not self.violations

    def counts(self) -> dict[str, int]:
        """Violations per kind."""
        found: dict[str, int] = {}
        for violation in self.violations:
            found[violation.kind] = found.get(violation.kind, 0) + 1
        return found

    def describe(self) -> str:
        """Every violation, described, or a one-line summary when there is none."""
        if not self.violations:
            return f"history ok: {self.nodes} nodes, {self.events} events, {self.terms} terms"
        return f"{len(self.violations)} history violation(s):\n" + "\n".join(
            violation.describe() for violation in self.violations
        )

    def raise_for_violations(self) -> None:
        """Raise :class:`HistoryViolated` listing every violation, if there is any."""
        if self.violations:
            raise HistoryViolated(self.describe())


class _Interval:
    __slots__ = ("end", "end_event", "epoch", "node", "start", "start_event")

    def __init__(self, start_event: HistoryEvent, epoch: int) -> None:
        self.node = start_event.node
        self.epoch = epoch
        self.start = start_event.t
        self.start_event = start_event
        self.end = math.inf
        self.end_event: HistoryEvent | None = None


class LeadershipHistory:
    """Every leadership value many nodes reported, and when; :meth:`check` judges it.

    Record values in-process with :meth:`watch` (a task per node) or
    :meth:`record`, or from processes with :meth:`feed_json_line` (the lines
    ``leaderwatch campaign --format json`` prints). Times are
    ``time.monotonic()``, which on Linux is one clock for every process of
    the host. A node that stops without a last report (killed) must be
    marked with :meth:`mark_gone`, else its last value lasts for ever.
    Recording is thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[HistoryEvent] = []
        self._endpoints: dict[str, str] = {}
        self._paused: dict[str, list[tuple[float, float]]] = {}
        self._faults: list[Fault] = []

    # -- recording ----------------------------------------------------------------

    def declare(self, node: str, *, endpoint: str) -> None:
        """Tell the history which endpoint ``node`` advertises when it leads.

        Hints are then checked against it, and convergence asks followers
        to name it. Raises ``InvalidEndpoint`` for a bad endpoint.
        """
        parse_endpoint(endpoint)
        with self._lock:
            self._endpoints[node] = endpoint

    def record(self, node: str, state: LeaderState, *, t: float | None = None) -> HistoryEvent:
        """Record that ``node`` reported ``state`` at ``t`` (default: now, ``time.monotonic()``)."""
        if not isinstance(state, Leader | Follower | Unknown):
            raise TypeError(f"record() takes a LeaderState (got {type(state).__name__})")
        return self._append(node, state, t)

    def mark_gone(self, node: str, *, t: float | None = None) -> HistoryEvent:
        """Record that ``node`` stopped at ``t`` (exited or killed); it holds nothing after."""
        return self._append(node, None, t)

    def mark_paused(self, node: str, start: float, end: float) -> None:
        """Record that ``node`` was frozen (SIGSTOP) from ``start`` to ``end``.

        A frozen process does nothing, so its ``Leader`` does not count as
        overlapping another leader while frozen; from ``end`` on it counts
        again until its next report, so a node that resumes and keeps
        leading past another's start is still caught.
        """
        if not end >= start:
            raise ValueError(f"a pause must end after it starts (got {start} .. {end})")
        with self._lock:
            self._paused.setdefault(node, []).append((start, end))

    def note_fault(
        self, kind: str, start: float, end: float | None = None, *, target: str | None = None
    ) -> Fault:
        """Record a fault injected from ``start`` to ``end`` (default ``start``).

        Violations name the fault in force when they happened, and the
        convergence bound of :meth:`check` counts from the end of the last one.
        """
        fault = Fault(kind=kind, start=start, end=start if end is None else end, target=target)
        with self._lock:
            self._faults.append(fault)
        return fault

    def feed_json_line(self, line: str | bytes) -> HistoryEvent:
        """Record one runner line: ``{"node": str, "t": float, "state": {...}, ...}``.

        An optional ``"endpoint"`` field declares the node's endpoint. Raises
        :class:`HistoryLineInvalid` naming what is wrong with the line.
        """
        if len(line) > _MAX_LINE:
            raise HistoryLineInvalid(f"line is longer than {_MAX_LINE} bytes")
        try:
            raw: Any = json.loads(line)
        except ValueError as error:
            raise HistoryLineInvalid(f"line is not JSON: {error}") from None
        if not isinstance(raw, dict):
            raise HistoryLineInvalid(f"line must be a JSON object (got {type(raw).__name__})")
        node, t, state = raw.get("node"), raw.get("t"), raw.get("state")
        if not isinstance(node, str) or not node:
            raise HistoryLineInvalid('line needs "node", a non-empty string')
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise HistoryLineInvalid('line needs "t", a finite number (time.monotonic())')
        try:
            parsed = _STATE.validate_python(state)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "state"
            raise HistoryLineInvalid(
                f'line needs "state", a LeaderState object: {where}: {first["msg"]}'
            ) from None
        endpoint = raw.get("endpoint")
        if endpoint is not None:
            try:
                self.declare(node, endpoint=endpoint)
            except InvalidEndpoint as error:
                raise HistoryLineInvalid(f'line has an invalid "endpoint": {error}') from None
        return self._append(node, parsed, float(t))

    async def watch(
        self,
        node: str,
        receiver: WatchReceiver[LeaderState],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Record every value ``receiver`` yields as ``node``'s, until it ends; then mark it gone.

        Meant for ``await task_group.start(history.watch, "a", driver.leadership())``:
        it reports started once the first value is recorded. Like any
        subscriber it skips values replaced before it ran. Declare the node's
        endpoint with :meth:`declare`.
        """
        started = False
        try:
            async for state in receiver:
                self.record(node, state)
                if not started:
                    started = True
                    task_status.started()
        finally:
            self.mark_gone(node)
            if not started:
                task_status.started()

    def _append(self, node: str, state: LeaderState | None, t: float | None) -> HistoryEvent:
        if not isinstance(node, str) or not node:
            raise ValueError(f"node must be a non-empty string (got {node!r})")
        with self._lock:
            event = HistoryEvent(
                t=time.monotonic() if t is None else float(t),
                node=node,
                state=state,
                index=len(self._events),
            )
            self._events.append(event)
        return event

    def select(self, nodes: Iterable[str]) -> LeadershipHistory:
        """A new history holding only ``nodes``' events, endpoints and pauses (and every fault).

        For checking groups that elect independently (separate directories or
        elections) each on its own.
        """
        chosen = set(nodes)
        selected = LeadershipHistory()
        with self._lock:
            selected._events = [event for event in self._events if event.node in chosen]
            selected._endpoints = {n: e for n, e in self._endpoints.items() if n in chosen}
            selected._paused = {n: list(p) for n, p in self._paused.items() if n in chosen}
            selected._faults = list(self._faults)
        return selected

    # -- reading ------------------------------------------------------------------

    @property
    def events(self) -> list[HistoryEvent]:
        """Every event, in the order of recording."""
        with self._lock:
            return list(self._events)

    @property
    def faults(self) -> list[Fault]:
        """Every fault noted, in the order noted."""
        with self._lock:
            return list(self._faults)

    def endpoint_of(self, node: str) -> str | None:
        """The endpoint declared for ``node``, if any."""
        with self._lock:
            return self._endpoints.get(node)

    def nodes(self) -> list[str]:
        """Every node that reported, in order of first report."""
        return list(dict.fromkeys(event.node for event in self.events))

    def by_node(self) -> dict[str, list[HistoryEvent]]:
        """Each node's events in time order (recording order breaks ties)."""
        grouped: dict[str, list[HistoryEvent]] = {}
        for event in self.events:
            grouped.setdefault(event.node, []).append(event)
        for events in grouped.values():
            events.sort(key=lambda event: (event.t, event.index))
        return grouped

    def leader_terms(self) -> list[LeaderTerm]:
        """Every span in which a node reported ``Leader``, by start time."""
        terms = [
            LeaderTerm(node=span.node, epoch=span.epoch, start=span.start, end=span.end)
            for span in self._leader_intervals(self.by_node())
        ]
        return sorted(terms, key=lambda term: (term.start, term.node))

    # -- checking -----------------------------------------------------------------

    def check(
        self,
        *,
        overlap_margin: float = 0.0,
        complete: bool = False,
        converge_within: float | None = None,
    ) -> HistoryReport:
        """Judge the history; every violation comes with the events that show it.

        - Always: a node's epoch decreasing (``epoch_decreased``, per process:
          a node marked gone starts afresh), two nodes ``Leader`` at one epoch
          (``epoch_led_twice``), one node seeing two leaders at one epoch
          (``epoch_names_two_leaders``, needs declared endpoints for the
          ``Leader``/``Follower`` pair), two nodes ``Leader`` at once for more
          than ``overlap_margin`` seconds (``leaders_overlap``; pauses noted
          with :meth:`mark_paused` do not count), a hint naming another
          endpoint than the declared one of the node that led at its epoch
          (``hint_wrong_endpoint``).
        - With ``complete=True`` (every candidate was recorded): a hint
          naming an epoch no node led at (``hint_unled_epoch``).
        - With ``converge_within``: the nodes still running at the end must
          have settled, at most that many seconds after the end of the last
          noted fault (or the first event), on one ``Leader`` that every
          other one follows with its epoch (and its endpoint, when declared)
          until the end (``not_converged``).
        """
        if not overlap_margin >= 0:
            raise ValueError(f"overlap_margin must be a number >= 0 (got {overlap_margin!r})")
        if converge_within is not None and not converge_within >= 0:
            raise ValueError(f"converge_within must be >= 0 seconds (got {converge_within!r})")
        grouped = self.by_node()
        with self._lock:
            endpoints = dict(self._endpoints)
            paused = {node: sorted(spans) for node, spans in self._paused.items()}
            faults = sorted(self._faults, key=lambda fault: fault.start)
        found: _Found = []
        found += _epochs_decreasing(grouped)
        led = _first_leads(grouped)
        found += _epochs_led_twice(led)
        found += _two_leaders_seen(grouped, endpoints)
        intervals = self._leader_intervals(grouped)
        found += _overlaps(intervals, paused, overlap_margin)
        found += _hints(grouped, led, endpoints, complete=complete)
        if converge_within is not None:
            found += _convergence(grouped, endpoints, faults, converge_within)
        violations = tuple(
            HistoryViolation(kind=kind, message=message, events=events, fault=_fault_at(faults, at))
            for kind, message, events, at in found
        )
        return HistoryReport(
            violations=violations,
            nodes=len(grouped),
            events=sum(len(events) for events in grouped.values()),
            terms=len({(span.node, span.epoch) for span in intervals}),
        )

    @staticmethod
    def _leader_intervals(grouped: dict[str, list[HistoryEvent]]) -> list[_Interval]:
        intervals: list[_Interval] = []
        for events in grouped.values():
            current: _Interval | None = None
            for event in events:
                state = event.state
                if current is not None and state == Leader(epoch=current.epoch):
                    continue
                if current is not None:
                    current.end = event.t
                    current.end_event = event
                    current = None
                if isinstance(state, Leader):
                    current = _Interval(event, state.epoch)
                    intervals.append(current)
        intervals.sort(key=lambda span: (span.start, span.start_event.index))
        return intervals


_Found = list[tuple[ViolationKind, str, tuple[HistoryEvent, ...], float]]
"""Each violation found: its kind, message, events, and the instant it began."""


def _epochs_decreasing(grouped: dict[str, list[HistoryEvent]]) -> _Found:
    found: _Found = []
    for node, events in grouped.items():
        high: HistoryEvent | None = None
        for event in events:
            if event.state is None:
                high = None
                continue
            epoch = observed_epoch(event.state)
            if epoch is None:
                continue
            high_epoch = None if high is None or high.state is None else observed_epoch(high.state)
            if high is not None and high_epoch is not None and epoch < high_epoch:
                found.append(
                    (
                        "epoch_decreased",
                        f"{node} went from epoch {high_epoch} down to {epoch}",
                        (high, event),
                        event.t,
                    )
                )
            elif high_epoch is None or epoch > high_epoch:
                high = event
    return found


def _first_leads(grouped: dict[str, list[HistoryEvent]]) -> dict[int, dict[str, HistoryEvent]]:
    """For each epoch, the first ``Leader(epoch)`` event of each node that led at it."""
    led: dict[int, dict[str, HistoryEvent]] = {}
    for node, events in grouped.items():
        for event in events:
            if isinstance(event.state, Leader):
                led.setdefault(event.state.epoch, {}).setdefault(node, event)
    return led


def _epochs_led_twice(led: dict[int, dict[str, HistoryEvent]]) -> _Found:
    found: _Found = []
    for epoch, owners in sorted(led.items()):
        if len(owners) > 1:
            events = tuple(sorted(owners.values(), key=lambda event: event.t))
            names = ", ".join(event.node for event in events)
            found.append(
                (
                    "epoch_led_twice",
                    f"{len(owners)} nodes led at epoch {epoch}: {names}",
                    events,
                    events[-1].t,
                )
            )
    return found


def _named(state: LeaderState | None, own: str | None) -> tuple[int, str] | None:
    """The ``(epoch, leader endpoint)`` a state names, when it names both."""
    if isinstance(state, Leader):
        return None if own is None else (state.epoch, own)
    if (
        isinstance(state, Follower)
        and state.leader_epoch is not None
        and state.leader_endpoint is not None
    ):
        return state.leader_epoch, state.leader_endpoint
    return None


def _two_leaders_seen(grouped: dict[str, list[HistoryEvent]], endpoints: dict[str, str]) -> _Found:
    found: _Found = []
    for node, events in grouped.items():
        own = endpoints.get(node)
        named: dict[int, tuple[str, HistoryEvent]] = {}
        reported: set[int] = set()
        for event in events:
            if event.state is None:
                named.clear()
                continue
            seen = _named(event.state, own)
            if seen is None:
                continue
            epoch, endpoint = seen
            earlier_endpoint, earlier = named.setdefault(epoch, (endpoint, event))
            if not _same_endpoint(earlier_endpoint, endpoint) and epoch not in reported:
                reported.add(epoch)
                found.append(
                    (
                        "epoch_names_two_leaders",
                        f"{node} saw two leaders at epoch {epoch}: "
                        f"{earlier_endpoint} and {endpoint}",
                        (earlier, event),
                        event.t,
                    )
                )
    return found


def _without_pauses(
    span: _Interval, pauses: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    pieces = [(span.start, span.end)]
    for pause_start, pause_end in pauses:
        kept: list[tuple[float, float]] = []
        for start, end in pieces:
            if pause_end <= start or pause_start >= end:
                kept.append((start, end))
                continue
            if start < pause_start:
                kept.append((start, pause_start))
            if pause_end < end:
                kept.append((pause_end, end))
        pieces = kept
    return pieces


def _overlaps(
    intervals: list[_Interval], paused: dict[str, list[tuple[float, float]]], margin: float
) -> _Found:
    pieces = sorted(
        (
            (start, end, span)
            for span in intervals
            for start, end in _without_pauses(span, paused.get(span.node, []))
        ),
        key=lambda piece: (piece[0], piece[2].start_event.index),
    )
    overlap: dict[tuple[int, int], tuple[float, _Interval, _Interval]] = {}
    active: list[tuple[float, float, _Interval]] = []
    for start, end, span in pieces:
        active = [piece for piece in active if piece[1] > start]
        for _, other_end, other in active:
            if other.node == span.node:
                continue
            length = min(end, other_end) - start
            key = (other.start_event.index, span.start_event.index)
            previous = overlap.get(key)
            overlap[key] = ((previous[0] if previous else 0.0) + length, other, span)
        active.append((start, end, span))
    found: _Found = []
    for length, first, second in overlap.values():
        if length <= margin:
            continue
        events = [first.start_event, second.start_event]
        events += [event for event in (first.end_event, second.end_event) if event is not None]
        shown = (
            "for ever (still leading at the end)"
            if math.isinf(length)
            else f"{length * 1000:.1f} ms"
        )
        found.append(
            (
                "leaders_overlap",
                f"{first.node} (epoch {first.epoch}) and {second.node} (epoch {second.epoch}) "
                f"both led for {shown}, beyond the {margin:g}s margin",
                tuple(sorted(events, key=lambda event: (event.t, event.index))),
                second.start,
            )
        )
    return found


def _hints(
    grouped: dict[str, list[HistoryEvent]],
    led: dict[int, dict[str, HistoryEvent]],
    endpoints: dict[str, str],
    *,
    complete: bool,
) -> _Found:
    found: _Found = []
    reported: set[tuple[str, int, str | None]] = set()
    for node, events in grouped.items():
        for event in events:
            state = event.state
            if not isinstance(state, Follower) or state.leader_epoch is None:
                continue
            epoch = state.leader_epoch
            key = (node, epoch, state.leader_endpoint)
            if key in reported:
                continue
            owners = led.get(epoch, {})
            if not owners:
                if complete:
                    reported.add(key)
                    found.append(
                        (
                            "hint_unled_epoch",
                            f"{node} follows a leader at epoch {epoch}, but no recorded node "
                            "led at that epoch",
                            (event,),
                            event.t,
                        )
                    )
                continue
            if state.leader_endpoint is None:
                continue
            declared = [(owner, endpoints[owner]) for owner in owners if owner in endpoints]
            if declared and not any(
                _same_endpoint(endpoint, state.leader_endpoint) for _, endpoint in declared
            ):
                reported.add(key)
                names = ", ".join(f"{owner} ({endpoint})" for owner, endpoint in declared)
                found.append(
                    (
                        "hint_wrong_endpoint",
                        f"{node} follows {state.leader_endpoint} at epoch {epoch}, "
                        f"but {names} led at that epoch",
                        (event, *owners.values()),
                        event.t,
                    )
                )
    return found


def _final_run_start(events: list[HistoryEvent]) -> HistoryEvent:
    last = events[-1]
    start = last
    for event in reversed(events):
        if event.state != last.state:
            break
        start = event
    return start


def _convergence(
    grouped: dict[str, list[HistoryEvent]],
    endpoints: dict[str, str],
    faults: list[Fault],
    within: float,
) -> _Found:
    live = {node: events for node, events in grouped.items() if events[-1].state is not None}
    if not live:
        return []
    first = min(events[0].t for events in grouped.values())
    since = max((fault.end for fault in faults), default=first)
    deadline = since + within
    last_events = tuple(events[-1] for events in live.values())
    leaders = {
        node: events for node, events in live.items() if isinstance(events[-1].state, Leader)
    }
    if len(leaders) != 1:
        return [
            (
                "not_converged",
                f"{len(leaders)} nodes lead at the end of the history (expected exactly one); "
                f"last fault ended at t={since:.3f}",
                last_events,
                since,
            )
        ]
    leader, leader_events = next(iter(leaders.items()))
    final = leader_events[-1].state
    assert isinstance(final, Leader)
    endpoint = endpoints.get(leader)
    found: _Found = []
    for node, events in live.items():
        settled = _final_run_start(events)
        state = settled.state
        if node == leader:
            good = True
        elif isinstance(state, Follower) and state.leader_epoch == final.epoch:
            good = endpoint is None or (
                state.leader_endpoint is not None
                and _same_endpoint(state.leader_endpoint, endpoint)
            )
        else:
            good = False
        wanted = (
            f"Follower({endpoint or '<its endpoint>'}, {final.epoch})"
            if node != leader
            else repr(final)
        )
        if not good:
            found.append(
                (
                    "not_converged",
                    f"{node} ends as {state!r}, not {wanted} after {leader} took epoch "
                    f"{final.epoch}",
                    (settled, leader_events[-1]),
                    settled.t,
                )
            )
        elif settled.t > deadline:
            found.append(
                (
                    "not_converged",
                    f"{node} reached {wanted} only {settled.t - since:.3f}s after the last fault "
                    f"(bound {within:g}s)",
                    (settled,),
                    settled.t,
                )
            )
    return found


def _fault_at(faults: Iterable[Fault], moment: float) -> Fault | None:
    """The last fault that started at or before ``moment``."""
    chosen: Fault | None = None
    for fault in faults:
        if fault.start <= moment:
            chosen = fault
    return chosen
