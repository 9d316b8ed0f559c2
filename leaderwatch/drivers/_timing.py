"""One timing model for drivers that hold a lease (etcd, PostgreSQL)."""

from __future__ import annotations

import math
from typing import Final

from pydantic import model_validator

from leaderwatch._backoff import Backoff
from leaderwatch._value import FrozenValue

__all__ = ["LeaseTiming"]

_MAX_BACKOFF: Final = 1.0
_MAX_RESIGN_WAIT: Final = 1.0
_FIRST_BACKOFF: Final = 0.05
_MAX_RENEW_RETRY: Final = 0.1


class LeaseTiming(FrozenValue):
    """Every duration a lease-holding driver uses, derived from ``ttl`` and ``margin``.

    The bounds, all in seconds on this process's monotonic clock:

    - ``ttl``: the lease the store grants; the store deletes a candidate's
      key ``ttl`` after its last renewal arrived (on the store's clock).
    - ``margin`` (default ``max(0.5, ttl / 5)``, in ``(0, ttl)``): how much
      earlier than the store this node gives up.
    - :attr:`proof_window` = ``ttl - margin``: a leader shows ``Leader`` only
      until ``proof_window`` after *sending* the last renewal the store
      acknowledged. Measuring from the send, never from the reply, makes
      the bound hold without trusting the two clocks to agree: the store
      started its ``ttl`` after the send arrived, so this node stops at least
      ``margin`` before the store can hand the lease to anyone else.
    - :attr:`renew_interval` = ``proof_window / 3``: a renewal is sent that
      often, so one lost reply costs nothing.
    - :attr:`renew_retry` = ``min(0.1, renew_interval / 4)``: after a
      renewal failed, the next one is sent that much later (at once when
      the endpoint in use changed since it was sent).
    - :attr:`call_timeout` = :attr:`renew_interval`: every request to the
      store gets that long; a silent store is noticed within one interval.
      A watch that saw nothing for that long is re-armed, and a driver that
      heard nothing for :attr:`proof_window` waits that long more before it
      tries another endpoint (a driver tries one at once when a request
      finds the endpoint unreachable).
    - :attr:`renewal_patience` = ``call_timeout / 2``: a leader with several
      endpoints tries another one when a renewal has had no answer for that
      long (the renewal keeps its own deadline), so that a frozen endpoint
      leaves time to renew elsewhere before the proof runs out.
    - :attr:`resign_wait` = ``min(1, renew_interval)``: the bound on a
      resign or revoke at shutdown, so leaving never hangs on a dead store.
    - :meth:`backoff`: retries start at 50 ms and double up to
      ``min(1, renew_interval)``.
    - An observer that hears nothing from the store for :attr:`proof_window`
      publishes ``Unknown()``.
    """

    ttl: int
    margin: float

    @model_validator(mode="after")
    def _check(self) -> LeaseTiming:
        ttl, margin = self.ttl, self.margin
        if isinstance(ttl, bool) or ttl < 1:
            raise ValueError(f"ttl must be an integer number of seconds >= 1 (got {ttl!r})")
        if not (math.isfinite(margin) and 0 < margin < ttl):
            raise ValueError(
                f"margin must be a number of seconds in (0, ttl={ttl}) (got {margin!r})"
            )
        return self

    @classmethod
    def of(cls, ttl: int, margin: float | None = None) -> LeaseTiming:
        """Build from a driver's ``ttl`` and ``margin`` arguments; ``ValueError`` names the rule."""
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be an integer number of seconds >= 1 (got {ttl!r})")
        chosen = max(0.5, ttl / 5) if margin is None else margin
        if not (
            isinstance(chosen, int | float)
            and not isinstance(chosen, bool)
            and math.isfinite(chosen)
            and 0 < chosen < ttl
        ):
            raise ValueError(
                f"margin must be a number of seconds in (0, ttl={ttl}) (got {chosen!r})"
            )
        return cls(ttl=ttl, margin=float(chosen))

    @property
    def proof_window(self) -> float:
        """How long after sending an acknowledged renewal this node may act as leader."""
        return self.ttl - self.margin

    @property
    def renew_interval(self) -> float:
        """How often the lease is renewed (three renewals per proof window)."""
        return self.proof_window / 3

    @property
    def renew_retry(self) -> float:
        """How long after a failed renewal the next one is sent."""
        return min(_MAX_RENEW_RETRY, self.renew_interval / 4)

    @property
    def call_timeout(self) -> float:
        """The deadline of one request to the store."""
        return self.renew_interval

    @property
    def renewal_patience(self) -> float:
        """How long a leader waits for a renewal's answer before it tries another endpoint."""
        return self.call_timeout / 2

    @property
    def resign_wait(self) -> float:
        """The bound on resigning or revoking at shutdown."""
        return min(_MAX_RESIGN_WAIT, self.renew_interval)

    def proven_until(self, sent: float, granted_ttl: float | None = None) -> float:
        """Until when a renewal sent at ``sent`` proves the lease (``granted_ttl`` if shorter)."""
        ttl = self.ttl if granted_ttl is None else min(self.ttl, granted_ttl)
        return sent + ttl - self.margin

    def backoff(self) -> Backoff:
        """A fresh retry backoff: 50 ms doubling up to ``min(1, renew_interval)``."""
        cap = min(_MAX_BACKOFF, self.renew_interval)
        return Backoff(min(_FIRST_BACKOFF, cap), cap)
