"""The sans-IO attempt planner and retry policy (DESIGN contracts 10 and 12)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from leaderwatch.client import LeaderCache
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import LeaderHint, hint_from_wire
from leaderwatch.retry import (
    DONE,
    Attempt,
    AttemptPlan,
    AttemptRecord,
    ConnectFailed,
    GaveUp,
    GaveUpError,
    NoLeader,
    Outcome,
    Redirected,
    RetryPolicy,
    SentButNoResponse,
    Served,
    TimedOut,
    run_attempts,
    run_attempts_sync,
)
from leaderwatch.testing import capture_events

CONFIGURED = ["a:1", "b:1", "c:1"]
NO_JITTER = RetryPolicy(
    deadline=10.0, attempt_timeout=2.0, max_redirects=3, backoff_initial=0.1, backoff_maximum=0.4,
    jitter=0.0,
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_plan(
    policy: RetryPolicy = NO_JITTER,
    *,
    safe_to_resend: bool = True,
    tls_required: bool = False,
    leader: tuple[str, int] | None = None,
) -> tuple[AttemptPlan, LeaderCache, Clock]:
    clock = Clock()
    cache = LeaderCache(
        CONFIGURED, tls_required=tls_required, clock=clock, rng=random.Random(1)
    )  # worklist rotation starts at a:1 with this seed
    if leader is not None:
        cache.record_success(*leader)
    plan = AttemptPlan(
        cache, policy, safe_to_resend=safe_to_resend, clock=clock, rng=random.Random(1)
    )
    return plan, cache, clock


def redirect(endpoint: str | None, epoch: int | None) -> Redirected:
    return Redirected(hint=LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch))


# --- one table: what the plan does next -----------------------------------------------------


@dataclass
class Case:
    """``steps``: (outcome fed, what comes next: endpoint / "done" / give-up reason, delay)."""

    name: str
    steps: list[tuple[Outcome, str, float]]
    decisions: list[str]
    leader: tuple[str, int] | None = None
    safe_to_resend: bool = True
    tls_required: bool = False
    first: str = "a:1"
    failures: int = 0
    cached: tuple[str, int | None] | None = None
    tick: float = 0.0  # clock advance per attempt
    extra: dict[str, object] = field(default_factory=dict)


CASES = [
    Case(
        "served at once: the epoch goes to the cache",
        [(Served(epoch=7), "done", 0.0)],
        ["served"],
        cached=("a:1", 7),
    ),
    Case(
        "served without epoch: the cache is not touched",
        [(Served(), "done", 0.0)],
        ["served"],
        cached=None,
    ),
    Case(
        "redirect to the leader is followed at once",
        [(redirect("c:1", 4), "c:1", 0.0), (Served(epoch=4), "done", 0.0)],
        ["followed", "served"],
        cached=("c:1", 4),
    ),
    Case(
        "stale redirect: next endpoint, no wait",
        [(redirect("b:1", 3), "b:1", 0.0), (Served(epoch=9), "done", 0.0)],
        ["hint_stale", "served"],
        leader=("a:1", 9),
        cached=("b:1", 9),
    ),
    Case(
        "http:// hint under TLS: rejected, next endpoint",
        [
            (Redirected(hint=hint_from_wire("http://c:1", 12)), "b:1", 0.0),
            (Served(), "done", 0.0),
        ],
        ["hint_rejected", "served"],
        tls_required=True,
    ),
    Case(
        "redirect without endpoint: treated as no leader, next endpoint",
        [(redirect(None, 4), "b:1", 0.0), (Served(), "done", 0.0)],
        ["no_leader", "served"],
    ),
    Case(
        "no leader: waits the backoff, then the next endpoint",
        [(NoLeader(), "b:1", 0.1), (NoLeader(), "c:1", 0.2), (Served(), "done", 0.0)],
        ["no_leader", "no_leader", "served"],
    ),
    Case(
        "no leader: a longer retry-after is honoured",
        [(NoLeader(retry_after=0.75, epoch=3), "b:1", 0.75), (Served(), "done", 0.0)],
        ["no_leader", "served"],
    ),
    Case(
        "no leader: a shorter retry-after still waits the backoff",
        [(NoLeader(retry_after=0.01), "b:1", 0.1), (Served(), "done", 0.0)],
        ["no_leader", "served"],
    ),
    Case(
        "no leader: a retry-after past the deadline gives up at once",
        [(NoLeader(retry_after=60.0), "deadline_exceeded", 0.0)],
        ["no_leader"],
    ),
    Case(
        "connection refused: next endpoint at once, endpoint demoted",
        [
            (ConnectFailed(error="refused"), "b:1", 0.0),
            (ConnectFailed(error="refused"), "c:1", 0.0),
            (ConnectFailed(error="refused"), "b:1", 0.1),  # new round: the failed ones last
            (Served(), "done", 0.0),
        ],
        ["endpoint_failed"] * 3 + ["served"],
        failures=3,
    ),
    Case(
        "the dead cached leader is not followed back during its backoff",
        [
            (ConnectFailed(error="refused"), "b:1", 0.0),
            (redirect("a:1", 5), "c:1", 0.0),
            (redirect("a:1", 5), "b:1", 0.1),
            (redirect("c:1", 6), "c:1", 0.0),
            (Served(epoch=6), "done", 0.0),
        ],
        ["endpoint_failed", "hint_rejected", "hint_rejected", "followed", "served"],
        leader=("a:1", 5),
        failures=1,
        cached=("c:1", 6),
    ),
    Case(
        "sent without response, safe to resend: retried elsewhere",
        [(SentButNoResponse(error="reset"), "b:1", 0.0), (Served(), "done", 0.0)],
        ["endpoint_failed", "served"],
        failures=1,
    ),
    Case(
        "sent without response, not safe to resend: gives up",
        [(SentButNoResponse(error="reset"), "outcome_unknown", 0.0)],
        ["outcome_unknown"],
        safe_to_resend=False,
        failures=1,
    ),
    Case(
        "timed out after sending, not safe to resend: gives up",
        [(TimedOut(sent=True), "outcome_unknown", 0.0)],
        ["outcome_unknown"],
        safe_to_resend=False,
        failures=1,
    ),
    Case(
        "timed out before sending: retried even when not safe to resend",
        [(TimedOut(sent=False), "b:1", 0.0), (Served(), "done", 0.0)],
        ["endpoint_failed", "served"],
        safe_to_resend=False,
        failures=1,
    ),
    Case(
        "redirects and no-leader replies are retried even when not safe to resend",
        [(redirect("c:1", 2), "c:1", 0.0), (NoLeader(), "b:1", 0.1), (Served(), "done", 0.0)],
        ["followed", "no_leader", "served"],
        safe_to_resend=False,
        cached=("c:1", 2),
    ),
    Case(
        "max_redirects: one redirect too many gives up",
        [
            (redirect("b:1", 1), "b:1", 0.0),
            (redirect("c:1", 1), "c:1", 0.0),
            (redirect("a:1", 1), "a:1", 0.0),
            (redirect("b:1", 1), "max_redirects_exceeded", 0.0),
        ],
        ["followed", "followed", "followed", "max_redirects_exceeded"],
        cached=("b:1", 1),  # the last hint was valid: the cache learned it
    ),
    Case(
        "deadline: the last attempt gets only what is left",
        [(ConnectFailed(), "b:1", 0.0), (ConnectFailed(), "c:1", 0.0)],
        ["endpoint_failed", "endpoint_failed"],
        tick=4.5,
        failures=2,
        extra={"timeouts": [2.0, 2.0, 1.0]},
    ),
    Case(
        "deadline: no time left gives up",
        [(ConnectFailed(), "b:1", 0.0), (ConnectFailed(), "deadline_exceeded", 0.0)],
        ["endpoint_failed", "endpoint_failed"],
        tick=5.0,
        failures=2,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan(case: Case) -> None:
    plan, cache, clock = make_plan(
        safe_to_resend=case.safe_to_resend, tls_required=case.tls_required, leader=case.leader
    )
    step = plan.start()
    assert step.endpoint == (case.leader[0] if case.leader else case.first)
    assert step.number == 1
    assert step.delay == 0.0
    timeouts = [step.timeout]
    for number, (outcome, expected, delay) in enumerate(case.steps, start=2):
        clock.now += case.tick
        step = plan.after(outcome)  # type: ignore[assignment]
        if expected == "done":
            assert step is DONE
        elif expected in ("outcome_unknown", "max_redirects_exceeded", "deadline_exceeded"):
            assert isinstance(step, GaveUp)
            assert step.reason == expected
            assert step.attempts == plan.attempts
        else:
            assert isinstance(step, Attempt), step
            assert (step.endpoint, step.number) == (expected, number)
            assert step.delay == pytest.approx(delay)
            timeouts.append(step.timeout)
            clock.now += step.delay
    assert [record.decision for record in plan.attempts] == case.decisions
    assert [record.number for record in plan.attempts] == list(range(1, len(case.decisions) + 1))
    assert cache.stats.failures == case.failures
    if "timeouts" in case.extra:
        assert timeouts == pytest.approx(case.extra["timeouts"])
    if case.cached is not None or not case.leader:
        assert cache.cached_leader == case.cached


def test_give_up_message_says_what_each_attempt_got() -> None:
    plan, _, _ = make_plan(safe_to_resend=False, leader=("a:1", 5))
    plan.start()
    plan.after(ConnectFailed(error="ConnectError: [Errno 111] Connection refused"))
    plan.after(redirect("a:1", 5))
    step = plan.after(SentButNoResponse(error="RemoteProtocolError: Server disconnected"))
    assert isinstance(step, GaveUp)
    assert step.reason == "outcome_unknown"
    message = step.message
    for text in (
        "3 attempt(s)",
        "#1 a:1: connection failed (ConnectError: [Errno 111] Connection refused)",
        "#2 b:1: redirect to a:1 at epoch 5 -> not followed: endpoint_recently_failed",
        "#3 c:1: request sent, no response (RemoteProtocolError: Server disconnected)",
        "not safe to resend",
        "idempotency key",
    ):
        assert text in message, text
    assert [(r.endpoint, type(r.outcome)) for r in step.attempts] == [
        ("a:1", ConnectFailed),
        ("b:1", Redirected),
        ("c:1", SentButNoResponse),
    ]
    assert all(isinstance(record, AttemptRecord) for record in step.attempts)


def test_giving_up_is_logged() -> None:
    plan, _, _ = make_plan(safe_to_resend=False)
    plan.start()
    with capture_events() as logs:
        plan.after(TimedOut(sent=True))
    assert [(e["event"], e.get("reason")) for e in logs if e["log_level"] != "debug"] == [
        ("leader_endpoint_failed", None),
        ("leader_request_gave_up", "outcome_unknown"),
    ]


def test_attempt_records_time_each_attempt() -> None:
    plan, _, clock = make_plan()
    plan.start()
    clock.now += 0.25
    step = plan.after(NoLeader(retry_after=0.5))
    assert isinstance(step, Attempt)
    clock.now += step.delay + 0.125
    plan.after(Served())
    first, second = plan.attempts
    assert (first.started, first.duration) == (0.0, 0.25)
    assert (second.started, second.duration) == pytest.approx((0.75, 0.125))


def test_plan_misuse_is_refused() -> None:
    plan, _, _ = make_plan()
    with pytest.raises(RuntimeError, match="start"):
        plan.after(Served())
    plan.start()
    with pytest.raises(RuntimeError, match="one plan per request"):
        plan.start()
    with pytest.raises(TypeError, match="outcome"):
        plan.after("served")  # type: ignore[arg-type]


def test_policy_is_validated() -> None:
    with pytest.raises(ValidationError, match="backoff_initial"):
        RetryPolicy(backoff_initial=2.0, backoff_maximum=1.0)
    for field_name, value in [
        ("deadline", 0),
        ("attempt_timeout", -1),
        ("max_redirects", -1),
        ("jitter", 1.5),
        ("backoff_multiplier", 0.5),
        ("deadline", math.nan),
    ]:
        with pytest.raises(ValidationError):
            RetryPolicy(**{field_name: value})
    assert RetryPolicy(deadline=math.inf).deadline == math.inf
    with pytest.raises(ValidationError, match=r"[Ff]rozen"):
        RetryPolicy().deadline = 1.0  # type: ignore[misc]


# --- properties -----------------------------------------------------------------------------

OUTCOMES = st.one_of(
    st.builds(Served, epoch=st.none() | st.integers(0, 9)),
    st.builds(
        redirect,
        st.none() | st.sampled_from([*CONFIGURED, "x:1"]),
        st.none() | st.integers(0, 9),
    ),
    st.builds(NoLeader, retry_after=st.none() | st.floats(0, 2), epoch=st.none()),
    st.builds(ConnectFailed),
    st.builds(TimedOut, sent=st.booleans()),
    st.builds(SentButNoResponse),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(OUTCOMES, st.floats(0, 3)), min_size=1, max_size=40),
    st.booleans(),
    st.floats(0, 1),
)
def test_plan_invariants(
    outcomes: list[tuple[Outcome, float]], safe_to_resend: bool, jitter: float
) -> None:
    policy = RetryPolicy(
        deadline=8.0, attempt_timeout=2.0, max_redirects=4, backoff_initial=0.05,
        backoff_maximum=0.8, jitter=jitter,
    )  # fmt: skip
    plan, cache, clock = make_plan(policy, safe_to_resend=safe_to_resend)
    start = clock.now
    step = plan.start()
    sent_unsafely = False
    for outcome, took in outcomes:
        assert isinstance(step, Attempt)
        assert 0 < step.timeout <= policy.attempt_timeout
        # No attempt may start past the deadline or run beyond it.
        assert clock.now + step.delay + step.timeout <= start + policy.deadline + 1e-9
        clock.now += step.delay + min(took, step.timeout)
        sent_unsafely = not safe_to_resend and (
            isinstance(outcome, SentButNoResponse)
            or (isinstance(outcome, TimedOut) and outcome.sent)
        )
        step = plan.after(outcome)  # type: ignore[assignment]
        if not isinstance(step, Attempt):
            break
    records = plan.attempts
    assert [r.number for r in records] == list(range(1, len(records) + 1))
    assert plan.redirects <= policy.max_redirects
    assert sum(r.decision == "followed" for r in records) == plan.redirects
    failures = sum(
        isinstance(r.outcome, ConnectFailed | TimedOut | SentButNoResponse) for r in records
    )
    assert cache.stats.failures == failures
    if step is DONE:
        assert isinstance(records[-1].outcome, Served)
    elif isinstance(step, GaveUp):
        assert step.attempts == records
        if sent_unsafely:
            assert step.reason == "outcome_unknown"
        assert step.reason != "outcome_unknown" or not safe_to_resend


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.integers(0, 2**32))
def test_backoff_between_rounds_is_jittered_and_capped(jitter: float, seed: int) -> None:
    policy = RetryPolicy(deadline=math.inf, backoff_initial=0.1, backoff_maximum=0.8, jitter=jitter)
    clock = Clock()
    cache = LeaderCache(CONFIGURED, clock=clock, rng=random.Random(1))
    plan = AttemptPlan(cache, policy, safe_to_resend=True, clock=clock, rng=random.Random(seed))
    plan.start()
    waits = []
    for _ in range(6 * len(CONFIGURED)):
        step = plan.after(ConnectFailed())
        assert isinstance(step, Attempt)
        if step.delay:
            waits.append(step.delay)
    nominal = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    assert len(waits) == len(nominal)  # one wait per round, none within a round
    for wait, full in zip(waits, nominal, strict=True):
        assert full * (1 - jitter) - 1e-12 <= wait <= full + 1e-12


# --- the loops ------------------------------------------------------------------------------


class Cluster:
    """What each endpoint answers, and every attempt seen."""

    def __init__(self, answers: dict[str, Outcome]) -> None:
        self.answers = answers
        self.seen: list[Attempt] = []

    def reply(self, attempt: Attempt) -> tuple[Outcome, str | None]:
        self.seen.append(attempt)
        outcome = self.answers[attempt.endpoint]
        return outcome, f"reply from {attempt.endpoint}" if isinstance(outcome, Served) else None


@pytest.mark.anyio
async def test_run_attempts_returns_the_served_value_and_sleeps_the_plan() -> None:
    cluster = Cluster(
        {"a:1": NoLeader(retry_after=0.5), "b:1": redirect("c:1", 3), "c:1": Served(epoch=3)}
    )
    plan, cache, _ = make_plan()
    slept: list[float] = []

    async def send(attempt: Attempt) -> tuple[Outcome, str | None]:
        return cluster.reply(attempt)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    assert await run_attempts(plan, send, sleep=sleep) == "reply from c:1"
    assert [a.endpoint for a in cluster.seen] == ["a:1", "b:1", "c:1"]
    assert slept == [0.5]
    assert cache.cached_leader == ("c:1", 3)


@pytest.mark.anyio
async def test_run_attempts_raises_the_give_up_error() -> None:
    cluster = Cluster({e: SentButNoResponse(error="reset") for e in CONFIGURED})
    plan, _, _ = make_plan(safe_to_resend=False)

    async def send(attempt: Attempt) -> tuple[Outcome, str | None]:
        return cluster.reply(attempt)

    with pytest.raises(GaveUpError, match="not safe to resend") as caught:
        await run_attempts(plan, send)
    assert isinstance(caught.value, LeaderwatchError)
    assert caught.value.reason == "outcome_unknown"
    assert len(caught.value.attempts) == 1

    class Custom(Exception):
        pass

    plan, _, _ = make_plan(safe_to_resend=False)
    with pytest.raises(Custom):
        await run_attempts(plan, send, gave_up=lambda record: Custom(record.message))


@pytest.mark.anyio
async def test_run_attempts_is_cancellable_while_waiting() -> None:
    cluster = Cluster({e: NoLeader(retry_after=30.0) for e in CONFIGURED})
    plan, _, _ = make_plan(RetryPolicy(deadline=100.0))

    async def send(attempt: Attempt) -> tuple[Outcome, str | None]:
        return cluster.reply(attempt)

    with anyio.move_on_after(0.05) as scope:
        await run_attempts(plan, send)
    assert scope.cancelled_caught
    assert len(cluster.seen) == 1


def test_run_attempts_sync_is_the_same_loop() -> None:
    cluster = Cluster(
        {"a:1": ConnectFailed(), "b:1": NoLeader(retry_after=0.3), "c:1": Served(epoch=1)}
    )
    plan, cache, _ = make_plan()
    slept: list[float] = []
    assert run_attempts_sync(plan, cluster.reply, sleep=slept.append) == "reply from c:1"
    assert [a.endpoint for a in cluster.seen] == ["a:1", "b:1", "c:1"]
    assert slept == [0.3]
    assert cache.cached_leader == ("c:1", 1)

    def broken(attempt: Attempt) -> tuple[Outcome, str | None]:
        raise OSError("boom")

    plan, _, _ = make_plan()
    with pytest.raises(OSError, match="boom"):
        run_attempts_sync(plan, broken)
