"""LeaderNode: admission, lease proof, leader-only jobs, hand-over order and fail-fast."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup

import leaderwatch
from leaderwatch import (
    InvalidEndpoint,
    LeaderNode,
    LocalElectionDriver,
    ManualDriver,
    NotLeader,
    StaticDriver,
)
from leaderwatch.hint import LeaderHint, NoLeaderYet
from leaderwatch.node import EVENT_NAMES, InvalidNodeConfig, NodeStatus
from leaderwatch.redirect import Redirect, Serve
from leaderwatch.serving import (
    BaseLeadershipHandler,
    NotServing,
    RetryBackoff,
    Serving,
)
from leaderwatch.state import Leader
from leaderwatch.testing import capture_events

pytestmark = pytest.mark.anyio

SELF = "node-a:9000"
B = "node-b:9000"
FAST = RetryBackoff(initial=0.001, maximum=0.002)


class LeasedDriver(ManualDriver):
    """A manual driver with a lease: ``lease_until`` (anyio clock) bounds its proof.

    Every resignation is appended to ``order`` as ``"resigned"``.
    """

    def __init__(self, order: list[str] | None = None) -> None:
        super().__init__(node_id="leased")
        self.lease_until = math.inf
        self.order = [] if order is None else order

    @property
    def proven_until(self) -> float:
        return self.lease_until if isinstance(self.current, Leader) else -math.inf

    async def _resign(self) -> None:
        self.order.append("resigned")
        await super()._resign()


class FailingDriver(ManualDriver):
    """A manual driver whose background task raises once ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__(node_id="failing")
        self.fail = anyio.Event()

    async def _start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._fail_when_told)

    async def _fail_when_told(self) -> None:
        await self.fail.wait()
        raise RuntimeError("driver broke")


class HeldFence(BaseLeadershipHandler):
    """``on_leader`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.entered = anyio.Event()

    async def on_leader(self, epoch: int) -> None:
        self.entered.set()
        await self.release.wait()


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Return once ``predicate()`` holds; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        # Counters and gates read by property offer no event to wait on: poll.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)


async def serving(node: LeaderNode, epoch: int) -> None:
    with anyio.fail_after(5):
        await node.serving.wait_for(lambda gate: gate == Serving(epoch=epoch))


def refusal(error: pytest.ExceptionInfo[NotLeader]) -> Redirect | NoLeaderYet:
    return error.value.decision


# --- admission ---------------------------------------------------------------------------


async def test_admits_only_while_serving_and_refuses_with_the_decision() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    with pytest.raises(NotLeader) as before:
        async with node.admit():
            pytest.fail("admitted before the node runs")
    assert refusal(before) == NoLeaderYet()
    async with node:
        with pytest.raises(NotLeader) as unknown:
            async with node.admit():
                pytest.fail("admitted without a leader")
        assert refusal(unknown) == NoLeaderYet()
        driver.become_follower(B, 3)
        await node.serving.wait_for(
            lambda gate: gate == NotServing(leader_endpoint=B, leader_epoch=3)
        )
        with pytest.raises(NotLeader, match="node-b:9000 at epoch 3") as follower:
            async with node.admit():
                pytest.fail("admitted on a follower")
        assert refusal(follower) == Redirect(hint=LeaderHint(leader_endpoint=B, leader_epoch=3))
        driver.become_leader(4)
        await serving(node, 4)
        async with node.admit() as epoch:
            assert epoch == 4
            assert node.stats.in_flight == 1
        async with node.admit() as epoch:
            assert epoch == 4
        stats = node.stats
        assert stats.admitted == {4: 2}
        assert stats.in_flight == 0
        # The refusal before entering counts too.
        assert (stats.redirected, stats.unavailable) == (1, 2)


async def test_a_node_still_fencing_says_no_leader_yet_never_a_redirect_to_itself() -> None:
    driver = ManualDriver()
    fence = HeldFence()
    node = LeaderNode(driver, fence, self_endpoint=SELF)
    async with node:
        driver.become_leader(5)
        await fence.entered.wait()
        assert node.gate == NotServing(leader_epoch=5)
        assert node.decide() == NoLeaderYet(leader_epoch=5)
        with pytest.raises(NotLeader) as fencing:
            async with node.admit():
                pytest.fail("admitted during the fence")
        assert refusal(fencing) == NoLeaderYet(leader_epoch=5)
        # A record naming this node, however spelled, is never a redirect target.
        driver.become_follower("NODE-A:9000", 6)
        await node.serving.wait_for(lambda gate: gate.leader_epoch == 6)  # type: ignore[union-attr]
        assert node.decide() == NoLeaderYet(leader_epoch=6)
        fence.release.set()


async def test_gate_and_decision_are_the_same_objects_while_nothing_changes() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    async with node:
        driver.become_follower(B, 2)
        await node.serving.wait_for(lambda gate: gate.leader_epoch == 2)  # type: ignore[union-attr]
        first = node.decide()
        assert first == Redirect(hint=LeaderHint(leader_endpoint=B, leader_epoch=2))
        assert all(node.decide() is first for _ in range(100))
        assert all(node.gate is node.gate for _ in range(100))
        driver.become_leader(3)
        await serving(node, 3)
        served = node.decide()
        assert served == Serve(epoch=3)
        assert node.decide() is served
        # Leadership moved on but the task has not run yet: the gate closes at once, and
        # the closed value is still one object.
        driver.become_unknown()
        closed = node.gate
        assert closed == NotServing()
        assert node.gate is closed
        assert node.task.current_gate is node.task.current_gate
        assert node.decide() is node.decide()
        assert node.decide() == NoLeaderYet()


async def test_leadership_status_and_stats() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    assert node.status() == NodeStatus(
        state="unknown", gate="not_serving", epoch=None, leader_endpoint=None, node_endpoint=SELF
    )
    async with node:
        driver.become_follower(B, 7)
        await node.serving.wait_for(lambda gate: gate.leader_epoch == 7)  # type: ignore[union-attr]
        assert node.leadership == leaderwatch.Follower(leader_endpoint=B, leader_epoch=7)
        assert node.status() == NodeStatus(
            state="follower",
            gate="not_serving",
            epoch=7,
            leader_endpoint=B,
            node_endpoint=SELF,
        )
        driver.become_leader(8)
        await serving(node, 8)
        assert node.status() == NodeStatus(
            state="leader", gate="serving", epoch=8, leader_endpoint=SELF, node_endpoint=SELF
        )


async def test_construction_checks_its_arguments(tmp_path: Path) -> None:
    local = LocalElectionDriver(tmp_path, node_endpoint="127.0.0.1:7001")
    assert LeaderNode(local).self_endpoint == "127.0.0.1:7001"
    assert LeaderNode(local, self_endpoint="127.0.0.1:7001").self_endpoint == "127.0.0.1:7001"
    with pytest.raises(InvalidNodeConfig, match="as its driver advertises it"):
        LeaderNode(local, self_endpoint="127.0.0.1:7002")
    assert LeaderNode(StaticDriver()).self_endpoint is None
    with pytest.raises(InvalidEndpoint, match="scheme"):
        LeaderNode(StaticDriver(), self_endpoint="http://node-a:9000")
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(InvalidNodeConfig, match="drain_timeout must be finite"):
            LeaderNode(StaticDriver(), drain_timeout=bad)
    with pytest.raises(InvalidNodeConfig, match="drain_timeout must be a number"):
        LeaderNode(StaticDriver(), drain_timeout="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="leadership driver"):
        LeaderNode(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseLeadershipHandler"):
        LeaderNode(StaticDriver(), object())  # type: ignore[arg-type]


async def test_a_node_is_entered_once() -> None:
    node = LeaderNode(StaticDriver())
    async with node:
        with pytest.raises(RuntimeError, match="only once"):
            await node.__aenter__()
    with pytest.raises(RuntimeError, match="only once"):
        async with node:
            pass


async def test_top_level_exports() -> None:
    assert leaderwatch.LeaderNode is LeaderNode
    assert issubclass(NotLeader, leaderwatch.LeaderwatchError)
    assert {"LeaderNode", "NotLeader"} <= set(leaderwatch.__all__)


# --- lease proof -------------------------------------------------------------------------


async def test_a_loop_frozen_past_the_lease_admits_nothing_when_it_resumes() -> None:
    driver = LeasedDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    async with node:
        driver.become_leader(1)
        await serving(node, 1)
        driver.lease_until = anyio.current_time() + 0.05
        async with node.admit() as epoch:
            assert epoch == 1
        time.sleep(0.1)  # noqa: ASYNC251 - freeze the event loop past the lease on purpose
        # Checked before any other task ran since the freeze.
        assert node.task.current_gate == Serving(epoch=1)
        assert node.gate == NotServing(leader_epoch=1)
        assert node.decide() == NoLeaderYet(leader_epoch=1)
        with pytest.raises(NotLeader) as expired:
            async with node.admit():
                pytest.fail("admitted past the lease")
        assert refusal(expired) == NoLeaderYet(leader_epoch=1)
        assert node.stats.lease_expired == 1
        # A renewed lease (same term) serves again.
        driver.lease_until = anyio.current_time() + 60
        assert node.gate == Serving(epoch=1)
        async with node.admit() as epoch:
            assert epoch == 1


async def test_work_in_flight_is_cancelled_when_the_lease_runs_out() -> None:
    driver = LeasedDriver()
    node = LeaderNode(driver)
    outcome: list[object] = []

    async def work() -> None:
        try:
            async with node.admit():
                await anyio.sleep_forever()
        except NotLeader as error:
            outcome.append(error.decision)

    async with node, anyio.create_task_group() as tg:
        driver.lease_until = anyio.current_time() + 0.5
        driver.become_leader(1)
        await serving(node, 1)
        tg.start_soon(work)
        await until(lambda: node.stats.in_flight == 1)
        await until(lambda: bool(outcome))
        assert anyio.current_time() >= driver.lease_until
    assert outcome == [NoLeaderYet(leader_epoch=1)]
    assert node.stats.cancelled == 1


async def test_work_in_flight_is_cancelled_when_leadership_moves_on() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    outcome: list[str] = []

    async def work() -> None:
        try:
            async with node.admit():
                await anyio.sleep_forever()
        except NotLeader as error:
            outcome.append(str(error))

    with capture_events() as logs:
        async with node, anyio.create_task_group() as tg:
            driver.become_leader(1)
            await serving(node, 1)
            tg.start_soon(work)
            await until(lambda: node.stats.in_flight == 1)
            driver.become_follower(B, 2)
            await until(lambda: bool(outcome))
    assert "was cancelled" in outcome[0]
    assert "partly done" in outcome[0]
    cancelled = [entry for entry in logs if entry["event"] == "leader_node_work_cancelled"]
    assert cancelled[0]["reason"] == "leadership_lost"
    assert cancelled[0]["epoch"] == 1


async def test_work_that_ends_before_its_cancellation_arrives_leaks_no_cancellation() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    async with node:
        driver.become_leader(1)
        await serving(node, 1)
        async with node.admit():
            # The node cancels while this task runs (as from another task): the work
            # then completes without reaching a checkpoint.
            node._cancel_work(None, "test")
        await anyio.lowlevel.checkpoint()  # the cancellation must not hit later code
        with pytest.raises(LookupError, match="own error"):  # noqa: PT012
            async with node.admit():
                node._cancel_work(None, "test")
                raise LookupError("own error")
        await anyio.lowlevel.checkpoint()
        assert node.stats.in_flight == 0


async def test_an_outer_cancellation_at_the_same_time_is_not_swallowed() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    async with node:
        driver.become_leader(1)
        await serving(node, 1)
        reached_after = False
        with anyio.CancelScope() as outer:
            async with node.admit():
                outer.cancel()
                node._cancel_work(None, "test")
                await anyio.sleep(10)
            reached_after = True
        assert outer.cancelled_caught
        assert not reached_after
        assert node.stats.in_flight == 0
        await anyio.lowlevel.checkpoint()


# --- leader-only jobs --------------------------------------------------------------------


async def test_run_as_leader_runs_once_per_term_and_stops_with_it() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    seen: list[tuple[str, int]] = []

    async def job(epoch: int) -> None:
        seen.append(("start", epoch))
        try:
            await anyio.sleep_forever()
        finally:
            seen.append(("stop", epoch))

    returned = anyio.Event()

    async def run_jobs() -> None:
        await node.run_as_leader(job)
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_jobs)  # waits for the node to start
        async with node:
            await anyio.sleep(0.01)
            assert seen == []
            driver.become_leader(1)
            await until(lambda: seen == [("start", 1)])
            driver.become_follower(B, 2)
            await until(lambda: seen[-1] == ("stop", 1))
            driver.become_leader(3)
            await until(lambda: seen[-1] == ("start", 3))
            # The same term never starts the job twice.
            await anyio.sleep(0.02)
            assert seen == [("start", 1), ("stop", 1), ("start", 3)]
            await node.step_down()
            assert seen[-1] == ("stop", 3)
            await returned.wait()
    assert node.stats.job_starts == 2


async def test_a_failing_job_is_logged_and_restarted_with_backoff() -> None:
    node = LeaderNode(StaticDriver(epoch=2), job_backoff=FAST)
    attempts: list[int] = []
    settled = anyio.Event()

    async def flaky(epoch: int) -> None:
        attempts.append(epoch)
        if len(attempts) < 3:
            raise ValueError(f"attempt {len(attempts)} failed")
        settled.set()
        await anyio.sleep_forever()

    with capture_events() as logs:
        async with node, anyio.create_task_group() as tg:
            tg.start_soon(node.run_as_leader, flaky)
            with anyio.fail_after(5):
                await settled.wait()
            assert node.gate == Serving(epoch=2)  # the node is unaffected
            await node.step_down()
    assert attempts == [2, 2, 2]
    failures = [entry for entry in logs if entry["event"] == "leader_job_failed"]
    assert [entry["log_level"] for entry in failures] == ["error", "error"]
    assert failures[0]["error"] == "ValueError('attempt 1 failed')"
    assert failures[1]["retry_in_s"] >= failures[0]["retry_in_s"]
    assert node.stats.job_failures == 2
    ours = {
        entry["event"] for entry in logs if entry["event"].startswith(("leader_node", "leader_job"))
    }
    assert ours <= set(EVENT_NAMES)
    assert {"leader_node_started", "leader_job_started", "leader_job_failed"} <= ours


async def test_a_job_raising_a_base_exception_propagates_but_leaves_the_node_up() -> None:
    class Fatal(BaseException):
        pass

    async def fatal(epoch: int) -> None:
        raise Fatal(epoch)

    node = LeaderNode(StaticDriver(epoch=4))
    async with node:
        with pytest.raises(Fatal):
            await node.run_as_leader(fatal)
        await serving(node, 4)
        async with node.admit() as epoch:
            assert epoch == 4


async def test_a_job_that_returns_is_done_for_its_term() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    runs: list[int] = []

    async def once(epoch: int) -> None:
        runs.append(epoch)

    async with node, anyio.create_task_group() as tg:
        tg.start_soon(node.run_as_leader, once)
        driver.become_leader(1)
        await until(lambda: runs == [1])
        await anyio.sleep(0.02)
        assert runs == [1]
        driver.become_unknown()
        driver.become_leader(2)
        await until(lambda: runs == [1, 2])
        await node.step_down()


# --- hand-over ---------------------------------------------------------------------------


async def test_step_down_closes_the_gate_drains_stops_jobs_then_resigns() -> None:
    order: list[str] = []
    driver = LeasedDriver(order)
    node = LeaderNode(driver, self_endpoint=SELF, drain_timeout=10)
    finish_work = anyio.Event()

    async def work() -> None:
        async with node.admit() as epoch:
            assert epoch == 1
            await finish_work.wait()
            await anyio.sleep(0.01)
            order.append("work_finished")

    async def job(epoch: int) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            order.append("job_stopped")

    async with node, anyio.create_task_group() as tg:
        driver.become_leader(1)
        await serving(node, 1)
        tg.start_soon(node.run_as_leader, job)
        tg.start_soon(work)
        await until(lambda: node.stats.in_flight == 1 and node.stats.job_starts == 1)
        tg.start_soon(node.step_down)
        await until(lambda: isinstance(node.gate, NotServing))
        order.append("gate_closed")
        with pytest.raises(NotLeader) as closed:
            async with node.admit():
                pytest.fail("admitted while stepping down")
        assert refusal(closed) == NoLeaderYet(leader_epoch=1)
        await anyio.sleep(0.02)
        assert order == ["gate_closed"]  # jobs keep running while admitted work drains
        finish_work.set()
        await node.step_down()  # a second call waits for the first
        assert order == ["gate_closed", "work_finished", "job_stopped", "resigned"]
        assert driver.campaigning is False
        # The node keeps observing: it now redirects to the successor.
        driver.become_follower(B, 2)
        await node.serving.wait_for(lambda gate: gate.leader_epoch == 2)  # type: ignore[union-attr]
        assert node.decide() == Redirect(hint=LeaderHint(leader_endpoint=B, leader_epoch=2))
    assert order.count("resigned") == 2  # once by step_down, once (idempotent) on exit
    assert node.stats.last_drain_s is not None
    assert node.stats.cancelled == 0


async def test_the_drain_timeout_cancels_work_that_does_not_finish() -> None:
    order: list[str] = []
    driver = LeasedDriver(order)
    node = LeaderNode(driver, drain_timeout=0.05)

    messages: list[str] = []

    async def straggler() -> None:
        try:
            async with node.admit():
                await anyio.sleep_forever()
        except NotLeader as error:
            order.append("work_cancelled")
            messages.append(str(error))

    with capture_events() as logs:
        async with node, anyio.create_task_group() as tg:
            driver.become_leader(1)
            await serving(node, 1)
            tg.start_soon(straggler)
            await until(lambda: node.stats.in_flight == 1)
            started = anyio.current_time()
            await node.step_down()
            assert anyio.current_time() - started >= 0.05
    assert order[:2] == ["work_cancelled", "resigned"]
    assert "drain timeout (0.05 s)" in messages[0]
    assert node.stats.cancelled == 1
    assert any(entry["event"] == "leader_node_drain_timeout" for entry in logs)


async def test_leaving_the_node_hands_over_like_step_down() -> None:
    order: list[str] = []
    driver = LeasedDriver(order)
    node = LeaderNode(driver, drain_timeout=10)

    async def work() -> None:
        async with node.admit():
            await anyio.sleep(0.05)
            order.append("work_finished")

    async with anyio.create_task_group() as tg:
        async with node:
            driver.become_leader(1)
            await serving(node, 1)
            tg.start_soon(work)
            await until(lambda: node.stats.in_flight == 1)
        order.append("exited")
    assert order[:3] == ["work_finished", "resigned", "resigned"]
    assert node.gate == NotServing()


async def test_step_down_on_a_node_that_is_not_running_returns() -> None:
    node = LeaderNode(StaticDriver())
    await node.step_down()
    async with node:
        pass
    await node.step_down()


async def test_step_down_hands_over_to_another_local_node(tmp_path: Path) -> None:
    first = LeaderNode(
        LocalElectionDriver(tmp_path, node_endpoint="127.0.0.1:7001", poll_interval=0.01)
    )
    second = LeaderNode(
        LocalElectionDriver(tmp_path, node_endpoint="127.0.0.1:7002", poll_interval=0.01)
    )
    served: list[tuple[str, int, float, float]] = []

    async def request(node: LeaderNode, name: str) -> None:
        try:
            async with node.admit() as epoch:
                start = anyio.current_time()
                await anyio.sleep(0.002)
                served.append((name, epoch, start, anyio.current_time()))
        except NotLeader:
            pass

    async def load(stop: anyio.Event) -> None:
        while not stop.is_set():
            await request(first, "first")
            await request(second, "second")
            await anyio.sleep(0.001)

    async with first, second, anyio.create_task_group() as tg:
        await until(lambda: isinstance(first.gate, Serving) or isinstance(second.gate, Serving))
        leader, other = (first, second) if isinstance(first.gate, Serving) else (second, first)
        stop = anyio.Event()
        tg.start_soon(load, stop)
        await until(lambda: len(served) >= 5)
        await leader.step_down()
        await until(lambda: isinstance(other.gate, Serving))
        assert isinstance(leader.decide(), Redirect | NoLeaderYet)
        await until(
            lambda: (
                leader.decide()
                == Redirect(hint=LeaderHint(leader_endpoint=other.self_endpoint, leader_epoch=2))
            )
        )
        await until(lambda: any(epoch == 2 for _, epoch, _, _ in served))
        stop.set()
    old = [entry for entry in served if entry[1] == 1]
    new = [entry for entry in served if entry[1] == 2]
    assert old
    assert new
    assert max(end for *_, end in old) <= min(start for *_, start, _ in new)
    assert {name for name, *_ in old} != {name for name, *_ in new}


# --- fail fast ---------------------------------------------------------------------------


async def test_a_driver_failing_after_start_up_stops_serving_and_is_raised() -> None:
    driver = FailingDriver()
    node = LeaderNode(driver)
    outcome: list[str] = []
    body_cancelled = False

    async def work() -> None:
        try:
            async with node.admit():
                await anyio.sleep_forever()
        except NotLeader:
            outcome.append("cancelled")

    # The work runs outside the node's body, as a server's request tasks do.
    with capture_events() as logs:
        async with anyio.create_task_group() as tg:
            with pytest.raises(RuntimeError, match="driver broke"):  # noqa: PT012
                async with node:
                    driver.become_leader(1)
                    await serving(node, 1)
                    tg.start_soon(work)
                    await until(lambda: node.stats.in_flight == 1)
                    driver.fail.set()
                    try:
                        await anyio.sleep(10)
                    except anyio.get_cancelled_exc_class():
                        body_cancelled = True
                        # The gate closes while the body is still unwinding, not only after.
                        with anyio.CancelScope(shield=True):
                            await until(lambda: isinstance(node.gate, NotServing), within=1)
                        raise
    assert body_cancelled
    assert outcome == ["cancelled"]
    assert node.gate == NotServing()
    failed = [entry for entry in logs if entry["event"] == "leader_node_failed"]
    assert failed[0]["log_level"] == "error"
    assert "driver broke" in failed[0]["error"]


async def test_a_failing_leadership_task_stops_the_node_at_once() -> None:
    class BrokenFence(BaseLeadershipHandler):
        async def on_leader(self, epoch: int) -> None:
            raise ValueError("fence cannot reach its store")

    driver = ManualDriver()
    node = LeaderNode(driver, BrokenFence())
    with capture_events() as logs, pytest.raises(ValueError, match="cannot reach its store"):  # noqa: PT012
        async with node:
            driver.become_leader(1)
            await anyio.sleep(10)
            pytest.fail("the body was not cancelled")
    assert node.gate == NotServing()
    assert any(entry["event"] == "leader_node_failed" for entry in logs)
    assert driver.campaigning is False


async def test_an_error_in_the_body_propagates_and_is_not_a_node_failure() -> None:
    order: list[str] = []
    driver = LeasedDriver(order)
    with capture_events() as logs, pytest.raises(KeyError):  # noqa: PT012
        async with LeaderNode(driver):
            driver.become_leader(1)
            raise KeyError("body")
    assert not any(entry["event"] == "leader_node_failed" for entry in logs)
    assert "resigned" in order


async def test_lifespan_enters_the_node_or_leaves_a_running_one_alone() -> None:
    driver = StaticDriver(epoch=3)
    node = LeaderNode(driver, exit_on_failure=False)
    async with node.lifespan(object()):
        await serving(node, 3)
        async with node.lifespan(object()):  # already running (as under uvicorn.serve)
            assert node.gate == Serving(epoch=3)
        assert node.gate == Serving(epoch=3)
    assert node.gate == NotServing()


async def test_lifespan_raises_a_failure_after_start_up() -> None:
    driver = FailingDriver()
    node = LeaderNode(driver, exit_on_failure=False)
    with capture_events() as logs, pytest.raises(RuntimeError, match="driver broke"):  # noqa: PT012
        async with node.lifespan(object()):
            driver.fail.set()
            await anyio.sleep(10)
    assert not any(entry["event"] == "leader_node_terminating_process" for entry in logs)


def test_docs_page_names_every_event() -> None:
    import leaderwatch.uvicorn

    page = (Path(__file__).resolve().parent.parent / "docs" / "http-services.md").read_text()
    for name in (*EVENT_NAMES, *leaderwatch.uvicorn.EVENT_NAMES):
        assert f"`{name}`" in page, name
