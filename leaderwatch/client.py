"""The client's leader cache: which node to call, and which redirects to trust (DESIGN contract 10).

:class:`LeaderCache` holds at most one cached leader ``(endpoint, epoch)``
and changes it only through one atomic check-and-write per hint or success
report, so a stale node's redirect can never walk a client backwards. It
is thread-safe (each method holds a lock for its check-and-write and never
blocks otherwise), so sync clients and async clients can share it.

An endpoint that refused a connection or timed out is reported with
:meth:`LeaderCache.record_failure`: for a short backoff it moves to the end
of :meth:`~LeaderCache.worklist` and hints naming it at an epoch not above
the one it failed at are refused, so a client stops bouncing between a dead
leader and followers that still name it.

This module imports only :mod:`leaderwatch.state` and :mod:`leaderwatch.hint`.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from pydantic import BaseModel, ConfigDict

from leaderwatch import _registry
from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.hint import LeaderHint, MalformedHint, NoLeaderYet
from leaderwatch.state import (
    Endpoint,
    Epoch,
    InvalidEndpoint,
    _canonical,
    check_epoch,
    parse_endpoint,
)

__all__ = [
    "REFUSAL_REASONS",
    "CachedLeader",
    "Follow",
    "HintOutcome",
    "LeaderCache",
    "LeaderCacheStats",
    "NoLeaderYet",
    "Rejected",
    "Stale",
]

_log = get_logger("leaderwatch.client")

REFUSAL_REASONS: Final = (
    "epoch_below_cached",
    "epoch_below_floor",
    "epochless_hint_to_unconfigured_endpoint",
    "epochless_success_over_known_epoch",
    "endpoint_recently_failed",
    "success_to_other_endpoint_over_epochless",
)
"""Why :meth:`LeaderCache.compare_and_set_leader` / :meth:`~LeaderCache.record_success`
refused an update (logged as ``leader_cache_update_refused``)."""

_MAX_FAILURE_RECORDS: Final = 256
"""Failure records kept before quiet ones are forgotten (hints can name any endpoint)."""

_PLAINTEXT: Final = re.compile(r"http://", re.IGNORECASE)
_STRIPPABLE: Final = re.compile(r"https?://", re.IGNORECASE)


class CachedLeader(NamedTuple):
    """The cached leader: its endpoint and epoch (``None`` when unknown)."""

    endpoint: str
    epoch: int | None


class Follow(FrozenValue):
    """The hint seated the cache: call ``endpoint`` (cached epoch ``epoch``)."""

    __match_args__ = ("endpoint", "epoch")
    endpoint: Endpoint
    epoch: Epoch | None = None


class Rejected(FrozenValue):
    """The hint was refused: malformed, a transport downgrade, or naming a failed endpoint.

    ``rule`` is a stable name: ``plaintext_downgrade``, ``endpoint_recently_failed``
    (the hint names an endpoint in its failure backoff at an epoch not above the
    one it failed at; see :meth:`LeaderCache.record_failure`) or the
    :class:`~leaderwatch.hint.MalformedHint` rule; ``reason`` says it in words.
    """

    __match_args__ = ("reason",)
    reason: str
    rule: str


class Stale(FrozenValue):
    """The hint cannot outrank the cached leader; the cache is untouched."""

    __match_args__ = ("endpoint", "epoch")
    endpoint: Endpoint
    epoch: Epoch | None = None


HintOutcome = Follow | NoLeaderYet | Rejected | Stale
"""What :meth:`LeaderCache.classify` made of a hint."""


class LeaderCacheStats(BaseModel):
    """What a :class:`LeaderCache` did, as a snapshot."""

    model_config = ConfigDict(frozen=True)

    accepted: int
    """Updates (hints and success reports) that were written."""
    refused: dict[str, int]
    """Updates refused by the cache rules, by reason (see :data:`REFUSAL_REASONS`)."""
    rejected: dict[str, int]
    """Hints rejected by :meth:`LeaderCache.classify` before the cache, by rule."""
    schemes_stripped: int
    """Wire hints whose ``https://`` (or, without TLS, ``http://``) prefix was removed."""
    failures: int = 0
    """Endpoint failures reported through :meth:`LeaderCache.record_failure`."""
    moves: int = 0
    """Times the cached leader changed: another endpoint or epoch, or one where none was fresh."""
    gave_up: dict[str, int] = {}
    """Logical requests given up, by reason (see :meth:`LeaderCache.record_give_up`)."""


class _Entry(NamedTuple):
    endpoint: str
    epoch: int | None
    seated_at: float


class _Failure:
    """One endpoint's failure record; mutated only under the cache's lock."""

    __slots__ = ("backoff", "epoch", "until")

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.epoch: int | None = None
        self.until = -math.inf


def _checked_epoch(epoch: int | None) -> int | None:
    return None if epoch is None else check_epoch(epoch)


class LeaderCache:
    """A client's cached leader, moved only by hints and success reports that outrank it.

    Rules, applied atomically by :meth:`compare_and_set_leader` (a hint) and
    :meth:`record_success` (a reply from ``endpoint`` at ``epoch``):

    - no entry, or an entry older than ``ttl`` seconds: accept (this also
      resets the epoch floor);
    - same endpoint: accept, refresh its age, keep the higher epoch (a known
      epoch is never replaced by ``None``);
    - different endpoint, fresh entry, both epochs known: accept when
      incoming >= cached;
    - cached epoch known, incoming ``None``: a hint is accepted only for an
      endpoint in ``endpoints``; a success report is not;
    - cached epoch ``None``: a hint is accepted (an epoch-less one only for
      an endpoint in ``endpoints``), a success report from a different
      endpoint is not;
    - always: an incoming known epoch below the floor (the highest epoch
      accepted since the last expiry) is refused;
    - before all of these, a hint naming an endpoint in its failure backoff
      (see :meth:`record_failure`) is refused unless its epoch is above the
      epoch that endpoint failed at; a success report from it is accepted
      and ends its backoff.

    ``endpoints`` (the operator's configuration) must be scheme-less
    ``host:port`` values (:class:`~leaderwatch.state.InvalidEndpoint`
    otherwise); duplicates are dropped. Every endpoint this cache is given
    (hints, successes, failures) that names a configured node in another
    spelling (:func:`~leaderwatch.state.same_endpoint`: ``NODE-A:1`` for
    ``node-a:1``, ``[::ffff:10.0.0.7]:9000`` for ``10.0.0.7:9000``) is taken
    in its configured spelling, so one node is one entry. ``failure_backoff`` is how long, in
    seconds, an endpoint stays demoted after its first failure; each further
    failure doubles it up to ``failure_backoff_max``. ``clock`` returns
    seconds and is only compared against itself.
    """

    __slots__ = (
        "__weakref__",
        "_accepted",
        "_clock",
        "_configured",
        "_endpoints",
        "_entry",
        "_failure_backoff",
        "_failure_backoff_max",
        "_failure_count",
        "_failures",
        "_floor",
        "_gave_up",
        "_lock",
        "_moves",
        "_offset",
        "_refused",
        "_rejected",
        "_schemes_stripped",
        "_spellings",
        "_tls_required",
        "_ttl",
    )

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        tls_required: bool = False,
        ttl: float = 30.0,
        failure_backoff: float = 1.0,
        failure_backoff_max: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(endpoints, str | bytes):
            raise TypeError("endpoints must be a collection of 'host:port' strings, not a string")
        configured: list[str] = []
        for endpoint in endpoints:
            parse_endpoint(endpoint)
            if endpoint not in configured:
                configured.append(endpoint)
        if not configured:
            raise ValueError("LeaderCache needs at least one configured endpoint")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise TypeError(f"ttl must be a number of seconds (got {type(ttl).__name__})")
        if math.isnan(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds (got {ttl})")
        for name, value in (
            ("failure_backoff", failure_backoff),
            ("failure_backoff_max", failure_backoff_max),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds (got {type(value).__name__})")
            if not 0 < value < math.inf:
                raise ValueError(
                    f"{name} must be a positive, finite number of seconds (got {value})"
                )
        if failure_backoff_max < failure_backoff:
            raise ValueError(
                f"failure_backoff_max ({failure_backoff_max}) must not be below "
                f"failure_backoff ({failure_backoff})"
            )
        self._endpoints: tuple[str, ...] = tuple(configured)
        self._configured = frozenset(configured)
        self._spellings = {_canonical(endpoint): endpoint for endpoint in reversed(configured)}
        self._tls_required = tls_required
        self._ttl = float(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._entry: _Entry | None = None
        self._floor: int | None = None
        self._failure_backoff = float(failure_backoff)
        self._failure_backoff_max = float(failure_backoff_max)
        self._failures: dict[str, _Failure] = {}
        self._failure_count = 0
        self._offset = (rng if rng is not None else random.Random()).randrange(len(configured))
        self._accepted = 0
        self._refused: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._schemes_stripped = 0
        self._moves = 0
        self._gave_up: dict[str, int] = {}
        _registry.track("client", self, ",".join(configured))

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The operator-configured endpoints, in configuration order."""
        return self._endpoints

    @property
    def tls_required(self) -> bool:
        """Whether ``http://`` wire hints are refused as a transport downgrade."""
        return self._tls_required

    @property
    def cached_leader(self) -> CachedLeader | None:
        """The cached leader, or ``None`` if there is none or it is older than ``ttl``."""
        with self._lock:
            entry = self._fresh_entry(self._clock())
        return None if entry is None else CachedLeader(entry.endpoint, entry.epoch)

    @property
    def stats(self) -> LeaderCacheStats:
        """Counts of accepted, refused and rejected updates."""
        with self._lock:
            return LeaderCacheStats(
                accepted=self._accepted,
                refused=dict(self._refused),
                rejected=dict(self._rejected),
                schemes_stripped=self._schemes_stripped,
                failures=self._failure_count,
                moves=self._moves,
                gave_up=dict(self._gave_up),
            )

    def _fresh_entry(self, now: float) -> _Entry | None:
        entry = self._entry
        if entry is None or now - entry.seated_at > self._ttl:
            return None
        return entry

    def _valid(self, endpoint: str) -> str:
        """``endpoint`` in its configured spelling if valid, else raise."""
        if type(endpoint) is str:
            entry = self._entry
            if endpoint in self._configured or (entry is not None and endpoint == entry.endpoint):
                return endpoint
        return self._as_configured(parse_endpoint(endpoint))

    def _as_configured(self, endpoint: str) -> str:
        """A valid ``endpoint`` in its configured spelling, when it names a configured node."""
        if endpoint in self._configured:
            return endpoint
        return self._spellings.get(_canonical(endpoint), endpoint)

    def compare_and_set_leader(self, endpoint: str, epoch: int | None) -> bool:
        """Offer a leader hint; return whether it was accepted (the cache now holds ``endpoint``).

        Raises :class:`~leaderwatch.state.InvalidEndpoint` or
        :class:`~leaderwatch.state.InvalidEpoch` for an invalid argument;
        wire input goes through :meth:`classify` instead.
        """
        seated = self._update(self._valid(endpoint), _checked_epoch(epoch), hint=True)
        return not isinstance(seated, str)

    def record_success(self, endpoint: str, epoch: int | None) -> bool:
        """Report a reply from ``endpoint`` at ``epoch``; return whether it was accepted.

        A reply proves ``endpoint`` alive: its failure backoff, if any, ends
        whether or not the update is accepted.
        """
        seated = self._update(self._valid(endpoint), _checked_epoch(epoch), hint=False)
        return not isinstance(seated, str)

    def record_failure(self, endpoint: str) -> None:
        """Report that ``endpoint`` refused a connection, timed out or dropped a request.

        For a backoff of ``failure_backoff`` seconds (doubling with each
        further failure, up to ``failure_backoff_max``; the doubling starts
        over once the endpoint has been quiet for ``failure_backoff_max``):

        - :meth:`worklist` puts ``endpoint`` last, even when it is the cached
          leader (the entry and its epoch stay, so stale hints stay refused);
        - a hint naming ``endpoint`` at an epoch not above the epoch it failed
          at (the cached leader's epoch if ``endpoint`` was the cached leader
          at one of its failures), or without epoch, is refused with reason
          ``endpoint_recently_failed``; a hint at a higher epoch is a new term
          and is accepted, which ends the backoff.

        A success reported for ``endpoint`` ends the backoff at once. Raises
        :class:`~leaderwatch.state.InvalidEndpoint` for an invalid endpoint.
        """
        endpoint = self._valid(endpoint)
        with self._lock:
            now = self._clock()
            failure = self._failures.get(endpoint)
            if failure is None or now - failure.until > self._failure_backoff_max:
                if len(self._failures) >= _MAX_FAILURE_RECORDS:
                    self._forget_quiet_failures(now)
                failure = self._failures[endpoint] = _Failure(
                    Backoff(self._failure_backoff, self._failure_backoff_max)
                )
            entry = self._fresh_entry(now)
            was_leader = entry is not None and entry.endpoint == endpoint
            cached_epoch = entry.epoch if entry is not None and was_leader else None
            if cached_epoch is not None and (failure.epoch is None or cached_epoch > failure.epoch):
                failure.epoch = cached_epoch
            backoff = failure.backoff.next_delay()
            failure.until = now + backoff
            self._failure_count += 1
            failed_epoch = failure.epoch
        _log.info(
            "leader_endpoint_failed",
            endpoint=endpoint,
            epoch=failed_epoch,
            backoff_s=backoff,
            was_cached_leader=was_leader,
        )

    def record_give_up(self, reason: str) -> None:
        """Count one logical request given up by a client using this cache (``stats.gave_up``).

        ``reason`` is a stable name (:class:`~leaderwatch.retry.AttemptPlan`
        reports ``deadline_exceeded``, ``max_redirects_exceeded`` or
        ``outcome_unknown``); keep the set of names small, they become metric labels.
        """
        with self._lock:
            self._gave_up[reason] = self._gave_up.get(reason, 0) + 1

    def _forget_quiet_failures(self, now: float) -> None:
        horizon = self._failure_backoff_max
        for endpoint in [e for e, f in self._failures.items() if now - f.until > horizon]:
            del self._failures[endpoint]

    def _update(self, endpoint: str, epoch: int | None, *, hint: bool) -> _Entry | str:
        """Seat ``endpoint`` and return the new entry, or return the refusal reason."""
        with self._lock:
            now = self._clock()
            entry = self._fresh_entry(now)
            refusal = self._failure_refusal(endpoint, epoch, now, hint=hint)
            if refusal is None:
                if entry is None:
                    seated = self._entry = _Entry(endpoint, epoch, now)
                    self._floor = epoch
                    self._accepted += 1
                    self._moves += 1
                    self._forgive(endpoint, epoch)
                    return seated
                refusal = self._refusal(entry, endpoint, epoch, hint=hint)
                if refusal is None:
                    if endpoint == entry.endpoint and entry.epoch is not None:
                        epoch = entry.epoch if epoch is None else max(entry.epoch, epoch)
                    seated = self._entry = _Entry(endpoint, epoch, now)
                    if epoch is not None and (self._floor is None or epoch > self._floor):
                        self._floor = epoch
                    self._accepted += 1
                    if endpoint != entry.endpoint or epoch != entry.epoch:
                        self._moves += 1
                    self._forgive(endpoint, epoch)
                    return seated
            self._refused[refusal] = self._refused.get(refusal, 0) + 1
            floor = self._floor
        _log.info(
            "leader_cache_update_refused",
            reason=refusal,
            source="hint" if hint else "success",
            endpoint=endpoint,
            epoch=epoch,
            cached_endpoint=None if entry is None else entry.endpoint,
            cached_epoch=None if entry is None else entry.epoch,
            floor=floor,
        )
        return refusal

    def _failure_refusal(
        self, endpoint: str, epoch: int | None, now: float, *, hint: bool
    ) -> str | None:
        if not self._failures:
            return None
        failure = self._failures.get(endpoint)
        if failure is None:
            return None
        if not hint:
            del self._failures[endpoint]  # A reply proves it alive.
            return None
        if now < failure.until and (
            epoch is None or (failure.epoch is not None and epoch <= failure.epoch)
        ):
            return "endpoint_recently_failed"
        return None

    def _forgive(self, endpoint: str, epoch: int | None) -> None:
        """A hint seated ``endpoint`` at a term newer than its failure: its backoff ends."""
        if not self._failures or epoch is None:
            return
        failure = self._failures.get(endpoint)
        if failure is not None and (failure.epoch is None or epoch > failure.epoch):
            del self._failures[endpoint]

    def _refusal(
        self, entry: _Entry, endpoint: str, epoch: int | None, *, hint: bool
    ) -> str | None:
        floor = self._floor
        if epoch is not None and floor is not None and epoch < floor:
            if endpoint == entry.endpoint and entry.epoch is not None:
                return None  # Accepted: keeps the (higher) cached epoch.
            return "epoch_below_floor" if entry.epoch is None else "epoch_below_cached"
        if endpoint == entry.endpoint:
            return None
        if entry.epoch is not None:
            if epoch is not None:
                return None if epoch >= entry.epoch else "epoch_below_cached"
            if not hint:
                return "epochless_success_over_known_epoch"
        if not hint:
            return "success_to_other_endpoint_over_epochless"
        if epoch is None and endpoint not in self._configured:
            return "epochless_hint_to_unconfigured_endpoint"
        return None

    def rejects_plaintext_hint(self, endpoint: str) -> bool:
        """Whether a wire hint's endpoint is refused as a transport downgrade.

        True only with ``tls_required`` and an endpoint beginning ``http://``
        (case-insensitively); ``https://`` and bare ``host:port`` pass.
        Configured endpoints are scheme-less, so they always pass.
        """
        return self._tls_required and _PLAINTEXT.match(endpoint) is not None

    def classify(self, hint: LeaderHint | MalformedHint | None) -> HintOutcome:
        """Decide what a redirect's hint means, seating the cache when it outranks it.

        - ``None``, or a hint without endpoint: :class:`NoLeaderYet` (retry
          with backoff); the cache is untouched.
        - A wire endpoint beginning ``http://`` under ``tls_required``:
          ``Rejected(rule="plaintext_downgrade")``.
        - A wire endpoint of the form ``https://host:port`` (or
          ``http://host:port`` without ``tls_required``): the scheme is
          removed and ``host:port`` is offered to the cache. Anything else
          that is not a valid scheme-less endpoint: ``Rejected`` with the
          rule broken.
        - Otherwise the hint goes through :meth:`compare_and_set_leader`:
          :class:`Follow` with the seated leader if accepted;
          ``Rejected(rule="endpoint_recently_failed")`` if it names an
          endpoint in its failure backoff (see :meth:`record_failure`; counted
          under ``stats.refused``, logged as ``leader_cache_update_refused``);
          else :class:`Stale` with the hint's endpoint and epoch.
        """
        match hint:
            case None:
                return NoLeaderYet()
            case MalformedHint(rule=rule, reason=reason, wire_endpoint=wire, leader_epoch=epoch):
                if wire is not None and self.rejects_plaintext_hint(wire):
                    return self._reject(
                        "plaintext_downgrade",
                        f"http:// hint refused under tls_required (got {wire[:80]!r})",
                    )
                stripped = self._strip_scheme(wire) if rule == "endpoint_has_scheme" else None
                if stripped is None:
                    return self._reject(rule, reason)
                endpoint = stripped
            case LeaderHint(leader_endpoint=None, leader_epoch=epoch):
                return NoLeaderYet(leader_epoch=epoch)
            case LeaderHint(leader_endpoint=str() as endpoint, leader_epoch=epoch):
                pass
            case _:
                raise TypeError(
                    "classify() takes a LeaderHint, a MalformedHint or None "
                    f"(got {type(hint).__name__})"
                )
        endpoint = self._as_configured(endpoint)
        seated = self._update(endpoint, epoch, hint=True)
        if seated == "endpoint_recently_failed":
            return self._recently_failed(endpoint, epoch)
        if isinstance(seated, str):
            return Stale(endpoint=endpoint, epoch=epoch)
        return Follow(endpoint=seated.endpoint, epoch=seated.epoch)

    def _recently_failed(self, endpoint: str, epoch: int | None) -> Rejected:
        """The outcome for a hint refused as ``endpoint_recently_failed`` (already counted)."""
        with self._lock:
            failure = self._failures.get(endpoint)
            now = self._clock()
        remaining = 0.0 if failure is None else max(failure.until - now, 0.0)
        failed_epoch = None if failure is None else failure.epoch
        shown_epoch = "unknown" if epoch is None else str(epoch)
        at = "an unknown epoch" if failed_epoch is None else f"epoch {failed_epoch}"
        return Rejected(
            rule="endpoint_recently_failed",
            reason=(
                f"hint names {endpoint} at epoch {shown_epoch}, but {endpoint} failed at {at}; "
                f"only a higher epoch is followed for the next {remaining:.3f} s"
            ),
        )

    def _strip_scheme(self, wire: str | None) -> str | None:
        if wire is None:
            return None
        prefix = _STRIPPABLE.match(wire)
        if prefix is None:
            return None
        bare = wire[prefix.end() :]
        try:
            parse_endpoint(bare)
        except InvalidEndpoint:
            return None
        with self._lock:
            self._schemes_stripped += 1
        return bare

    def _reject(self, rule: str, reason: str) -> Rejected:
        with self._lock:
            self._rejected[rule] = self._rejected.get(rule, 0) + 1
        level = _log.warning if rule == "plaintext_downgrade" else _log.info
        level("leader_hint_rejected", rule=rule, reason=reason)
        return Rejected(reason=reason, rule=rule)

    def worklist(self) -> list[str]:
        """Endpoints to try, in order: the fresh cached leader, then every configured one.

        Configured endpoints come round-robin: each call starts one further
        along, from a random first offset. No endpoint appears twice.
        Endpoints in their failure backoff (see :meth:`record_failure`),
        the cached leader included, come last, in the same order.
        """
        with self._lock:
            now = self._clock()
            entry = self._fresh_entry(now)
            offset = self._offset
            self._offset = (offset + 1) % len(self._endpoints)
            failing = (
                frozenset(e for e, f in self._failures.items() if now < f.until)
                if self._failures
                else frozenset()
            )
        rotated = self._endpoints[offset:] + self._endpoints[:offset]
        if entry is None:
            ordered = list(rotated)
        else:
            ordered = [entry.endpoint, *(e for e in rotated if e != entry.endpoint)]
        if not failing:
            return ordered
        return [e for e in ordered if e not in failing] + [e for e in ordered if e in failing]
