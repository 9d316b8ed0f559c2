"""leaderwatch.prometheus: the collector over in-process objects (the HTTP scrape is elsewhere).

Every object of the process is reported, so each test names its objects
uniquely and reads only their series.
"""

from __future__ import annotations

import gc
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from leaderwatch import (
    LeaderCache,
    LeaderNode,
    LeaderWatch,
    LeaderWatchTask,
    ManualDriver,
    NotLeader,
)
from leaderwatch.client import REFUSAL_REASONS
from leaderwatch.hint import LeaderHint, MalformedHint
from leaderwatch.node import ADMISSION_REFUSAL_REASONS
from leaderwatch.prometheus import METRIC_NAMES, LeaderwatchCollector, collector
from leaderwatch.retry import AttemptPlan, ConnectFailed, GaveUp, RetryPolicy
from leaderwatch.serving import (
    FENCE_LATENCY_BUCKETS,
    BaseLeadershipHandler,
    NotServing,
    Serving,
)
from leaderwatch.state import Follower, Leader

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SELF = "127.0.0.1:7001"
OTHER = "127.0.0.1:7002"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    """One scrape of a fresh registry holding the collector, parsed as Prometheus would."""
    registry = CollectorRegistry()
    registry.register(collector())
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def series_of(samples: Samples, label: str, label_value: str) -> set[str]:
    return {name for name, labels in samples if (label, label_value) in labels}


async def published(node: LeaderNode, epoch: int | None) -> None:
    """Wait until the gate the node publishes (what the collector reads) serves at ``epoch``.

    ``None``: until it does not serve.
    """
    expected = NotServing if epoch is None else Serving
    receiver = node.serving
    with anyio.fail_after(5):
        await receiver.wait_for(
            lambda gate: type(gate) is expected and (epoch is None or gate == Serving(epoch=epoch))
        )
    receiver.close()


async def leading(driver: ManualDriver) -> None:
    receiver = driver.leadership()
    with anyio.fail_after(5):
        await receiver.wait_for(lambda state: isinstance(state, Leader))
    receiver.close()


class LeasedDriver(ManualDriver):
    """A manual driver whose leadership is proven until ``lease_until`` (anyio's clock)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id=node_id)
        self.lease_until = math.inf

    @property
    def proven_until(self) -> float:
        return self.lease_until if isinstance(self.current, Leader) else -math.inf


class HeldFence(BaseLeadershipHandler):
    def __init__(self) -> None:
        self.release = anyio.Event()

    async def on_leader(self, epoch: int) -> None:
        await self.release.wait()


# -- a node's story, in process --------------------------------------------------------------


async def test_a_node_reports_role_epoch_gate_admissions_refusals_and_hand_over() -> None:
    name = unique("story")
    driver = ManualDriver(node_id=name)
    node = LeaderNode(driver, self_endpoint=SELF, drain_timeout=1.0)

    before = scrape()
    assert value(before, "leaderwatch_role", node=name, role="unknown") == 1
    assert value(before, "leaderwatch_role", node=name, role="leader") == 0
    assert value(before, "leaderwatch_node_serving", node=name) == 0
    assert value(before, "leaderwatch_epoch", node=name) is None  # no epoch seen yet
    # Never entered: no event loop clock, so no lease proof is claimed.
    assert value(before, "leaderwatch_lease_proof_remaining_seconds", node=name) is None

    async with node:
        driver.become_leader(4)
        await published(node, 4)
        leading = scrape()
        assert value(leading, "leaderwatch_role", node=name, role="leader") == 1
        assert value(leading, "leaderwatch_role", node=name, role="unknown") == 0
        assert value(leading, "leaderwatch_epoch", node=name) == 4
        assert value(leading, "leaderwatch_transitions_total", node=name) == 1
        assert value(leading, "leaderwatch_task_gate_serving", node=name) == 1
        assert value(leading, "leaderwatch_node_serving", node=name) == 1
        assert value(leading, "leaderwatch_fence_latency_seconds_count", node=name) == 1
        assert value(leading, "leaderwatch_lease_proof_remaining_seconds", node=name) == math.inf
        assert value(leading, "leaderwatch_driver_campaigning", node=name) == 1
        assert (
            value(
                leading,
                "leaderwatch_driver_info",
                node=name,
                driver="ManualDriver",
                backend_endpoint="",
            )
            == 1
        )

        for _ in range(3):
            async with node.admit() as epoch:
                assert epoch == 4
        async with node.admit():
            assert value(scrape(), "leaderwatch_node_in_flight", node=name) == 1
        served = scrape()
        assert value(served, "leaderwatch_node_admitted_total", node=name) == 4
        assert value(served, "leaderwatch_node_in_flight", node=name) == 0

        assert not driver.become_leader(4)  # equal value: suppressed
        driver.become_follower(OTHER, 5)
        with pytest.raises(NotLeader):
            async with node.admit():
                pass
        driver.become_unknown()
        for _ in range(2):
            with pytest.raises(NotLeader):
                async with node.admit():
                    pass
        refused = scrape()
        assert value(refused, "leaderwatch_role", node=name, role="unknown") == 1
        assert value(refused, "leaderwatch_epoch", node=name) == 5
        assert value(refused, "leaderwatch_duplicates_suppressed_total", node=name) == 1
        assert value(refused, "leaderwatch_transitions_total", node=name) == 3
        counts = {
            reason: value(refused, "leaderwatch_node_refused_total", node=name, reason=reason)
            for reason in ADMISSION_REFUSAL_REASONS
        }
        assert counts == {
            "leader_elsewhere": 1,
            "no_leader": 2,
            "fencing": 0,
            "lease_expired": 0,
            "stepping_down": 0,
        }

        driver.become_leader(6)
        await published(node, 6)
        await node.step_down()
        await published(node, None)
        stepped_down = scrape()
        assert value(stepped_down, "leaderwatch_node_serving", node=name) == 0
        assert value(stepped_down, "leaderwatch_driver_campaigning", node=name) == 0
        assert value(stepped_down, "leaderwatch_role", node=name, role="unknown") == 1
        assert value(stepped_down, "leaderwatch_lease_proof_remaining_seconds", node=name) == 0
        drain = value(stepped_down, "leaderwatch_node_last_drain_seconds", node=name)
        assert drain is not None
        assert 0 <= drain < 1.0
        assert value(stepped_down, "leaderwatch_fence_latency_seconds_count", node=name) == 2


async def test_refusals_name_fencing_lease_expired_and_stepping_down() -> None:
    name = unique("reasons")
    driver = LeasedDriver(name)
    fence = HeldFence()
    node = LeaderNode(driver, fence, self_endpoint=SELF, drain_timeout=5.0)

    async def refused(reason: str) -> float | None:
        with pytest.raises(NotLeader):
            async with node.admit():
                pass
        return value(scrape(), "leaderwatch_node_refused_total", node=name, reason=reason)

    async with node, anyio.create_task_group() as tasks:
        driver.become_leader(1)
        await leading(driver)
        assert await refused("fencing") == 1  # on_leader still runs: 503, not a redirect

        fence.release.set()
        await published(node, 1)
        driver.lease_until = anyio.current_time() - 0.001
        assert await refused("lease_expired") == 1

        driver.lease_until = math.inf
        release_work = anyio.Event()
        admitted = anyio.Event()

        async def work() -> None:
            async with node.admit():
                admitted.set()
                await release_work.wait()

        tasks.start_soon(work)
        await admitted.wait()
        tasks.start_soon(node.step_down)
        await published(node, None)  # closed by the step-down
        assert await refused("stepping_down") == 1  # draining: the gate is closed, work runs
        release_work.set()


async def test_lease_proof_remaining_is_read_on_the_event_loop_clock_from_any_thread() -> None:
    name = unique("proof")
    driver = LeasedDriver(name)
    async with driver:
        driver.become_leader(2)
        driver.lease_until = anyio.current_time() + 5.0
        # From a worker thread, as prometheus_client's HTTP server scrapes (no event loop there;
        # on trio the loop's clock is offset from time.monotonic()).
        remaining = value(
            await anyio.to_thread.run_sync(scrape),
            "leaderwatch_lease_proof_remaining_seconds",
            node=name,
        )
        assert remaining is not None
        assert 4.0 < remaining <= 5.0
        driver.lease_until = anyio.current_time() - 1.0
        expired = await anyio.to_thread.run_sync(scrape)
        assert value(expired, "leaderwatch_lease_proof_remaining_seconds", node=name) == 0
        driver.become_unknown()
        follower = await anyio.to_thread.run_sync(scrape)
        assert value(follower, "leaderwatch_lease_proof_remaining_seconds", node=name) == 0


# -- the parts on their own ------------------------------------------------------------------


def test_watch_counts_suppressed_values_regressions_and_conflicts() -> None:
    name = unique("watch")
    watch = LeaderWatch(name)
    watch.publish(Leader(epoch=5))
    watch.publish(Leader(epoch=5))
    watch.publish(Follower(leader_endpoint=None, leader_epoch=3))  # below the high-water mark
    watch.publish(Follower(leader_endpoint=OTHER, leader_epoch=5))  # epoch 5 was this node's
    samples = scrape()
    assert value(samples, "leaderwatch_duplicates_suppressed_total", node=name) == 1
    assert value(samples, "leaderwatch_epoch_regressions_total", node=name) == 1
    assert value(samples, "leaderwatch_epoch_conflicts_total", node=name) == 1
    assert value(samples, "leaderwatch_epoch", node=name) == 5
    assert value(samples, "leaderwatch_role", node=name, role="unknown") == 1  # in their place
    # A watch alone is no driver, task or node.
    assert series_of(samples, "node", name) == {
        "leaderwatch_role",
        "leaderwatch_epoch",
        "leaderwatch_transitions_total",
        "leaderwatch_duplicates_suppressed_total",
        "leaderwatch_epoch_regressions_total",
        "leaderwatch_epoch_conflicts_total",
    }


async def test_fence_latency_histogram_counts_each_fence_in_its_bucket() -> None:
    name = unique("fence")
    now = [100.0]
    latencies = iter([0.03, 0.0004, 45.0])

    class TimedFence(BaseLeadershipHandler):
        async def on_leader(self, epoch: int) -> None:
            now[0] += next(latencies)

    watch = LeaderWatch(unique("fence-watch"))
    task = LeaderWatchTask(watch.subscribe(), TimedFence(), clock=lambda: now[0], node_id=name)
    assert task.node_id == name
    gate = task.serving
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(task.run)
        for epoch in (1, 2, 3):
            watch.publish(Leader(epoch=epoch))
            with anyio.fail_after(5):
                await gate.wait_for(lambda value, epoch=epoch: value == Serving(epoch=epoch))
        tasks.cancel_scope.cancel()

    stats = task.stats
    assert stats.fence_latency_sum == pytest.approx(45.0304)
    expected = [
        sum(latency <= bound for latency in (0.03, 0.0004, 45.0)) for bound in FENCE_LATENCY_BUCKETS
    ]
    assert list(stats.fence_latency_buckets) == expected
    samples = scrape()
    buckets = {
        bound: value(samples, "leaderwatch_fence_latency_seconds_bucket", node=name, le=bound)
        for bound in ("0.0005", "0.025", "0.05", "30.0", "60.0", "+Inf")
    }
    assert buckets == {"0.0005": 1, "0.025": 1, "0.05": 2, "30.0": 2, "60.0": 3, "+Inf": 3}
    assert value(samples, "leaderwatch_fence_latency_seconds_count", node=name) == 3
    assert value(samples, "leaderwatch_fence_latency_seconds_sum", node=name) == pytest.approx(
        45.0304
    )
    assert value(samples, "leaderwatch_task_transitions_handled_total", node=name) == 3
    assert value(samples, "leaderwatch_task_gate_serving", node=name) == 0  # stopped: closed


def test_client_cache_reports_moves_refusals_rejections_failures_and_give_ups() -> None:
    a, b = "127.0.0.1:7101", unique("client") + ".example:7102"
    cache = LeaderCache([a, b], tls_required=True)
    client = f"{a},{b}"
    assert cache.compare_and_set_leader(a, 3)  # a move: from nothing to a@3
    assert cache.record_success(a, 3)  # the same leader again: no move
    assert cache.compare_and_set_leader(b, 4)  # a move
    assert not cache.compare_and_set_leader(a, 2)  # stale
    cache.classify(
        MalformedHint(rule="endpoint_has_scheme", reason="x", wire_endpoint="http://h:1")
    )
    cache.classify(LeaderHint(leader_endpoint=b, leader_epoch=5))  # a move: same endpoint, epoch 5
    cache.record_failure(b)

    now = [0.0]
    plan = AttemptPlan(cache, RetryPolicy(deadline=1.0), safe_to_resend=True, clock=lambda: now[0])
    plan.start()
    now[0] = 2.0
    assert isinstance(plan.after(ConnectFailed(error="refused")), GaveUp)

    stats = cache.stats
    assert stats.moves == 3
    assert stats.gave_up == {"deadline_exceeded": 1}
    samples = scrape()
    assert value(samples, "leaderwatch_client_leader_moves_total", client=client) == 3
    assert value(samples, "leaderwatch_client_cached_epoch", client=client) == 5
    assert value(samples, "leaderwatch_client_endpoint_failures_total", client=client) == 2
    refused = {
        reason: value(
            samples, "leaderwatch_client_updates_refused_total", client=client, reason=reason
        )
        for reason in REFUSAL_REASONS
    }
    assert refused == {
        reason: (1 if reason == "epoch_below_cached" else 0) for reason in REFUSAL_REASONS
    }
    assert (
        value(
            samples,
            "leaderwatch_client_hints_rejected_total",
            client=client,
            rule="plaintext_downgrade",
        )
        == 1
    )
    gave_up = {
        reason: value(
            samples, "leaderwatch_client_requests_gave_up_total", client=client, reason=reason
        )
        for reason in ("deadline_exceeded", "max_redirects_exceeded", "outcome_unknown")
    }
    assert gave_up == {"deadline_exceeded": 1, "max_redirects_exceeded": 0, "outcome_unknown": 0}


class EndpointDriver(ManualDriver):
    """A driver that reports the backend endpoint it uses and its reconnections."""

    @property
    def backend_endpoint(self) -> str:
        return "db.internal:5432"

    @property
    def reconnects(self) -> int:
        return 3


def test_driver_reports_its_backend_endpoint_and_reconnects_when_it_has_them() -> None:
    name = unique("backend")
    driver = EndpointDriver(node_id=name)
    samples = scrape()
    assert (
        value(
            samples,
            "leaderwatch_driver_info",
            node=name,
            driver="EndpointDriver",
            backend_endpoint="db.internal:5432",
        )
        == 1
    )
    assert value(samples, "leaderwatch_driver_reconnects_total", node=name) == 3
    plain = unique("plain")
    other = ManualDriver(node_id=plain)
    assert value(scrape(), "leaderwatch_driver_reconnects_total", node=plain) is None
    del driver, other


# -- the weak registry -----------------------------------------------------------------------


def test_garbage_collected_objects_disappear_from_the_output() -> None:
    name = unique("gone")
    endpoints = [f"{name}.example:1", f"{name}.example:2"]

    def build() -> list[object]:
        driver = ManualDriver(node_id=name)
        node = LeaderNode(driver, self_endpoint=SELF)
        return [driver, node, LeaderCache(endpoints)]

    objects = build()
    present = scrape()
    assert "leaderwatch_role" in series_of(present, "node", name)  # the driver's watch
    assert "leaderwatch_driver_info" in series_of(present, "node", name)
    assert "leaderwatch_task_gate_serving" in series_of(present, "node", name)  # the node's task
    assert "leaderwatch_node_serving" in series_of(present, "node", name)
    assert series_of(present, "client", ",".join(endpoints))

    del objects
    gc.collect()
    absent = scrape()
    assert series_of(absent, "node", name) == set()
    assert series_of(absent, "client", ",".join(endpoints)) == set()


def test_objects_sharing_a_name_get_distinct_labels_for_life() -> None:
    name = unique("twin")
    first = ManualDriver(node_id=name)
    second = ManualDriver(node_id=name)
    samples = scrape()  # asserts that no series is duplicated
    assert value(samples, "leaderwatch_role", node=name, role="unknown") == 1
    assert value(samples, "leaderwatch_role", node=f"{name}#2", role="unknown") == 1
    del first
    gc.collect()
    after = scrape()
    assert series_of(after, "node", name) == set()
    assert value(after, "leaderwatch_role", node=f"{name}#2", role="unknown") == 1  # unchanged
    third = ManualDriver(node_id=name)
    assert value(scrape(), "leaderwatch_role", node=name, role="unknown") == 1  # name reused
    del second, third


async def test_objects_built_in_threads_are_all_reported() -> None:
    name = unique("threaded")

    def build(index: int) -> LeaderWatch:
        return LeaderWatch(f"{name}-{index}")

    watches = [await anyio.to_thread.run_sync(build, index) for index in range(8)]
    samples = await anyio.to_thread.run_sync(scrape)
    assert all(
        value(samples, "leaderwatch_role", node=w.node_id, role="unknown") == 1 for w in watches
    )


# -- the collector and its registry ----------------------------------------------------------


def test_a_registry_takes_one_collector_and_knows_its_names() -> None:
    registry = CollectorRegistry()
    registry.register(collector())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(collector())
    described = {family.name for family in LeaderwatchCollector().describe()}
    exposed = {re.sub(r"_(total|info)$", "", name) for name in METRIC_NAMES}
    assert described == exposed


def test_every_metric_has_the_conventional_shape_and_is_documented() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text()
    for family in LeaderwatchCollector().describe():
        assert re.fullmatch(r"leaderwatch_[a-z_]+", family.name), family.name
        if family.type == "counter":
            assert f"{family.name}_total" in METRIC_NAMES
        if "seconds" in family.name:
            assert family.name.endswith("_seconds"), family.name
    for name in METRIC_NAMES:
        assert f"`{name}`" in page, f"{name} is not documented in docs/metrics.md"


def test_importing_without_prometheus_client_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import leaderwatch.prometheus\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('imported without prometheus_client')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'leaderwatch[prometheus]'" in result.stdout


def test_the_documented_alert_rules_use_only_metrics_that_exist() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text()
    rules = re.search(r"^```yaml\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    assert rules is not None
    exposed = set(METRIC_NAMES) | {
        f"leaderwatch_fence_latency_seconds{suffix}" for suffix in ("_bucket", "_sum", "_count")
    }
    used = set(re.findall(r"leaderwatch_[a-z_]+", rules.group(1)))
    assert used
    assert used <= exposed, used - exposed
