"""LeaderCache: the client's cache rules, hint classification, worklist (DESIGN contract 10)."""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderwatch.client import (
    REFUSAL_REASONS,
    CachedLeader,
    Follow,
    LeaderCache,
    NoLeaderYet,
    Rejected,
    Stale,
    _Entry,
)
from leaderwatch.hint import LeaderHint, MalformedHint, hint_from_wire, parse_hint_headers
from leaderwatch.state import InvalidEndpoint, InvalidEpoch
from leaderwatch.testing import capture_events

ROOT = Path(__file__).resolve().parent.parent
CONFIGURED = ["a:1", "b:1", "c:1"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(*, tls_required: bool = False, ttl: float = 30.0) -> tuple[LeaderCache, Clock]:
    clock = Clock()
    cache = LeaderCache(
        CONFIGURED, tls_required=tls_required, ttl=ttl, clock=clock, rng=random.Random(0)
    )
    return cache, clock


# --- the cache rules, one table row per rule --------------------------------------------------


@dataclass
class Rule:
    """Steps are ("hint" | "success", endpoint, epoch, accepted?) or ("tick", seconds)."""

    name: str
    steps: list[tuple[object, ...]]
    final: tuple[str, int | None] | None
    refused: dict[str, int] = field(default_factory=dict)


RULES = [
    Rule("no entry: a hint is accepted", [("hint", "x:1", None, True)], ("x:1", None)),
    Rule("no entry: a success is accepted", [("success", "x:1", 3, True)], ("x:1", 3)),
    Rule(
        "expired entry: anything is accepted",
        [("hint", "a:1", 9, True), ("tick", 30.5), ("hint", "x:1", 2, True)],
        ("x:1", 2),
    ),
    Rule(
        "expired entry: an epoch-less success is accepted",
        [("hint", "a:1", 9, True), ("tick", 31), ("success", "x:1", None, True)],
        ("x:1", None),
    ),
    Rule(
        "an entry exactly ttl old is still fresh",
        [("hint", "a:1", 9, True), ("tick", 30), ("hint", "x:1", 2, False)],
        ("a:1", 9),
        {"epoch_below_cached": 1},
    ),
    Rule(
        "same endpoint: accepted, keeps the higher epoch",
        [("hint", "a:1", 9, True), ("hint", "a:1", 4, True), ("success", "a:1", 2, True)],
        ("a:1", 9),
    ),
    Rule(
        "same endpoint: a higher epoch is taken",
        [("hint", "a:1", 9, True), ("success", "a:1", 12, True)],
        ("a:1", 12),
    ),
    Rule(
        "same endpoint: a known epoch is never replaced by None",
        [("hint", "a:1", 9, True), ("hint", "a:1", None, True), ("success", "a:1", None, True)],
        ("a:1", 9),
    ),
    Rule(
        "same endpoint: refreshes the age",
        [
            ("hint", "a:1", 9, True),
            ("tick", 20),
            ("success", "a:1", None, True),
            ("tick", 20),
            ("hint", "x:1", 3, False),
        ],
        ("a:1", 9),
        {"epoch_below_cached": 1},
    ),
    Rule(
        "different endpoint, both known: incoming >= cached wins",
        [
            ("hint", "a:1", 9, True),
            ("hint", "b:1", 9, True),
            ("hint", "c:1", 8, False),
            ("success", "x:1", 10, True),
            ("success", "a:1", 9, False),
        ],
        ("x:1", 10),
        {"epoch_below_cached": 2},
    ),
    Rule(
        "cached known, epoch-less hint: accepted for a configured endpoint",
        [("hint", "a:1", 9, True), ("hint", "b:1", None, True)],
        ("b:1", None),
    ),
    Rule(
        "cached known, epoch-less hint: refused for an unconfigured endpoint",
        [("hint", "a:1", 9, True), ("hint", "x:1", None, False), ("hint", "y:1", None, False)],
        ("a:1", 9),
        {"epochless_hint_to_unconfigured_endpoint": 2},
    ),
    Rule(
        "cached known, epoch-less success: refused even for a configured endpoint",
        [("hint", "a:1", 9, True), ("success", "b:1", None, False)],
        ("a:1", 9),
        {"epochless_success_over_known_epoch": 1},
    ),
    Rule(
        "cached None: a hint is accepted, an epoch-less one only for a configured endpoint",
        [
            ("hint", "a:1", None, True),
            ("hint", "x:1", None, False),
            ("hint", "b:1", None, True),
            ("hint", "y:1", 0, True),
        ],
        ("y:1", 0),
        {"epochless_hint_to_unconfigured_endpoint": 1},
    ),
    Rule(
        "cached None: a success from a different endpoint is refused",
        [
            ("hint", "a:1", None, True),
            ("success", "b:1", 5, False),
            ("success", "b:1", None, False),
            ("success", "a:1", 5, True),
        ],
        ("a:1", 5),
        {"success_to_other_endpoint_over_epochless": 2},
    ),
    Rule(
        "floor: 7 -> epoch-less -> 4 is refused",
        [
            ("hint", "a:1", 7, True),
            ("hint", "b:1", None, True),
            ("hint", "c:1", 4, False),
            ("hint", "b:1", 4, False),
            ("hint", "c:1", 7, True),
        ],
        ("c:1", 7),
        {"epoch_below_floor": 2},
    ),
    Rule(
        "floor: survives a second epoch-less hint over an epoch-less entry",
        [
            ("hint", "a:1", 7, True),
            ("hint", "b:1", None, True),
            ("hint", "c:1", None, True),
            ("hint", "x:1", None, False),
            ("hint", "y:1", 6, False),
            ("hint", "y:1", 8, True),
        ],
        ("y:1", 8),
        {"epoch_below_floor": 1, "epochless_hint_to_unconfigured_endpoint": 1},
    ),
    Rule(
        "floor: only expiry resets it",
        [
            ("hint", "a:1", 7, True),
            ("hint", "b:1", None, True),
            ("tick", 31),
            ("hint", "c:1", 4, True),
            ("hint", "a:1", 5, True),
        ],
        ("a:1", 5),
    ),
]


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_cache_rule(rule: Rule) -> None:
    cache, clock = make_cache()
    for step in rule.steps:
        if step[0] == "tick":
            clock.now += float(step[1])  # type: ignore[arg-type]
            continue
        kind, endpoint, epoch, accepted = step
        update = cache.compare_and_set_leader if kind == "hint" else cache.record_success
        assert update(endpoint, epoch) is accepted, step  # type: ignore[arg-type]
    assert cache.cached_leader == rule.final
    assert cache.stats.refused == rule.refused


def test_refusals_are_logged_with_a_stable_event_and_counted() -> None:
    cache, _ = make_cache()
    cache.compare_and_set_leader("a:1", 9)
    with capture_events() as logs:
        assert not cache.compare_and_set_leader("x:1", None)
        assert not cache.record_success("b:1", 3)
    assert [(e["event"], e["reason"], e["source"]) for e in logs] == [
        ("leader_cache_update_refused", "epochless_hint_to_unconfigured_endpoint", "hint"),
        ("leader_cache_update_refused", "epoch_below_cached", "success"),
    ]
    stats = cache.stats
    assert stats.accepted == 1
    assert sum(stats.refused.values()) == 2
    assert set(stats.refused) <= set(REFUSAL_REASONS)


def test_cached_leader_is_a_named_tuple_and_none_when_expired() -> None:
    cache, clock = make_cache(ttl=5.0)
    assert cache.cached_leader is None
    cache.record_success("b:1", 4)
    leader = cache.cached_leader
    assert isinstance(leader, CachedLeader)
    assert (leader.endpoint, leader.epoch) == ("b:1", 4)
    clock.now += 5.5
    assert cache.cached_leader is None


def test_arguments_are_validated() -> None:
    cache, _ = make_cache()
    with pytest.raises(InvalidEndpoint, match="scheme"):
        cache.compare_and_set_leader("http://a:1", 1)
    with pytest.raises(InvalidEpoch):
        cache.record_success("a:1", -1)
    with pytest.raises(InvalidEpoch):
        cache.compare_and_set_leader("a:1", True)
    assert cache.cached_leader is None


@pytest.mark.parametrize("epoch", [10**5000, -(10**5000)], ids=["huge", "huge-negative"])
def test_a_huge_integer_epoch_is_invalid_epoch_not_a_bare_value_error(epoch: int) -> None:
    cache, _ = make_cache()
    for call in (cache.compare_and_set_leader, cache.record_success):
        with pytest.raises(InvalidEpoch, match="bits") as raised:
            call("a:1", epoch)
        assert len(str(raised.value)) < 200
    assert cache.cached_leader is None


def test_construction_validates_configured_endpoints() -> None:
    with pytest.raises(InvalidEndpoint, match="scheme"):
        LeaderCache(["a:1", "https://b:1"])
    with pytest.raises(InvalidEndpoint, match="port"):
        LeaderCache(["a"])
    with pytest.raises(TypeError, match="not a string"):
        LeaderCache("a:1")
    with pytest.raises(ValueError, match="at least one"):
        LeaderCache([])
    for ttl in (0, -1, math.nan):
        with pytest.raises(ValueError, match="ttl"):
            LeaderCache(["a:1"], ttl=ttl)
    assert LeaderCache(["a:1", "b:1", "a:1"]).endpoints == ("a:1", "b:1")


# --- plaintext downgrade and classify ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "endpoint", "refused"),
    [
        (True, "http://a:1", True),
        (True, "HTTP://a:1", True),
        (True, "https://a:1", False),
        (True, "a:1", False),
        (False, "http://a:1", False),
        (False, "https://a:1", False),
    ],
)
def test_rejects_plaintext_hint(tls: bool, endpoint: str, refused: bool) -> None:
    cache, _ = make_cache(tls_required=tls)
    assert cache.rejects_plaintext_hint(endpoint) is refused


def test_configured_endpoints_are_never_filtered() -> None:
    cache, _ = make_cache(tls_required=True)
    assert not any(cache.rejects_plaintext_hint(endpoint) for endpoint in cache.endpoints)
    assert sorted(cache.worklist()) == sorted(CONFIGURED)


CLASSIFY = [
    # (tls, seed (endpoint, epoch) or None, hint, outcome, cached afterwards)
    (False, None, None, NoLeaderYet(), None),
    (False, ("a:1", 9), LeaderHint(leader_epoch=12), NoLeaderYet(leader_epoch=12), ("a:1", 9)),
    (
        False,
        None,
        LeaderHint(leader_endpoint="b:1", leader_epoch=5),
        Follow(endpoint="b:1", epoch=5),
        ("b:1", 5),
    ),
    (
        False,
        ("a:1", 9),
        LeaderHint(leader_endpoint="a:1"),
        Follow(endpoint="a:1", epoch=9),
        ("a:1", 9),
    ),
    (
        False,
        ("a:1", 9),
        LeaderHint(leader_endpoint="b:1", leader_epoch=3),
        Stale(endpoint="b:1", epoch=3),
        ("a:1", 9),
    ),
    (
        True,
        ("a:1", 9),
        hint_from_wire("http://b:1", 12),
        Rejected(reason="", rule="plaintext_downgrade"),
        ("a:1", 9),
    ),
    (
        True,
        ("a:1", 9),
        hint_from_wire("HTTP://b:1", 12),
        Rejected(reason="", rule="plaintext_downgrade"),
        ("a:1", 9),
    ),
    (True, None, hint_from_wire("https://b:1", 12), Follow(endpoint="b:1", epoch=12), ("b:1", 12)),
    (False, None, hint_from_wire("http://b:1", 12), Follow(endpoint="b:1", epoch=12), ("b:1", 12)),
    (
        True,
        None,
        hint_from_wire("https://b:1/leader", 1),
        Rejected(reason="", rule="endpoint_has_scheme"),
        None,
    ),
    (
        True,
        None,
        hint_from_wire("https://https://b:1", 1),
        Rejected(reason="", rule="endpoint_has_scheme"),
        None,
    ),
    (
        True,
        None,
        hint_from_wire("ftp://b:1", 1),
        Rejected(reason="", rule="endpoint_has_scheme"),
        None,
    ),
    (
        True,
        ("a:1", 9),
        hint_from_wire("https://b:1", 3),
        Stale(endpoint="b:1", epoch=3),
        ("a:1", 9),
    ),
    (
        False,
        None,
        parse_hint_headers({"leader-endpoint": "b:1", "leader-epoch": "+5"}),
        Rejected(reason="", rule="epoch_not_decimal"),
        None,
    ),
    (
        False,
        None,
        parse_hint_headers({"leader-endpoint": "b:1/x"}),
        Rejected(reason="", rule="endpoint_invalid"),
        None,
    ),
]


@pytest.mark.parametrize(("tls", "seed", "hint", "outcome", "cached"), CLASSIFY)
def test_classify(
    tls: bool,
    seed: tuple[str, int] | None,
    hint: LeaderHint | MalformedHint | None,
    outcome: object,
    cached: tuple[str, int | None] | None,
) -> None:
    cache, _ = make_cache(tls_required=tls)
    if seed is not None:
        cache.compare_and_set_leader(*seed)
    result = cache.classify(hint)
    if isinstance(outcome, Rejected):
        assert isinstance(result, Rejected)
        assert result.rule == outcome.rule
        assert result.reason
        assert cache.stats.rejected == {outcome.rule: 1}
    else:
        assert result == outcome
    assert cache.cached_leader == cached


def test_classify_counts_stripped_schemes_and_refuses_other_types() -> None:
    cache, _ = make_cache(tls_required=True)
    cache.classify(hint_from_wire("https://b:1", 1))
    assert cache.stats.schemes_stripped == 1
    with pytest.raises(TypeError, match="LeaderHint"):
        cache.classify("b:1")  # type: ignore[arg-type]


def test_downgrade_is_logged_as_a_warning() -> None:
    cache, _ = make_cache(tls_required=True)
    with capture_events() as logs:
        cache.classify(hint_from_wire("http://b:1", 1))
    assert [(e["event"], e["rule"], e["log_level"]) for e in logs] == [
        ("leader_hint_rejected", "plaintext_downgrade", "warning")
    ]


# --- worklist ---------------------------------------------------------------------------------


def test_worklist_round_robins_configured_endpoints_without_duplicates() -> None:
    cache, _ = make_cache()
    lists = [cache.worklist() for _ in range(6)]
    for worklist in lists:
        assert sorted(worklist) == sorted(CONFIGURED)
    firsts = [worklist[0] for worklist in lists]
    assert sorted(firsts[:3]) == sorted(CONFIGURED)
    assert firsts[:3] == firsts[3:]
    for worklist in lists:
        start = CONFIGURED.index(worklist[0])
        assert worklist == CONFIGURED[start:] + CONFIGURED[:start]


def test_worklist_starts_at_a_random_offset() -> None:
    firsts = {LeaderCache(CONFIGURED, rng=random.Random(seed)).worklist()[0] for seed in range(40)}
    assert firsts == set(CONFIGURED)


@pytest.mark.parametrize("leader", ["b:1", "x:1"])
def test_worklist_puts_the_fresh_cached_leader_first(leader: str) -> None:
    cache, clock = make_cache()
    cache.compare_and_set_leader(leader, 3)
    worklist = cache.worklist()
    assert worklist[0] == leader
    assert len(worklist) == len(set(worklist)) == len(set(CONFIGURED) | {leader})
    clock.now += 31
    assert cache.worklist()[0] != leader or leader in CONFIGURED
    assert sorted(cache.worklist()) == sorted(CONFIGURED)


# --- record_failure ---------------------------------------------------------------------------


def test_failed_cached_leader_is_no_longer_first_until_its_backoff_ends() -> None:
    cache, clock = make_cache()
    cache.compare_and_set_leader("b:1", 5)
    cache.record_failure("b:1")
    for _ in range(3):
        worklist = cache.worklist()
        assert worklist[-1] == "b:1"
        assert sorted(worklist) == sorted(CONFIGURED)
    assert cache.cached_leader == ("b:1", 5)  # the entry (and its epoch) stays
    clock.now += 1.0  # the default failure_backoff
    assert cache.worklist()[0] == "b:1"


def test_failed_configured_endpoint_goes_last_and_order_is_otherwise_kept() -> None:
    cache, _ = make_cache()
    cache.record_failure("a:1")
    for _ in range(3):
        worklist = cache.worklist()
        assert worklist[-1] == "a:1"
        assert len(worklist) == len(set(worklist)) == 3


def test_hints_naming_a_failed_endpoint_are_refused_until_a_higher_epoch() -> None:
    cache, clock = make_cache()
    cache.compare_and_set_leader("a:1", 5)
    cache.record_failure("a:1")
    with capture_events() as logs:
        refused = cache.classify(LeaderHint(leader_endpoint="a:1", leader_epoch=5))
        lower = cache.classify(LeaderHint(leader_endpoint="a:1", leader_epoch=4))
        epochless = cache.classify(LeaderHint(leader_endpoint="a:1"))
    for outcome in (refused, lower, epochless):
        assert isinstance(outcome, Rejected)
        assert outcome.rule == "endpoint_recently_failed"
    assert "a:1" in refused.reason
    assert "epoch 5" in refused.reason
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("leader_cache_update_refused", "endpoint_recently_failed")
    ] * 3
    assert not cache.compare_and_set_leader("a:1", 5)
    assert cache.stats.refused == {"endpoint_recently_failed": 4}
    assert cache.stats.rejected == {}
    # Another node's hint is unaffected; so is a new term for the failed one.
    assert cache.classify(LeaderHint(leader_endpoint="b:1", leader_epoch=5)) == Follow(
        endpoint="b:1", epoch=5
    )
    assert cache.classify(LeaderHint(leader_endpoint="a:1", leader_epoch=6)) == Follow(
        endpoint="a:1", epoch=6
    )
    assert cache.worklist()[0] == "a:1"  # a newer term ended the backoff
    cache.record_failure("a:1")
    clock.now += 0.999
    assert not cache.compare_and_set_leader("a:1", 6)
    clock.now += 0.002
    assert cache.compare_and_set_leader("a:1", 6)


def test_a_failure_outside_the_cached_leader_blocks_only_epochless_hints() -> None:
    cache, _ = make_cache()
    cache.compare_and_set_leader("a:1", 5)
    cache.record_failure("b:1")  # no epoch is known for b:1
    outcome = cache.classify(LeaderHint(leader_endpoint="b:1"))
    assert isinstance(outcome, Rejected)
    assert outcome.rule == "endpoint_recently_failed"
    assert "unknown epoch" in outcome.reason
    assert cache.classify(LeaderHint(leader_endpoint="b:1", leader_epoch=5)) == Follow(
        endpoint="b:1", epoch=5
    )


def test_a_failed_endpoint_keeps_the_highest_epoch_it_failed_at() -> None:
    cache, _ = make_cache(ttl=math.inf)
    cache.compare_and_set_leader("a:1", 5)
    cache.record_failure("a:1")
    cache.compare_and_set_leader("b:1", 7)
    cache.record_failure("a:1")  # not the cached leader now: its epoch 5 stays
    assert not cache.compare_and_set_leader("a:1", 5)
    assert cache.compare_and_set_leader("a:1", 7)


def test_a_success_ends_the_backoff() -> None:
    cache, _ = make_cache()
    cache.compare_and_set_leader("a:1", 5)
    cache.record_failure("a:1")
    assert cache.worklist()[-1] == "a:1"
    assert cache.record_success("a:1", 5)
    assert cache.worklist()[0] == "a:1"
    assert cache.compare_and_set_leader("a:1", 5)


def test_a_refused_success_still_ends_the_backoff() -> None:
    cache, _ = make_cache()
    cache.compare_and_set_leader("a:1", 9)
    cache.record_failure("b:1")
    assert all(cache.worklist()[-1] == "b:1" for _ in range(3))
    assert not cache.record_success("b:1", 3)  # below the cached epoch
    assert any(cache.worklist()[-1] != "b:1" for _ in range(3))
    assert cache.compare_and_set_leader("b:1", None)  # epoch-less hint to b:1 no longer blocked


def test_repeated_failures_double_the_backoff_up_to_the_cap() -> None:
    clock = Clock()
    cache = LeaderCache(
        CONFIGURED, failure_backoff=0.5, failure_backoff_max=2.0, clock=clock, rng=random.Random(0)
    )
    with capture_events() as logs:
        for _ in range(5):
            cache.record_failure("a:1")
    assert [e["backoff_s"] for e in logs] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert {(e["event"], e["endpoint"], e["log_level"]) for e in logs} == {
        ("leader_endpoint_failed", "a:1", "info")
    }
    assert cache.stats.failures == 5
    clock.now += 2.0 + 2.0 + 0.001  # past the backoff, then quiet for failure_backoff_max
    with capture_events() as logs:
        cache.record_failure("a:1")
    assert [e["backoff_s"] for e in logs] == [0.5]


def test_failure_backoff_is_validated() -> None:
    with pytest.raises(ValueError, match="failure_backoff"):
        LeaderCache(CONFIGURED, failure_backoff=0)
    with pytest.raises(ValueError, match="failure_backoff_max"):
        LeaderCache(CONFIGURED, failure_backoff=2, failure_backoff_max=1)
    with pytest.raises(ValueError, match="failure_backoff_max"):
        LeaderCache(CONFIGURED, failure_backoff_max=math.inf)
    with pytest.raises(TypeError, match="failure_backoff"):
        LeaderCache(CONFIGURED, failure_backoff="1")  # type: ignore[arg-type]
    cache, _ = make_cache()
    with pytest.raises(InvalidEndpoint):
        cache.record_failure("http://a:1")


def test_dead_leader_is_not_ping_ponged() -> None:
    """The failover from the issue: followers still name the dead leader at its epoch."""
    cache, clock = make_cache()
    cache.record_success("a:1", 5)
    cache.record_failure("a:1")  # connection refused
    stale = LeaderHint(leader_endpoint="a:1", leader_epoch=5)
    for _ in range(10):  # every follower, every retry within the backoff
        outcome = cache.classify(stale)
        assert isinstance(outcome, Rejected)
        assert cache.worklist()[0] != "a:1"
        clock.now += 0.05
    assert cache.classify(LeaderHint(leader_endpoint="c:1", leader_epoch=6)) == Follow(
        endpoint="c:1", epoch=6
    )
    assert cache.worklist()[0] == "c:1"


# --- properties -------------------------------------------------------------------------------

ENDPOINTS = st.sampled_from([*CONFIGURED, "x:1", "y:1"])
EPOCHS = st.none() | st.integers(min_value=0, max_value=12)
OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["hint", "success", "classify"]), ENDPOINTS, EPOCHS), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.booleans())
def test_cache_never_moves_below_an_epoch_it_held(
    operations: list[tuple[str, str, int | None]], tls: bool
) -> None:
    cache = LeaderCache(CONFIGURED, tls_required=tls, ttl=math.inf, clock=lambda: 0.0)
    held: int | None = None
    for kind, endpoint, epoch in operations:
        if kind == "hint":
            cache.compare_and_set_leader(endpoint, epoch)
        elif kind == "success":
            cache.record_success(endpoint, epoch)
        else:
            cache.classify(
                parse_hint_headers(
                    LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch).to_headers()
                )
            )
        leader = cache.cached_leader
        assert leader is not None
        if leader.epoch is not None:
            assert held is None or leader.epoch >= held, (leader, held)
            held = leader.epoch


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(ENDPOINTS, st.integers(min_value=0, max_value=2**128 - 1)),
        min_size=1,
        max_size=12,
    ).flatmap(lambda hints: st.tuples(st.just(hints), st.permutations(hints)))
)
def test_any_order_of_the_same_epoch_hints_ends_at_the_highest(
    orders: tuple[list[tuple[str, int]], list[tuple[str, int]]],
) -> None:
    highest = max(epoch for _, epoch in orders[0])
    for order in orders:
        cache = LeaderCache(CONFIGURED, ttl=math.inf, clock=lambda: 0.0)
        for endpoint, epoch in order:
            cache.compare_and_set_leader(endpoint, epoch)
        leader = cache.cached_leader
        assert leader is not None
        assert leader.epoch == highest
        assert (leader.endpoint, highest) in order


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["hint", "success", "failure", "tick"]),
            ENDPOINTS,
            EPOCHS,
        ),
        max_size=40,
    )
)
def test_failures_never_move_the_cache_below_an_epoch_it_held(
    operations: list[tuple[str, str, int | None]],
) -> None:
    clock = Clock()
    cache = LeaderCache(CONFIGURED, ttl=math.inf, clock=clock, failure_backoff=0.5)
    held: int | None = None
    failed_at: dict[str, tuple[float, int | None]] = {}
    for kind, endpoint, epoch in operations:
        if kind == "tick":
            clock.now += 0.3
        elif kind == "failure":
            leader = cache.cached_leader
            cache.record_failure(endpoint)
            if leader is not None and leader.endpoint == endpoint:
                failed_at[endpoint] = (clock.now, leader.epoch)
        elif kind == "success":
            cache.record_success(endpoint, epoch)
            failed_at.pop(endpoint, None)
        else:
            before = cache.cached_leader
            accepted = cache.compare_and_set_leader(endpoint, epoch)
            failure = failed_at.get(endpoint)
            # Within the first backoff, a hint at or below the failed epoch never seats it.
            if failure is not None and clock.now - failure[0] < 0.5 and failure[1] is not None:
                if epoch is None or epoch <= failure[1]:
                    assert not accepted, (endpoint, epoch, failure)
                    assert cache.cached_leader == before
                else:
                    failed_at.pop(endpoint)
        leader = cache.cached_leader
        if leader is not None and leader.epoch is not None:
            assert held is None or leader.epoch >= held, (leader, held)
            held = leader.epoch
        worklist = cache.worklist()
        assert len(worklist) == len(set(worklist))


def test_concurrent_failures_and_updates_stay_consistent() -> None:
    cache = LeaderCache(CONFIGURED, ttl=math.inf)
    start = threading.Barrier(4)
    counts = [[0, 0] for _ in range(4)]  # [failures, updates] per thread

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(300):
            endpoint = rng.choice(CONFIGURED)
            match rng.randrange(4):
                case 0:
                    cache.record_failure(endpoint)
                    counts[seed][0] += 1
                case 1:
                    cache.record_success(endpoint, rng.randrange(100))
                    counts[seed][1] += 1
                case 2:
                    hint = LeaderHint(leader_endpoint=endpoint, leader_epoch=rng.randrange(100))
                    cache.classify(hint)
                    counts[seed][1] += 1
                case _:
                    assert sorted(cache.worklist()) == sorted(CONFIGURED)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats
    assert stats.failures == sum(failures for failures, _ in counts)
    assert stats.accepted + sum(stats.refused.values()) == sum(updates for _, updates in counts)
    assert stats.rejected == {}


def test_concurrent_updates_are_atomic() -> None:
    cache = LeaderCache(CONFIGURED, ttl=math.inf)
    rng = random.Random(7)
    batches = [
        [(rng.choice(CONFIGURED), rng.randrange(1000)) for _ in range(300)] for _ in range(8)
    ]
    start = threading.Barrier(len(batches))

    def offer(batch: list[tuple[str, int]]) -> None:
        start.wait()
        for endpoint, epoch in batch:
            cache.compare_and_set_leader(endpoint, epoch)
            cache.record_success(endpoint, epoch)

    threads = [threading.Thread(target=offer, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leader = cache.cached_leader
    assert leader is not None
    assert leader.epoch == max(epoch for batch in batches for _, epoch in batch)
    stats = cache.stats
    assert stats.accepted + sum(stats.refused.values()) == 2 * 300 * len(batches)


def test_a_check_and_write_cannot_interleave_with_another() -> None:
    """A check-and-write paused between its check and its write finishes before another starts.

    Without the lock the second update (epoch 9) would land while the first
    (an epoch-less hint, valid against the entry it read) is paused, and the
    first would then replace epoch 9 with an epoch-less entry.
    """
    paused = threading.Event()
    resume = threading.Event()

    class PausingCache(LeaderCache):
        __slots__ = ()

        def _fresh_entry(self, now: float) -> _Entry | None:
            entry = super()._fresh_entry(now)
            if threading.current_thread().name == "slow":
                paused.set()
                resume.wait(10)
            return entry

    cache = PausingCache(CONFIGURED, ttl=math.inf)
    assert cache.compare_and_set_leader("a:1", 5)
    slow = threading.Thread(
        target=cache.compare_and_set_leader, args=("b:1", None), name="slow", daemon=True
    )
    slow.start()
    assert paused.wait(10)
    fast = threading.Thread(target=cache.compare_and_set_leader, args=("c:1", 9), daemon=True)
    fast.start()
    # With the lock, "fast" is blocked here: give it the chance to run if it could.
    fast.join(0.2)
    resume.set()
    slow.join(10)
    fast.join(10)
    assert cache.cached_leader == ("c:1", 9)


# --- docs ------------------------------------------------------------------------------------


def test_docs_page_names_every_refusal_reason_and_event() -> None:
    from leaderwatch.serving import EVENT_NAMES

    page = (ROOT / "docs" / "serving-and-redirects.md").read_text()
    for name in (
        *REFUSAL_REASONS,
        *EVENT_NAMES,
        "leader_cache_update_refused",
        "leader_hint_rejected",
        "plaintext_downgrade",
    ):
        assert f"`{name}`" in page, name


def test_a_configured_node_spelled_otherwise_is_one_entry_in_its_configured_spelling() -> None:
    cache = LeaderCache(["10.0.0.7:9000", "node-b:9000", "[::1]:9001"], rng=random.Random(0))
    follow = cache.classify(hint_from_wire("[::ffff:10.0.0.7]:9000", 5))
    assert follow == Follow(endpoint="10.0.0.7:9000", epoch=5)
    assert cache.classify(hint_from_wire("NODE-B:9000", 6)) == Follow(
        endpoint="node-b:9000", epoch=6
    )
    assert cache.record_success("[0:0::1]:9001", 7)
    assert cache.cached_leader == ("[::1]:9001", 7)
    # A failure reported in another spelling demotes the configured entry.
    cache.record_failure("[0::1]:9001")
    assert cache.worklist()[-1] == "[::1]:9001"
    refused = cache.classify(hint_from_wire("[::1]:9001", 7))
    assert isinstance(refused, Rejected)
    assert refused.rule == "endpoint_recently_failed"
    assert sorted(cache.worklist()) == sorted(cache.endpoints)  # no second spelling anywhere
    # An endpoint that is no configured node keeps its own spelling.
    assert cache.classify(hint_from_wire("Node-C:9000", 8)) == Follow(
        endpoint="Node-C:9000", epoch=8
    )
