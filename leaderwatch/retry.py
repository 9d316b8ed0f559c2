"""One attempt loop for leader-aware clients, whatever the wire (DESIGN contracts 10 and 12).

A logical request (one call of the user's client) becomes a series of
*attempts*, each sent to one endpoint. What to try next, how long to wait
and when to stop is decided here, once, by a sans-IO planner; the HTTP
transports (:mod:`leaderwatch.httpx`) and any other client (gRPC, a custom
protocol) are thin drivers that only send bytes and classify what came back.

- :class:`RetryPolicy` — the limits of one logical request: ``deadline``
  across all attempts, ``attempt_timeout`` per attempt, ``max_redirects``
  followed hops, and the jittered backoff between rounds.
- :class:`AttemptPlan` — the planner. :meth:`~AttemptPlan.start` gives the
  first :class:`Attempt` (endpoint, delay before it, time it may take);
  :meth:`~AttemptPlan.after` takes that attempt's :data:`Outcome` and gives
  the next :class:`Attempt`, :data:`DONE`, or :class:`GaveUp` (why, and a
  record of every attempt). It drives the :class:`~leaderwatch.client.LeaderCache`:
  redirects go through ``classify``, served epochs through ``record_success``,
  refused or timed-out endpoints through ``record_failure``.
- :func:`run_attempts` / :func:`run_attempts_sync` — the loop itself, for a
  driver that can express "send one attempt" as a function.

A driver classifies each attempt into one :data:`Outcome`:

=====================================  ============================================
What came back                         Outcome
=====================================  ============================================
an answer to return to the caller      ``Served(epoch)`` (epoch from the reply, if any)
a redirect carrying a leader hint      ``Redirected(hint)`` (what the hint parsers return)
"no leader yet, retry"                 ``NoLeader(retry_after, epoch)``
nothing reached the server             ``ConnectFailed(error)`` (refused, DNS, connect reset)
the attempt's time ran out             ``TimedOut(sent, error)``; ``sent=False`` only when
                                       the driver knows no byte of the request left
bytes sent, then the connection broke  ``SentButNoResponse(error)``
=====================================  ============================================

Retries never duplicate silently: a redirect, a "no leader" reply or a
failed connection means the request was not processed, so it is always
retried. ``SentButNoResponse`` and ``TimedOut(sent=True)`` mean it may have
been: the plan retries them only when the driver declared the request
``safe_to_resend`` (idempotent, or carrying an idempotency key), and
otherwise gives up with reason ``outcome_unknown``.

Writing a driver for another protocol (the gRPC client does exactly this)::

    plan = AttemptPlan(cache, policy, safe_to_resend=idempotent)
    result = await run_attempts(plan, send_one)  # or the loop below, by hand

    step = plan.start()
    while isinstance(step, Attempt):
        await anyio.sleep(step.delay)
        outcome, reply = await send_to(step.endpoint, timeout=step.timeout)
        step = plan.after(outcome)
    if isinstance(step, GaveUp):
        raise MyProtocolError(step.message)
    return reply  # step is DONE: reply is the served answer

This module imports only the core (:mod:`leaderwatch.client` and below) and anyio.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal, NamedTuple, TypeVar, cast

import anyio
from pydantic import Field, model_validator

from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.client import Follow, LeaderCache, NoLeaderYet, Rejected, Stale
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import LeaderHint, MalformedHint
from leaderwatch.state import Endpoint, Epoch

__all__ = [
    "DONE",
    "Attempt",
    "AttemptPlan",
    "AttemptRecord",
    "ConnectFailed",
    "Done",
    "GaveUp",
    "GaveUpError",
    "NoLeader",
    "Outcome",
    "Redirected",
    "RetryPolicy",
    "SentButNoResponse",
    "Served",
    "TimedOut",
    "error_text",
    "run_attempts",
    "run_attempts_sync",
]

_log = get_logger("leaderwatch.retry")

_T = TypeVar("_T")

_MAX_ERROR_TEXT: Final = 200


class RetryPolicy(FrozenValue):
    """The limits of one logical request, shared by every leader-aware client.

    All durations are seconds. Between rounds (once every endpoint of the
    worklist was tried) and after a "no leader yet" reply, the plan waits a
    backoff that starts at ``backoff_initial`` and grows by
    ``backoff_multiplier`` up to ``backoff_maximum``; each wait is drawn
    from ``[d * (1 - jitter), d]`` so clients do not retry in lockstep. A
    server's suggested retry-after is honoured when it is longer, but never
    past the deadline.
    """

    deadline: float = Field(default=10.0, gt=0)
    """Time for the whole logical request, across all attempts and waits (``math.inf``: none)."""
    attempt_timeout: float = Field(default=2.0, gt=0)
    """Time one attempt may take (until its reply's head arrives), so a frozen node costs one."""
    max_redirects: int = Field(default=8, ge=0)
    """Redirects followed per logical request; one more gives up (``max_redirects_exceeded``)."""
    backoff_initial: float = Field(default=0.05, gt=0, allow_inf_nan=False)
    backoff_maximum: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    backoff_multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    jitter: float = Field(default=0.5, ge=0, le=1)
    """Fraction of each backoff wait that is randomised (0: none, 1: full jitter)."""

    @model_validator(mode="after")
    def _backoff_bounds(self) -> RetryPolicy:
        if self.backoff_initial > self.backoff_maximum:
            raise ValueError(
                f"backoff_initial ({self.backoff_initial}) must not exceed "
                f"backoff_maximum ({self.backoff_maximum})"
            )
        if math.isnan(self.deadline) or math.isnan(self.attempt_timeout):
            raise ValueError("deadline and attempt_timeout must be numbers, not NaN")
        return self


_DEFAULT_POLICY: Final = RetryPolicy()


# --- what an attempt got --------------------------------------------------------------------


class Served(FrozenValue):
    """The reply is the answer: hand it to the caller. ``epoch``: the served epoch, if it said."""

    __match_args__ = ("epoch",)
    epoch: Epoch | None = None


class Redirected(FrozenValue):
    """The node redirected with a leader hint (as returned by the hint parsers)."""

    __match_args__ = ("hint",)
    hint: LeaderHint | MalformedHint


class NoLeader(FrozenValue):
    """The node knows no leader yet; retry after ``retry_after`` seconds if it suggested one."""

    __match_args__ = ("retry_after", "epoch")
    retry_after: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    epoch: Epoch | None = None


class ConnectFailed(FrozenValue):
    """No byte of the request reached the node (refused, unreachable, connect reset)."""

    __match_args__ = ("error",)
    error: str = ""


class TimedOut(FrozenValue):
    """The attempt's time ran out. ``sent=False`` only if no byte of the request left."""

    __match_args__ = ("sent", "error")
    sent: bool = True
    error: str = ""


class SentButNoResponse(FrozenValue):
    """The request (or part of it) was sent, then the connection broke before a reply."""

    __match_args__ = ("error",)
    error: str = ""


Outcome = Served | Redirected | NoLeader | ConnectFailed | TimedOut | SentButNoResponse
"""What one attempt got, as classified by the driver."""


# --- what the plan says ---------------------------------------------------------------------


class Attempt(NamedTuple):
    """Send the request to ``endpoint`` after waiting ``delay`` seconds; give it ``timeout``.

    ``number`` counts attempts from 1; an attempt with ``number > 1`` re-sends
    the request, so its body must be replayable. (A named tuple, not a
    model: one is built per attempt on the hot path.)
    """

    number: int
    endpoint: str
    delay: float
    timeout: float


class Done(FrozenValue):
    """The last attempt was served: return its reply. The one instance is :data:`DONE`."""


DONE: Final = Done()


Decision = Literal[
    "served",
    "followed",
    "hint_stale",
    "hint_rejected",
    "no_leader",
    "endpoint_failed",
    "outcome_unknown",
    "max_redirects_exceeded",
]


class AttemptRecord(FrozenValue):
    """One attempt, as the plan saw it.

    ``decision`` is what the plan made of ``outcome`` (a stable name);
    ``detail`` adds the specifics in words (the hint followed, the rule that
    refused it, the wait asked for). ``started`` is seconds since the plan
    started; ``duration`` how long the attempt took.
    """

    number: int
    endpoint: Endpoint
    outcome: Outcome
    decision: Decision
    detail: str = ""
    started: float
    duration: float

    @property
    def summary(self) -> str:
        """One line: endpoint, what it got, what the plan did."""
        text = f"#{self.number} {self.endpoint}: {_describe(self.outcome)}"
        if self.detail:
            text += f" -> {self.detail}"
        return text


GiveUpReason = Literal["deadline_exceeded", "max_redirects_exceeded", "outcome_unknown"]


class GaveUp(FrozenValue):
    """The logical request failed: ``reason`` (stable name), ``message``, every attempt."""

    reason: GiveUpReason
    message: str
    attempts: tuple[AttemptRecord, ...]


class GaveUpError(LeaderwatchError):
    """A leader-aware client gave up on a request; ``.attempts`` says what each attempt got.

    ``reason`` is ``deadline_exceeded``, ``max_redirects_exceeded`` or
    ``outcome_unknown`` (a request that may have been executed was not
    re-sent because it is not safe to resend). Framework adapters raise
    subclasses that also derive from the framework's own error type
    (:class:`leaderwatch.httpx.LeaderUnavailable` is an ``httpx.TransportError``).
    """

    def __init__(self, gave_up: GaveUp, message: str | None = None) -> None:
        super().__init__(gave_up.message if message is None else message)
        self.gave_up = gave_up

    @property
    def reason(self) -> GiveUpReason:
        """Why the request was given up (a stable name)."""
        return self.gave_up.reason

    @property
    def attempts(self) -> tuple[AttemptRecord, ...]:
        """Every attempt, in order."""
        return self.gave_up.attempts


def _describe(outcome: Outcome) -> str:
    match outcome:
        case Served(epoch=epoch):
            return "served" if epoch is None else f"served at epoch {epoch}"
        case Redirected(hint=LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch)):
            return f"redirect to {endpoint or 'no endpoint'}" + (
                "" if epoch is None else f" at epoch {epoch}"
            )
        case Redirected(hint=MalformedHint(rule=rule)):
            return f"redirect with a malformed hint ({rule})"
        case NoLeader(retry_after=retry_after, epoch=epoch):
            text = "no leader yet"
            if epoch is not None:
                text += f" (epoch {epoch})"
            if retry_after is not None:
                text += f", retry after {retry_after:g} s"
            return text
        case ConnectFailed(error=error):
            return f"connection failed ({error})" if error else "connection failed"
        case TimedOut(sent=sent, error=error):
            text = "timed out" + (" after sending" if sent else " before sending")
            return f"{text} ({error})" if error else text
        case SentButNoResponse(error=error):
            text = "request sent, no response"
            return f"{text} ({error})" if error else text
    raise TypeError(f"not an attempt outcome: {type(outcome).__name__}")


def error_text(error: BaseException) -> str:
    """A short ``Type: message`` for an outcome's ``error`` field."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."


class _Pending(NamedTuple):
    number: int
    endpoint: str
    outcome: Outcome
    decision: Decision
    detail: str
    started: float
    duration: float


class AttemptPlan:
    """What to try next for one logical request; sans-IO, one instance per request.

    ``safe_to_resend`` says whether the request may be sent again after its
    bytes may have reached a server (idempotent, or carrying an idempotency
    key). ``clock`` (seconds, compared only with itself) measures the
    deadline; ``rng`` draws the jitter.

    Rules, in :meth:`after`:

    - ``Served``: the served epoch (if any) goes to ``cache.record_success``;
      :data:`DONE`.
    - ``Redirected``: the hint goes to ``cache.classify``. ``Follow`` → the
      next attempt goes to the leader at once (one more redirect; past
      ``max_redirects``: give up). ``Stale`` / ``Rejected`` / ``NoLeaderYet``
      → treated as this endpoint not knowing better: next endpoint.
    - ``NoLeader``: wait the larger of the jittered backoff and the
      server's retry-after, then the next endpoint.
    - ``ConnectFailed``, ``TimedOut``, ``SentButNoResponse``:
      ``cache.record_failure(endpoint)``; then the next endpoint, except
      that a request that may have reached the server (``TimedOut(sent=True)``,
      ``SentButNoResponse``) and is not ``safe_to_resend`` gives up
      (``outcome_unknown``).
    - "Next endpoint" walks one round of ``cache.worklist()`` (fetched at
      the start and again for each new round), skipping endpoints already
      tried in the round, without waiting; when the round is exhausted, the
      plan waits the jittered backoff and starts a new round.
    - Every attempt's ``timeout`` is ``attempt_timeout`` or what is left of
      the deadline after its delay, whichever is smaller; when nothing would
      be left, the plan gives up (``deadline_exceeded``).
    - Giving up is reported to ``cache.record_give_up(reason)``.

    Not thread-safe: one request, one driver. The cache may be shared.
    """

    __slots__ = (
        "_backoff",
        "_cache",
        "_clock",
        "_current",
        "_deadline_at",
        "_issued_at",
        "_policy",
        "_position",
        "_random",
        "_records",
        "_redirects",
        "_round",
        "_safe_to_resend",
        "_started_at",
        "_tried",
    )

    def __init__(
        self,
        cache: LeaderCache,
        policy: RetryPolicy | None = None,
        *,
        safe_to_resend: bool,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._cache = cache
        self._policy = _DEFAULT_POLICY if policy is None else policy
        self._safe_to_resend = safe_to_resend
        self._clock = clock
        self._random = random.random if rng is None else rng.random
        self._backoff: Backoff | None = None
        self._records: list[_Pending] = []
        self._round: list[str] = []
        self._tried: set[str] = set()
        self._position = 0
        self._redirects = 0
        self._current: Attempt | None = None
        self._started_at = math.nan
        self._deadline_at = math.nan
        self._issued_at = math.nan

    @property
    def policy(self) -> RetryPolicy:
        """The policy this plan follows."""
        return self._policy

    @property
    def safe_to_resend(self) -> bool:
        """Whether a request that may have reached a server may be sent again."""
        return self._safe_to_resend

    @property
    def redirects(self) -> int:
        """Redirects followed so far."""
        return self._redirects

    @property
    def attempts(self) -> tuple[AttemptRecord, ...]:
        """Every attempt whose outcome was reported so far, in order."""
        return tuple(AttemptRecord(**record._asdict()) for record in self._records)

    def start(self) -> Attempt:
        """The first attempt: the head of ``cache.worklist()``, at once."""
        if self._current is not None or self._records:
            raise RuntimeError("AttemptPlan.start() was already called; use one plan per request")
        now = self._clock()
        self._started_at = now
        self._deadline_at = now + self._policy.deadline
        self._round = self._cache.worklist()
        self._position = 1
        endpoint = self._round[0]
        self._tried.add(endpoint)
        attempt = Attempt(
            1, endpoint, 0.0, min(self._policy.attempt_timeout, self._policy.deadline)
        )
        self._current = attempt
        self._issued_at = now
        return attempt

    def after(self, outcome: Outcome) -> Attempt | Done | GaveUp:
        """Take the current attempt's outcome; give the next attempt, :data:`DONE` or GaveUp."""
        attempt = self._current
        if attempt is None:
            raise RuntimeError("AttemptPlan.after() needs an attempt: call start() first")
        self._current = None
        now = self._clock()
        endpoint = attempt.endpoint
        match outcome:
            case Served(epoch=epoch):
                if epoch is not None:
                    self._cache.record_success(endpoint, epoch)
                self._record(attempt, outcome, "served", "", now)
                return DONE
            case Redirected(hint=hint):
                return self._after_redirect(attempt, outcome, hint, now)
            case NoLeader(retry_after=retry_after):
                wait = self._backoff_delay()
                detail = ""
                if retry_after is not None and retry_after > wait:
                    wait = retry_after
                    detail = f"waiting {wait:g} s as the server asked"
                self._record(attempt, outcome, "no_leader", detail, now)
                return self._next(now, wait)
            case ConnectFailed() | TimedOut() | SentButNoResponse():
                self._cache.record_failure(endpoint)
                sent = not isinstance(outcome, ConnectFailed) and (
                    not isinstance(outcome, TimedOut) or outcome.sent
                )
                if sent and not self._safe_to_resend:
                    self._record(
                        attempt, outcome, "outcome_unknown", "not re-sent: not safe to resend", now
                    )
                    return self._give_up(
                        "outcome_unknown",
                        f"the request may have reached {endpoint} (it got: {_describe(outcome)}), "
                        "and it is not safe to resend: it was not retried, so it may or may not "
                        "have been executed. Make it idempotent or give it an idempotency key "
                        "to let it be retried",
                        now,
                    )
                self._record(attempt, outcome, "endpoint_failed", "endpoint demoted", now)
                return self._next(now, None)
        raise TypeError(
            f"AttemptPlan.after() takes an attempt outcome (got {type(outcome).__name__})"
        )

    def _after_redirect(
        self, attempt: Attempt, outcome: Redirected, hint: LeaderHint | MalformedHint, now: float
    ) -> Attempt | GaveUp:
        match self._cache.classify(hint):
            case Follow(endpoint=leader, epoch=epoch):
                shown = leader if epoch is None else f"{leader} at epoch {epoch}"
                if self._redirects >= self._policy.max_redirects:
                    self._record(attempt, outcome, "max_redirects_exceeded", shown, now)
                    return self._give_up(
                        "max_redirects_exceeded",
                        f"{self._redirects} redirect(s) followed and {attempt.endpoint} "
                        f"redirects again (to {shown}); max_redirects is "
                        f"{self._policy.max_redirects}",
                        now,
                    )
                self._redirects += 1
                self._record(attempt, outcome, "followed", f"following to {shown}", now)
                self._tried.add(leader)
                return self._issue(leader, 0.0, now)
            case Stale():
                self._record(attempt, outcome, "hint_stale", "not followed: stale", now)
            case Rejected(rule=rule):
                self._record(attempt, outcome, "hint_rejected", f"not followed: {rule}", now)
            case NoLeaderYet():
                self._record(attempt, outcome, "no_leader", "hint names no leader", now)
        return self._next(now, None)

    def _issue(self, endpoint: str, delay: float, now: float) -> Attempt | GaveUp:
        begins = now + delay
        left = self._deadline_at - begins
        if left <= 0:
            return self._give_up(
                "deadline_exceeded",
                f"the deadline of {self._policy.deadline:g} s would pass before the next attempt"
                + (f" (after a wait of {delay:.3f} s)" if delay > 0 else ""),
                now,
            )
        attempt = Attempt(
            len(self._records) + 1, endpoint, delay, min(self._policy.attempt_timeout, left)
        )
        self._current = attempt
        self._issued_at = begins
        return attempt

    def _next(self, now: float, wait: float | None) -> Attempt | GaveUp:
        endpoint = self._next_in_round()
        if endpoint is None:
            self._round = self._cache.worklist()
            self._tried.clear()
            self._position = 1
            endpoint = self._round[0]
            if wait is None:
                wait = self._backoff_delay()
        self._tried.add(endpoint)
        return self._issue(endpoint, 0.0 if wait is None else wait, now)

    def _next_in_round(self) -> str | None:
        round_, tried = self._round, self._tried
        while self._position < len(round_):
            endpoint = round_[self._position]
            self._position += 1
            if endpoint not in tried:
                return endpoint
        return None

    def _backoff_delay(self) -> float:
        policy = self._policy
        if self._backoff is None:
            self._backoff = Backoff(
                policy.backoff_initial, policy.backoff_maximum, policy.backoff_multiplier
            )
        return self._backoff.next_delay() * (1.0 - policy.jitter * self._random())

    def _record(
        self, attempt: Attempt, outcome: Outcome, decision: Decision, detail: str, now: float
    ) -> None:
        started = self._issued_at
        self._records.append(
            _Pending(
                attempt.number,
                attempt.endpoint,
                outcome,
                decision,
                detail,
                started - self._started_at,
                max(now - started, 0.0),
            )
        )
        if decision != "served":
            _log.debug(
                "leader_attempt_not_served",
                number=attempt.number,
                endpoint=attempt.endpoint,
                outcome=_describe(outcome),
                decision=decision,
            )

    def _give_up(self, reason: GiveUpReason, why: str, now: float) -> GaveUp:
        records = self.attempts
        elapsed = now - self._started_at
        self._cache.record_give_up(reason)
        lines = "; ".join(record.summary for record in records)
        message = (
            f"gave up after {len(records)} attempt(s) in {elapsed:.3f} s ({reason}): {why}. "
            f"Attempts: {lines}"
        )
        _log.info(
            "leader_request_gave_up",
            reason=reason,
            attempts=len(records),
            elapsed_s=round(elapsed, 6),
        )
        return GaveUp(reason=reason, message=message, attempts=records)


async def run_attempts(
    plan: AttemptPlan,
    send: Callable[[Attempt], Awaitable[tuple[Outcome, _T | None]]],
    *,
    gave_up: Callable[[GaveUp], BaseException] = GaveUpError,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
) -> _T:
    """Run ``plan`` to the end: the value ``send`` returned with the ``Served`` outcome.

    ``send(attempt)`` sends one attempt to ``attempt.endpoint`` within
    ``attempt.timeout`` seconds and returns ``(outcome, value)``; ``value``
    is returned to the caller only for ``Served`` (for other outcomes
    ``send`` releases what it got and may return ``None``). On
    :class:`GaveUp` raises ``gave_up(record)`` (by default :class:`GaveUpError`).
    An exception from ``send`` propagates unchanged. Waits with ``sleep``
    (cancellable).
    """
    step: Attempt | Done | GaveUp = plan.start()
    while isinstance(step, Attempt):
        if step.delay > 0:
            await sleep(step.delay)
        outcome, value = await send(step)
        step = plan.after(outcome)
        if step is DONE:
            return cast(_T, value)
    raise gave_up(cast(GaveUp, step))


def run_attempts_sync(
    plan: AttemptPlan,
    send: Callable[[Attempt], tuple[Outcome, _T | None]],
    *,
    gave_up: Callable[[GaveUp], BaseException] = GaveUpError,
    sleep: Callable[[float], object] = time.sleep,
) -> _T:
    """The blocking twin of :func:`run_attempts`: same plan, same rules."""
    step: Attempt | Done | GaveUp = plan.start()
    while isinstance(step, Attempt):
        if step.delay > 0:
            sleep(step.delay)
        outcome, value = send(step)
        step = plan.after(outcome)
        if step is DONE:
            return cast(_T, value)
    raise gave_up(cast(GaveUp, step))
