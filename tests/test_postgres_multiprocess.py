"""Three ``leaderwatch campaign postgres://...`` processes on a real PostgreSQL server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from nodes import (
    NodeProcess,
    NodeSet,
    assert_epochs_never_decrease,
    assert_one_leader_per_epoch,
    postgres_url,
)
from pg_server import PostgresServer

from leaderwatch.state import Follower, Leader, Unknown

TTL = 2
MARGIN = 0.5  # the default for ttl=2
PROOF = TTL - MARGIN
SLACK = 0.3  # three processes and PostgreSQL on a loaded 2-core runner
assert SLACK < MARGIN  # else "stepped down before the lease could expire" would prove nothing
STARTUP = 20.0


@pytest.fixture
def cluster() -> Iterator[NodeSet]:
    with NodeSet() as nodes:
        yield nodes
        assert_epochs_never_decrease(nodes.nodes)
        assert_one_leader_per_epoch(nodes.nodes)


def spawn(
    cluster: NodeSet, postgres: PostgresServer, election: str, index: int, ttl: int
) -> NodeProcess:
    return cluster.spawn(
        postgres_url(postgres.dsn, election, ttl=ttl),
        "--endpoint",
        f"127.0.0.1:{7600 + index}",
        name=f"node{index}",
    )


def group(cluster: NodeSet, postgres: PostgresServer, ttl: int) -> tuple[NodeProcess, int]:
    """Start three candidates; return the leader once the group is stable, and its epoch."""
    election = f"mp-{uuid.uuid4().hex[:10]}"
    for index in range(3):
        spawn(cluster, postgres, election, index, ttl)
    leader = cluster.wait_stable(timeout=STARTUP)
    state = leader.state
    assert isinstance(state, Leader)
    return leader, state.epoch


def successor_after(cluster: NodeSet, old: NodeProcess, sent: float, epoch: int) -> float:
    """Wait for another node to lead above ``epoch``; return when it said so."""

    def higher(state: object) -> bool:
        return isinstance(state, Leader) and state.epoch > epoch

    def taken_over(nodes: NodeSet) -> bool:
        return any(
            node.first_report_after(sent, higher) is not None
            for node in nodes.nodes
            if node is not old
        )

    cluster.wait_for(taken_over, timeout=TTL + 15)
    reports = [
        report
        for node in cluster.nodes
        if node is not old and (report := node.first_report_after(sent, higher)) is not None
    ]
    assert len(reports) == 1, "more than one successor"
    return reports[0].t


def endpoint_of(node: NodeProcess) -> str:
    return node.argv[node.argv.index("--endpoint") + 1]


def assert_all_follow(cluster: NodeSet, new: NodeProcess) -> int:
    """Every running node other than ``new`` follows it; return its epoch."""
    state = new.state
    assert isinstance(state, Leader)
    for node in cluster.running():
        assert node is new or node.state == Follower(
            leader_endpoint=endpoint_of(new), leader_epoch=state.epoch
        ), node.describe()
    return state.epoch


def test_kill9_of_the_leader_elects_a_successor_with_a_higher_epoch(
    postgres: PostgresServer, cluster: NodeSet
) -> None:
    leader, epoch = group(cluster, postgres, TTL)
    sent = leader.kill9()
    took_over = successor_after(cluster, leader, sent, epoch)
    # The dead leader could not release. Its last renewal kept the lease alive
    # on the server for more than ttl - proof = margin past the kill...
    assert took_over - sent > MARGIN - SLACK
    # ...and the successor took it as soon as it expired: the lease ran at most
    # ttl past the kill (median and max over many rounds: benchmarks/failover.py).
    assert took_over - sent <= TTL + 0.5
    new = cluster.wait_stable(timeout=5)
    assert endpoint_of(new) != endpoint_of(leader)
    assert assert_all_follow(cluster, new) == epoch + 1


def test_graceful_exit_of_the_leader_hands_over_without_waiting_for_the_lease(
    postgres: PostgresServer, cluster: NodeSet
) -> None:
    leader, epoch = group(cluster, postgres, ttl=30)
    sent = leader.terminate()
    took_over = successor_after(cluster, leader, sent, epoch)
    assert took_over - sent < 2  # far below the 30 s lease: the leader released it
    assert leader.wait_exit(5) == 0
    assert leader.state == Unknown()
    new = cluster.wait_stable(timeout=5)
    assert endpoint_of(new) != endpoint_of(leader)
    assert assert_all_follow(cluster, new) == epoch + 1


def test_frozen_database_makes_the_leader_step_down_then_the_group_converges(
    postgres: PostgresServer, cluster: NodeSet
) -> None:
    leader, epoch = group(cluster, postgres, TTL)
    paused = postgres.pause()
    try:
        for node in cluster.nodes:
            node.wait_for_state(lambda state: state == Unknown(), timeout=PROOF + 2)
        stepped_down = leader.first_report_after(paused, lambda state: state == Unknown())
        assert stepped_down is not None
        # The last acknowledged renewal was sent before the freeze, so the
        # leader must have stepped down within ttl - margin of the freeze.
        assert stepped_down.t - paused <= PROOF + SLACK
        # Stay frozen past every lease's expiry.
        time.sleep(max(0.0, paused + TTL + 0.5 - time.monotonic()))
    finally:
        resumed = postgres.resume()
    new = cluster.wait_stable(timeout=15)
    state = new.state
    assert isinstance(state, Leader)
    assert state.epoch > epoch
    for node in cluster.nodes:
        frozen_leads = [
            report
            for report in node.reports
            if paused + PROOF + SLACK < report.t < resumed and isinstance(report.state, Leader)
        ]
        assert frozen_leads == [], f"{node.name} led while the database was frozen"


def test_a_database_restart_leaves_one_leader_and_epochs_that_never_go_down(
    postgres: PostgresServer, cluster: NodeSet
) -> None:
    leader, epoch = group(cluster, postgres, TTL)
    stopped = postgres.restart(down_for=TTL + 0.5)
    stepped_down = leader.first_report_after(stopped, lambda state: state == Unknown())
    assert stepped_down is not None
    assert stepped_down.t - stopped <= PROOF + SLACK
    new = cluster.wait_stable(timeout=15)
    assert assert_all_follow(cluster, new) > epoch
