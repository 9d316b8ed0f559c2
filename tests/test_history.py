"""LeadershipHistory: each rule is caught on a synthetic history, clean histories pass."""

from __future__ import annotations

import json
import math
import types
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from nodes import abandoned_campaign_hint

from leaderwatch.drivers import ManualDriver
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import Follower, Leader, LeaderState, Unknown
from leaderwatch.testing import (
    HistoryEvent,
    HistoryLineInvalid,
    HistoryViolated,
    HistoryViolation,
    LeadershipHistory,
    LeaderTerm,
)

A, B, C = "10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003"


def follows(endpoint: str | None, epoch: int | None) -> Follower:
    return Follower(leader_endpoint=endpoint, leader_epoch=epoch)


def history_of(*events: tuple[float, str, LeaderState | None]) -> LeadershipHistory:
    """``(t, node, state)`` triples; a ``None`` state marks the node gone. Nodes a, b, c
    advertise A, B, C."""
    history = LeadershipHistory()
    for node, endpoint in (("a", A), ("b", B), ("c", C)):
        history.declare(node, endpoint=endpoint)
    for t, node, state in events:
        if state is None:
            history.mark_gone(node, t=t)
        else:
            history.record(node, state, t=t)
    return history


def clean_failover() -> LeadershipHistory:
    """a leads at 1, is killed at 5; b takes over at 7 with epoch 2; c follows throughout."""
    return history_of(
        (0.0, "a", Unknown()),
        (0.0, "b", Unknown()),
        (0.0, "c", Unknown()),
        (1.0, "a", Leader(epoch=1)),
        (1.1, "b", follows(A, 1)),
        (1.1, "c", follows(A, 1)),
        (5.0, "a", None),
        (5.5, "b", Unknown()),
        (5.5, "c", Unknown()),
        (7.0, "b", Leader(epoch=2)),
        (7.1, "c", follows(B, 2)),
    )


def kinds(history: LeadershipHistory, **options: object) -> list[str]:
    return [violation.kind for violation in history.check(**options).violations]  # type: ignore[arg-type]


def test_a_clean_failover_passes_every_check() -> None:
    history = clean_failover()
    history.note_fault("kill9", 5.0, target="a")
    report = history.check(complete=True, converge_within=3.0)
    assert report.ok, report.describe()
    assert (report.nodes, report.events, report.terms) == (3, 11, 2)
    assert report.describe().startswith("history ok")
    report.raise_for_violations()  # nothing to raise


def test_leader_terms_span_from_leading_to_the_next_report() -> None:
    assert clean_failover().leader_terms() == [
        LeaderTerm(node="a", epoch=1, start=1.0, end=5.0),
        LeaderTerm(node="b", epoch=2, start=7.0, end=math.inf),
    ]


def test_an_epoch_going_down_is_reported_with_both_events() -> None:
    history = history_of(
        (1.0, "c", follows(A, 5)), (2.0, "c", Unknown()), (3.0, "c", follows(A, 3))
    )
    [violation] = history.check().violations
    assert violation.kind == "epoch_decreased"
    assert [(event.t, event.state) for event in violation.events] == [
        (1.0, follows(A, 5)),
        (3.0, follows(A, 3)),
    ]
    assert "c went from epoch 5 down to 3" in violation.message


def test_a_restarted_node_starts_a_new_epoch_sequence() -> None:
    history = history_of((1.0, "c", follows(A, 5)), (2.0, "c", None), (3.0, "c", follows(A, 5)))
    assert history.check().ok
    history.record("c", follows(A, 4), t=4.0)
    assert kinds(history) == ["epoch_decreased"]


def test_two_nodes_leading_at_one_epoch_is_caught_even_years_apart() -> None:
    history = history_of(
        (1.0, "a", Leader(epoch=2)),
        (2.0, "a", Unknown()),
        (100.0, "b", Leader(epoch=2)),
        (101.0, "b", Unknown()),
    )
    [violation] = history.check().violations
    assert violation.kind == "epoch_led_twice"
    assert [event.node for event in violation.events] == ["a", "b"]


@pytest.mark.parametrize(
    "states",
    [
        [Leader(epoch=2), follows(B, 2)],  # led at 2, then followed another leader at 2
        [follows(B, 2), Leader(epoch=2)],  # followed B at 2, then led at 2 itself
        [follows(B, 2), follows(C, 2)],  # two leaders named at one epoch
    ],
)
def test_one_node_seeing_two_leaders_at_one_epoch_is_caught(states: list[LeaderState]) -> None:
    history = history_of(*[(float(t), "a", state) for t, state in enumerate(states)])
    assert "epoch_names_two_leaders" in kinds(history)


def test_an_epoch_hint_without_an_endpoint_names_no_second_leader() -> None:
    history = history_of((0.0, "a", follows(None, 2)), (1.0, "a", follows(B, 2)))
    history.record("b", Leader(epoch=2), t=0.5)
    assert history.check(complete=True).ok


def test_overlapping_leaders_are_caught_beyond_the_margin_only() -> None:
    history = history_of(
        (0.0, "a", Leader(epoch=1)),
        (2.0, "a", Unknown()),
        (1.5, "b", Leader(epoch=2)),
        (9.0, "b", Unknown()),
    )
    assert history.check(overlap_margin=0.6).ok
    [violation] = history.check(overlap_margin=0.4).violations
    assert violation.kind == "leaders_overlap"
    assert "both led for 500.0 ms" in violation.message
    assert [(event.node, event.t) for event in violation.events] == [
        ("a", 0.0),
        ("b", 1.5),
        ("a", 2.0),
        ("b", 9.0),
    ]


def test_a_killed_leader_not_marked_gone_leads_for_ever() -> None:
    history = history_of((0.0, "a", Leader(epoch=1)), (5.0, "b", Leader(epoch=2)))
    [violation] = history.check(overlap_margin=100).violations
    assert violation.kind == "leaders_overlap"
    assert "for ever" in violation.message
    history.mark_gone("a", t=4.0)
    assert history.check().ok


def test_a_frozen_leader_does_not_overlap_while_frozen_but_does_once_resumed() -> None:
    def frozen(resumed_reports_at: float) -> LeadershipHistory:
        history = history_of(
            (0.0, "a", Leader(epoch=1)),
            (2.0, "b", Leader(epoch=2)),
            (resumed_reports_at, "a", Unknown()),
        )
        history.mark_paused("a", 1.0, 5.0)
        return history

    assert frozen(resumed_reports_at=5.1).check(overlap_margin=0.2).ok
    [violation] = frozen(resumed_reports_at=6.0).check(overlap_margin=0.2).violations
    assert violation.kind == "leaders_overlap"
    assert "1000.0 ms" in violation.message  # [5, 6] after it resumed; not the frozen [2, 5]
    unpaused = history_of(
        (0.0, "a", Leader(epoch=1)), (2.0, "b", Leader(epoch=2)), (5.1, "a", Unknown())
    )
    assert kinds(unpaused, overlap_margin=0.2) == ["leaders_overlap"]


def test_a_hint_at_an_epoch_nobody_led_is_caught_when_every_candidate_is_recorded() -> None:
    history = history_of((0.0, "a", Leader(epoch=1)), (0.1, "c", follows(A, 9)))
    assert history.check().ok
    [violation] = history.check(complete=True).violations
    assert violation.kind == "hint_unled_epoch"
    assert violation.events[0].state == follows(A, 9)


def test_a_hint_naming_another_endpoint_than_the_epochs_leader_is_caught() -> None:
    history = history_of((0.0, "b", Leader(epoch=3)), (0.1, "c", follows(A, 3)))
    [violation] = history.check().violations
    assert violation.kind == "hint_wrong_endpoint"
    assert "b (10.0.0.2:7002) led at that epoch" in violation.message
    # Spellings of one address are one endpoint.
    history = LeadershipHistory()
    history.declare("v6", endpoint="[::1]:9000")
    history.record("v6", Leader(epoch=1), t=0)
    history.record("o", follows("[0:0::1]:9000", 1), t=1)
    assert history.check(complete=True).ok


def test_convergence_counts_from_the_end_of_the_last_fault() -> None:
    history = clean_failover()
    history.note_fault("kill9", 5.0, 5.0, target="a")
    assert history.check(converge_within=2.2).ok  # c followed b at 7.1
    late = history.check(converge_within=1.0).violations
    assert [violation.kind for violation in late] == ["not_converged", "not_converged"]
    assert "b reached Leader(epoch=2) only 2.000s after the last fault" in late[0].message
    assert "c reached Follower(10.0.0.2:7002, 2) only 2.100s after the last fault" in (
        late[1].message
    )
    history.note_fault("member_pause", 4.0, 6.5)  # ended later: now within the bound
    assert history.check(converge_within=1.0).ok


def test_not_converged_when_no_single_leader_or_a_node_follows_someone_else() -> None:
    two = history_of((0.0, "a", Leader(epoch=1)), (0.0, "b", Leader(epoch=2)))
    assert kinds(two, converge_within=10, overlap_margin=math.inf) == ["not_converged"]
    none = history_of((0.0, "a", Unknown()), (0.0, "b", follows(A, 1)))
    assert "0 nodes lead" in none.check(converge_within=10).violations[0].message
    stale = history_of(
        (0.0, "a", Leader(epoch=1)),
        (0.0, "c", follows(A, 1)),
        (1.0, "a", Unknown()),
        (2.0, "b", Leader(epoch=2)),
        (2.1, "a", follows(B, 2)),
    )
    [violation] = stale.check(converge_within=10).violations
    assert violation.kind == "not_converged"
    assert violation.message.startswith("c ends as Follower(")
    endpointless = history_of((0.0, "a", Leader(epoch=1)), (0.0, "c", follows(None, 1)))
    assert kinds(endpointless, converge_within=10) == ["not_converged"]


def test_violations_name_the_fault_in_force() -> None:
    history = history_of((0.0, "a", Leader(epoch=1)), (3.0, "b", Leader(epoch=1)))
    history.mark_gone("a", t=2.0)
    history.note_fault("wipe", 2.5, 2.6, target="etcd")
    history.note_fault("later", 10.0)
    [violation] = history.check().violations
    assert violation.kind == "epoch_led_twice"
    assert violation.fault is not None
    assert violation.fault.kind == "wipe"
    assert "during/after fault wipe on etcd" in violation.describe()


def test_a_failed_check_raises_an_assertion_listing_every_violation() -> None:
    history = history_of((0.0, "a", Leader(epoch=2)), (1.0, "a", Leader(epoch=1)))
    history.record("b", Leader(epoch=2), t=5)
    report = history.check()
    assert report.counts() == {"epoch_decreased": 1, "epoch_led_twice": 1, "leaders_overlap": 1}
    with pytest.raises(HistoryViolated) as caught:
        report.raise_for_violations()
    assert isinstance(caught.value, AssertionError)
    assert isinstance(caught.value, LeaderwatchError)
    assert "3 history violation(s)" in str(caught.value)
    assert "t=1.000 a: Leader(epoch=1)" in str(caught.value)


def runner_line(node: str, t: float, state: LeaderState, **extra: object) -> str:
    return json.dumps(
        {"node": node, "pid": 1, "t": t, "wall": 0, "state": state.model_dump(mode="json"), **extra}
    )


def test_runner_json_lines_feed_the_history() -> None:
    history = LeadershipHistory()
    event = history.feed_json_line(runner_line("a", 1.5, Leader(epoch=4), endpoint=A))
    assert (event.t, event.node, event.state) == (1.5, "a", Leader(epoch=4))
    history.feed_json_line(runner_line("b", 1.6, follows(B, 4)).encode())
    assert history.endpoint_of("a") == A
    assert [violation.kind for violation in history.check().violations] == ["hint_wrong_endpoint"]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{", "not JSON"),
        ("[1]", "a JSON object"),
        ('{"t": 1, "state": {"kind": "unknown"}}', '"node"'),
        ('{"node": "a", "t": true, "state": {"kind": "unknown"}}', '"t"'),
        ('{"node": "a", "t": NaN, "state": {"kind": "unknown"}}', '"t"'),
        ('{"node": "a", "t": "1", "state": {"kind": "unknown"}}', '"t"'),
        ('{"node": "a", "t": 1, "state": {"kind": "boss"}}', '"state"'),
        ('{"node": "a", "t": 1, "state": {"kind": "leader", "epoch": -1}}', "epoch"),
        ('{"node": "a", "t": 1, "state": {"kind": "unknown"}, "endpoint": "http://h:1"}', "scheme"),
    ],
)
def test_bad_json_lines_are_refused_with_the_reason(line: str, says: str) -> None:
    history = LeadershipHistory()
    with pytest.raises(HistoryLineInvalid, match=says) as caught:
        history.feed_json_line(line)
    assert isinstance(caught.value, ValueError)
    assert history.events == []


def test_recording_refuses_what_is_not_a_state_and_bad_pauses() -> None:
    history = LeadershipHistory()
    with pytest.raises(TypeError, match="LeaderState"):
        history.record("a", "Leader")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        history.record("", Unknown())
    with pytest.raises(ValueError, match="must end after it starts"):
        history.mark_paused("a", 2.0, 1.0)
    with pytest.raises(ValueError, match="overlap_margin"):
        history.check(overlap_margin=-1)


def test_select_keeps_only_the_chosen_nodes() -> None:
    history = history_of((0.0, "a", Leader(epoch=1)), (0.0, "b", Leader(epoch=1)))
    assert not history.check().ok
    assert history.select(["a"]).check().ok
    assert history.select(["a"]).endpoint_of("a") == A
    assert history.select(["a"]).endpoint_of("b") is None


@pytest.mark.anyio
async def test_watch_records_a_drivers_values_in_process_and_marks_it_gone() -> None:
    history = LeadershipHistory()
    async with anyio.create_task_group() as task_group:
        driver = ManualDriver(node_id="m")
        async with driver:
            await task_group.start(history.watch, "m", driver.leadership())
            assert [event.state for event in history.events] == [Unknown()]
            driver.become_leader(3)
            # The watcher runs on the next scheduling steps.
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert len(history.events) == 2
    states = [event.state for event in history.events]
    assert states == [Unknown(), Leader(epoch=3), Unknown(), None]
    times = [event.t for event in history.events]
    assert times == sorted(times)
    assert history.check(converge_within=1).ok  # a gone node needs not converge


# -- the test suite's attribution of the documented residual of issue 11 defect 5 -----


class _Node:
    """What ``abandoned_campaign_hint`` reads of a node process."""

    def __init__(
        self, name: str, endpoint: str, logs: list[dict[str, object]], reports: list[float]
    ) -> None:
        self.name = name
        self.argv = ["leaderwatch", "campaign", "--endpoint", endpoint, "etcd://x"]
        self.stderr_lines = [json.dumps(line) + "\n" for line in logs]
        self.reports = [types.SimpleNamespace(t=t) for t in reports]


def _unled_hint(epoch: int, *, at: float = 10.0) -> HistoryViolation:
    return HistoryViolation(
        kind="hint_unled_epoch",
        message="follows an epoch nobody led at",
        events=(
            HistoryEvent(
                t=at,
                node="b",
                state=Follower(leader_endpoint="127.0.0.1:7300", leader_epoch=epoch),
                index=1,
            ),
        ),
    )


def _owner(*, was_leader: bool) -> _Node:
    return _Node(
        "a",
        "127.0.0.1:7300",
        [
            {"event": "etcd_campaign_started", "key": "e/1f", "create_revision": 11},
            {"event": "etcd_campaign_abandoned", "lease_id": "1f", "was_leader": was_leader},
        ],
        [],
    )


def test_only_a_hint_at_an_abandoned_waiting_campaign_is_attributed_with_its_duration() -> None:
    hinter = _Node("b", "127.0.0.1:7301", [], [9.0, 10.0, 10.25])
    nodes: Any = [_owner(was_leader=False), hinter]
    assert abandoned_campaign_hint(nodes, _unled_hint(11)) == pytest.approx(0.25)
    # Another epoch, another kind of violation, or a campaign that led: not attributed.
    assert abandoned_campaign_hint(nodes, _unled_hint(12)) is None
    other = _unled_hint(11).model_copy(update={"kind": "epoch_led_twice"})
    assert abandoned_campaign_hint(nodes, other) is None
    assert abandoned_campaign_hint([_owner(was_leader=True), hinter], _unled_hint(11)) is None
    # A hint never replaced lasts for ever.
    assert abandoned_campaign_hint(nodes, _unled_hint(11, at=10.25)) == math.inf
