"""The client's leader cache: which node to call, and which redirects to trust (DESIGN contract 10).

:class:`LeaderCache` holds at most one cached leader ``(endpoint, epoch)``
and changes it only through one atomic check-and-write per hint or success
report, so a stale node's redirect can never walk a client backwards. It
is thread-safe (each method holds a lock for its check-and-write and never
blocks otherwise), so sync clients and async clients can share it.

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

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.hint import LeaderHint, MalformedHint, NoLeaderYet
from leaderwatch.state import (
    Endpoint,
    Epoch,
    InvalidEndpoint,
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
    "success_to_other_endpoint_over_epochless",
)
"""Why :meth:`LeaderCache.compare_and_set_leader` / :meth:`~LeaderCache.record_success`
refused an update (logged as ``leader_cache_update_refused``)."""

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
    """The hint was refused before reaching the cache (malformed, or a transport downgrade).

    ``rule`` is a stable name (``plaintext_downgrade`` or the
    :class:`~leaderwatch.hint.MalformedHint` rule); ``reason`` says it in words.
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


class _Entry(NamedTuple):
    endpoint: str
    epoch: int | None
    seated_at: float


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
      endpoint in ``endpoints`` (exact match); a success report is not;
    - cached epoch ``None``: a hint is accepted (an epoch-less one only for
      an endpoint in ``endpoints``), a success report from a different
      endpoint is not;
    - always: an incoming known epoch below the floor (the highest epoch
      accepted since the last expiry) is refused.

    ``endpoints`` (the operator's configuration) must be scheme-less
    ``host:port`` values (:class:`~leaderwatch.state.InvalidEndpoint`
    otherwise); duplicates are dropped. ``clock`` returns seconds and is
    only compared against itself.
    """

    __slots__ = (
        "_accepted",
        "_clock",
        "_configured",
        "_endpoints",
        "_entry",
        "_floor",
        "_lock",
        "_offset",
        "_refused",
        "_rejected",
        "_schemes_stripped",
        "_tls_required",
        "_ttl",
    )

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        tls_required: bool = False,
        ttl: float = 30.0,
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
        self._endpoints: tuple[str, ...] = tuple(configured)
        self._configured = frozenset(configured)
        self._tls_required = tls_required
        self._ttl = float(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._entry: _Entry | None = None
        self._floor: int | None = None
        self._offset = (rng if rng is not None else random.Random()).randrange(len(configured))
        self._accepted = 0
        self._refused: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._schemes_stripped = 0

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
            )

    def _fresh_entry(self, now: float) -> _Entry | None:
        entry = self._entry
        if entry is None or now - entry.seated_at > self._ttl:
            return None
        return entry

    def compare_and_set_leader(self, endpoint: str, epoch: int | None) -> bool:
        """Offer a leader hint; return whether it was accepted (the cache now holds ``endpoint``).

        Raises :class:`~leaderwatch.state.InvalidEndpoint` or
        :class:`~leaderwatch.state.InvalidEpoch` for an invalid argument;
        wire input goes through :meth:`classify` instead.
        """
        return self._update(parse_endpoint(endpoint), _checked_epoch(epoch), hint=True) is not None

    def record_success(self, endpoint: str, epoch: int | None) -> bool:
        """Report a reply from ``endpoint`` at ``epoch``; return whether it was accepted."""
        return self._update(parse_endpoint(endpoint), _checked_epoch(epoch), hint=False) is not None

    def _update(self, endpoint: str, epoch: int | None, *, hint: bool) -> _Entry | None:
        with self._lock:
            now = self._clock()
            entry = self._fresh_entry(now)
            if entry is None:
                seated = self._entry = _Entry(endpoint, epoch, now)
                self._floor = epoch
                self._accepted += 1
                return seated
            refusal = self._refusal(entry, endpoint, epoch, hint=hint)
            if refusal is None:
                if endpoint == entry.endpoint and entry.epoch is not None:
                    epoch = entry.epoch if epoch is None else max(entry.epoch, epoch)
                seated = self._entry = _Entry(endpoint, epoch, now)
                if epoch is not None and (self._floor is None or epoch > self._floor):
                    self._floor = epoch
                self._accepted += 1
                return seated
            self._refused[refusal] = self._refused.get(refusal, 0) + 1
            floor = self._floor
        _log.info(
            "leader_cache_update_refused",
            reason=refusal,
            source="hint" if hint else "success",
            endpoint=endpoint,
            epoch=epoch,
            cached_endpoint=entry.endpoint,
            cached_epoch=entry.epoch,
            floor=floor,
        )
        return None

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
          :class:`Follow` with the seated leader if accepted, else
          :class:`Stale` with the hint's endpoint and epoch.
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
        seated = self._update(endpoint, epoch, hint=True)
        if seated is None:
            return Stale(endpoint=endpoint, epoch=epoch)
        return Follow(endpoint=seated.endpoint, epoch=seated.epoch)

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
        """
        with self._lock:
            entry = self._fresh_entry(self._clock())
            offset = self._offset
            self._offset = (offset + 1) % len(self._endpoints)
        rotated = self._endpoints[offset:] + self._endpoints[:offset]
        if entry is None:
            return list(rotated)
        return [entry.endpoint, *(e for e in rotated if e != entry.endpoint)]
