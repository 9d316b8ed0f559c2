"""Prometheus metrics for every live leaderwatch object (``pip install 'leaderwatch[prometheus]'``).

::

    from prometheus_client import REGISTRY
    from leaderwatch.prometheus import collector

    REGISTRY.register(collector())

The collector reports every leaderwatch object alive in the process —
leadership watches (and so every driver's), drivers, serving tasks,
:class:`~leaderwatch.node.LeaderNode` objects and client
:class:`~leaderwatch.client.LeaderCache` objects (and so every leader-aware
client's) — found through a weak registry their constructors fill: nothing
is wired per object, and an object that is garbage-collected drops out of
the output. It reads the counters the objects keep anyway (their ``stats``)
at scrape time; it keeps no counter of its own.

Series are labelled ``node`` (the driver's or watch's ``node_id``) or, for
clients, ``client`` (the configured endpoints, comma-separated). While two
live objects of one kind share a name, the later ones are labelled
``name#2``, ``name#3``, … so every series stays unique. Label values come
from configuration and fixed sets of reasons, never from requests, so the
number of series is bounded by the number of live objects.

Scraping is safe from any thread (prometheus_client's HTTP server thread
included): the collector only reads, and converts lease proofs from the
event loop's clock itself. :data:`METRIC_NAMES` lists every metric;
``docs/metrics.md`` documents them.
"""

from __future__ import annotations

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as _missing:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "leaderwatch.prometheus needs prometheus_client, which is not installed: "
        "pip install 'leaderwatch[prometheus]'"
    ) from _missing

import math
import time
from collections.abc import Iterable, Iterator
from typing import Final, Literal, NamedTuple, get_args

from leaderwatch import _registry
from leaderwatch.client import REFUSAL_REASONS, LeaderCache
from leaderwatch.drivers._base import DriverBase
from leaderwatch.node import ADMISSION_REFUSAL_REASONS, LeaderNode
from leaderwatch.retry import GiveUpReason
from leaderwatch.serving import FENCE_LATENCY_BUCKETS, LeaderWatchTask, Serving
from leaderwatch.state import Follower, Leader
from leaderwatch.watch import LeaderWatch

__all__ = ["METRIC_NAMES", "LeaderwatchCollector", "collector"]

_BACKEND_ENDPOINT_ATTRIBUTES: Final = ("backend_endpoint", "etcd_endpoint", "database_endpoint")
"""Driver properties read, in order, for the backend endpoint in use (first string wins)."""


class _Spec(NamedTuple):
    name: str
    kind: Literal["counter", "gauge", "histogram", "info"]
    help: str
    labels: tuple[str, ...]
    unit: str = ""


_NODE = ("node",)
_CLIENT = ("client",)

_SPECS: Final = (
    # -- LeaderWatch: what this node's leadership is and how it moved --------------------------
    _Spec(
        "leaderwatch_role",
        "gauge",
        "1 for the node's current leadership kind (role: leader, follower, unknown), 0 otherwise.",
        ("node", "role"),
    ),
    _Spec(
        "leaderwatch_epoch",
        "gauge",
        "The highest epoch the node has published (as leader or follower); never decreases.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_transitions",
        "counter",
        "Leadership values delivered to subscribers (each one a change).",
        _NODE,
    ),
    _Spec(
        "leaderwatch_duplicates_suppressed",
        "counter",
        "Leadership values offered equal to the current one, which woke nobody.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_epoch_regressions",
        "counter",
        "Leadership values refused because their epoch was below the node's high-water mark.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_epoch_conflicts",
        "counter",
        "Leadership values refused because their epoch already named another leader.",
        _NODE,
    ),
    # -- drivers: the election backend's side --------------------------------------------------
    _Spec(
        "leaderwatch_driver",
        "info",
        "The node's driver (driver: its class) and the backend endpoint it uses now "
        "(backend_endpoint: etcd member or database, empty when none).",
        _NODE,
    ),
    _Spec(
        "leaderwatch_driver_campaigning",
        "gauge",
        "1 while the driver seeks leadership, 0 after it resigned or stopped.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_lease_proof_remaining_seconds",
        "gauge",
        "Seconds the driver's current leadership stays proven by its backend "
        "(+Inf without a lease, 0 when the node does not lead or the proof ran out).",
        _NODE,
        "seconds",
    ),
    _Spec(
        "leaderwatch_driver_reconnects",
        "counter",
        "Backend connections the driver re-established (drivers that count them).",
        _NODE,
    ),
    # -- LeaderWatchTask: the fence and its gate ------------------------------------------------
    _Spec(
        "leaderwatch_task_gate_serving",
        "gauge",
        "1 while the serving task's gate is open: the node leads and on_leader completed.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_fence_latency_seconds",
        "histogram",
        "Seconds from Leader observed to Serving published (on_leader included), per fence.",
        _NODE,
        "seconds",
    ),
    _Spec(
        "leaderwatch_fences_superseded",
        "counter",
        "on_leader calls cancelled, or finished too late, because leadership moved on.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_task_transitions_handled",
        "counter",
        "Leadership values the serving task handed to its handler.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_handler_retries",
        "counter",
        "Handler calls retried after a TransientLeadershipError.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_handler_failures",
        "counter",
        "Handler calls that raised another exception (each one stops the task).",
        _NODE,
    ),
    # -- LeaderNode: admission, refusals, hand-over ---------------------------------------------
    _Spec(
        "leaderwatch_node_serving",
        "gauge",
        "1 while the node admits leader-only work: fenced, lease proven, not stepping down.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_node_admitted",
        "counter",
        "Units of leader-only work (requests) admitted.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_node_in_flight",
        "gauge",
        "Admitted work not finished yet.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_node_refused",
        "counter",
        "Admissions refused, by reason: leader_elsewhere (a redirect, HTTP 307); no_leader, "
        "fencing, lease_expired, stepping_down (no leader yet, HTTP 503).",
        ("node", "reason"),
    ),
    _Spec(
        "leaderwatch_node_work_cancelled",
        "counter",
        "Admitted work cancelled: leadership lost, drain timeout or node failure.",
        _NODE,
    ),
    _Spec(
        "leaderwatch_node_last_drain_seconds",
        "gauge",
        "Seconds the last step-down waited for admitted work to finish.",
        _NODE,
        "seconds",
    ),
    _Spec(
        "leaderwatch_node_leader_job_starts",
        "counter",
        "Leader-only job runs started (restarts included).",
        _NODE,
    ),
    _Spec(
        "leaderwatch_node_leader_job_failures",
        "counter",
        "Leader-only job runs that raised.",
        _NODE,
    ),
    # -- LeaderCache: a client's view of the leader ---------------------------------------------
    _Spec(
        "leaderwatch_client_cached_epoch",
        "gauge",
        "The epoch of the leader the client's cache holds (absent when none or unknown).",
        _CLIENT,
    ),
    _Spec(
        "leaderwatch_client_leader_moves",
        "counter",
        "Times the client's cached leader changed (another endpoint or epoch, or a new one).",
        _CLIENT,
    ),
    _Spec(
        "leaderwatch_client_updates_refused",
        "counter",
        "Hints and success reports the cache rules refused, by reason.",
        ("client", "reason"),
    ),
    _Spec(
        "leaderwatch_client_hints_rejected",
        "counter",
        "Redirect hints rejected before the cache (malformed, plaintext downgrade), by rule.",
        ("client", "rule"),
    ),
    _Spec(
        "leaderwatch_client_endpoint_failures",
        "counter",
        "Endpoints that refused a connection, timed out or dropped a request.",
        _CLIENT,
    ),
    _Spec(
        "leaderwatch_client_requests_gave_up",
        "counter",
        "Logical requests the client gave up, by reason (deadline_exceeded, "
        "max_redirects_exceeded, outcome_unknown).",
        ("client", "reason"),
    ),
)

_SUFFIX: Final = {"counter": "_total", "gauge": "", "histogram": "", "info": "_info"}

METRIC_NAMES: Final = tuple(spec.name + _SUFFIX[spec.kind] for spec in _SPECS)
"""Every metric the collector reports, as exposed (counters end in ``_total``)."""

_ROLES: Final = ("leader", "follower", "unknown")
_GIVE_UP_REASONS: Final[tuple[str, ...]] = get_args(GiveUpReason)
_BUCKET_BOUNDS: Final = tuple(str(bound) for bound in FENCE_LATENCY_BUCKETS)


class _Families:
    """One family per metric, filled by one scrape."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}
        for spec in _SPECS:
            family: Metric
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            elif spec.kind == "gauge":
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
            elif spec.kind == "histogram":
                family = HistogramMetricFamily(
                    spec.name, spec.help, labels=spec.labels, unit=spec.unit
                )
            else:
                family = InfoMetricFamily(spec.name, spec.help, labels=spec.labels)
            self.by_name[spec.name] = family

    def add(self, name: str, labels: list[str], value: float) -> None:
        family = self.by_name[name]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric(labels, value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.by_name.values())


def _watch(out: _Families, node: str, watch: LeaderWatch) -> None:
    current = watch.current
    if isinstance(current, Leader):
        role = "leader"
    elif isinstance(current, Follower):
        role = "follower"
    else:
        role = "unknown"
    for each in _ROLES:
        out.add("leaderwatch_role", [node, each], 1.0 if each == role else 0.0)
    high_water = watch.high_water
    if high_water is not None:
        out.add("leaderwatch_epoch", [node], float(high_water))
    stats = watch.stats
    out.add("leaderwatch_transitions", [node], stats.delivered)
    out.add("leaderwatch_duplicates_suppressed", [node], stats.suppressed)
    out.add("leaderwatch_epoch_regressions", [node], stats.regressions)
    out.add("leaderwatch_epoch_conflicts", [node], stats.conflicts)


def _backend_endpoint(driver: DriverBase) -> str:
    for attribute in _BACKEND_ENDPOINT_ATTRIBUTES:
        value = getattr(driver, attribute, None)
        if isinstance(value, str):
            return value
    return ""


def _proof_remaining(driver: DriverBase) -> float | None:
    """Seconds the driver's leadership stays proven, ``None`` if its loop clock is unknown."""
    offset = _registry.clock_offset(driver)
    if offset is None:
        return None  # never entered: no event loop, no proof
    until = driver.proven_until
    if until == math.inf:
        return math.inf
    if until == -math.inf:
        return 0.0
    return max(0.0, until - (time.monotonic() + offset))


def _driver(out: _Families, node: str, driver: DriverBase) -> None:
    info = out.by_name["leaderwatch_driver"]
    assert isinstance(info, InfoMetricFamily)
    info.add_metric(
        [node], {"driver": type(driver).__name__, "backend_endpoint": _backend_endpoint(driver)}
    )
    out.add("leaderwatch_driver_campaigning", [node], 1.0 if driver.campaigning else 0.0)
    remaining = _proof_remaining(driver)
    if remaining is not None:
        out.add("leaderwatch_lease_proof_remaining_seconds", [node], remaining)
    reconnects = getattr(driver, "reconnects", None)
    if isinstance(reconnects, int) and not isinstance(reconnects, bool):
        out.add("leaderwatch_driver_reconnects", [node], reconnects)


def _task(out: _Families, node: str, task: LeaderWatchTask) -> None:
    out.add("leaderwatch_task_gate_serving", [node], float(type(task.current_gate) is Serving))
    stats = task.stats
    histogram = out.by_name["leaderwatch_fence_latency_seconds"]
    assert isinstance(histogram, HistogramMetricFamily)
    counts = stats.fence_latency_buckets or (0,) * len(_BUCKET_BOUNDS)
    histogram.add_metric(
        [node],
        [*zip(_BUCKET_BOUNDS, counts, strict=True), ("+Inf", stats.fences_completed)],
        stats.fence_latency_sum,
    )
    out.add("leaderwatch_fences_superseded", [node], stats.fences_superseded)
    out.add("leaderwatch_task_transitions_handled", [node], stats.transitions_handled)
    out.add("leaderwatch_handler_retries", [node], stats.retries)
    out.add("leaderwatch_handler_failures", [node], stats.failures)


def _node(out: _Families, node: str, leader_node: LeaderNode) -> None:
    # The gate the node itself keeps published (lease proof and step-down applied), readable
    # from any thread; LeaderNode.gate would read the event loop's clock.
    published = leader_node._gate_out.borrow()
    out.add("leaderwatch_node_serving", [node], float(type(published) is Serving))
    stats = leader_node.stats
    out.add("leaderwatch_node_admitted", [node], sum(stats.admitted.values()))
    out.add("leaderwatch_node_in_flight", [node], stats.in_flight)
    for reason in ADMISSION_REFUSAL_REASONS:
        out.add("leaderwatch_node_refused", [node, reason], stats.refused.get(reason, 0))
    out.add("leaderwatch_node_work_cancelled", [node], stats.cancelled)
    if stats.last_drain_s is not None:
        out.add("leaderwatch_node_last_drain_seconds", [node], stats.last_drain_s)
    out.add("leaderwatch_node_leader_job_starts", [node], stats.job_starts)
    out.add("leaderwatch_node_leader_job_failures", [node], stats.job_failures)


def _client(out: _Families, client: str, cache: LeaderCache) -> None:
    cached = cache.cached_leader
    if cached is not None and cached.epoch is not None:
        out.add("leaderwatch_client_cached_epoch", [client], float(cached.epoch))
    stats = cache.stats
    out.add("leaderwatch_client_leader_moves", [client], stats.moves)
    # Known reasons start at 0, so the first one counted shows as an increase.
    refused = dict.fromkeys(REFUSAL_REASONS, 0) | stats.refused
    for reason, count in refused.items():
        out.add("leaderwatch_client_updates_refused", [client, reason], count)
    for rule, count in sorted(stats.rejected.items()):
        out.add("leaderwatch_client_hints_rejected", [client, rule], count)
    out.add("leaderwatch_client_endpoint_failures", [client], stats.failures)
    for reason, count in (dict.fromkeys(_GIVE_UP_REASONS, 0) | stats.gave_up).items():
        out.add("leaderwatch_client_requests_gave_up", [client, reason], count)


class LeaderwatchCollector(Collector):
    """A ``prometheus_client`` collector of every live leaderwatch object; see the module.

    Register one per registry (a second one in the same registry is refused
    as duplicated timeseries).
    """

    def describe(self) -> Iterable[Metric]:
        """Every metric family, without samples (lets a registry check names up front)."""
        return list(_Families())

    def collect(self) -> Iterable[Metric]:
        """One sample set per live object, read now."""
        out = _Families()
        for label, watch in _registry.live("watch", LeaderWatch):
            _watch(out, label, watch)
        for label, driver in _registry.live("driver", DriverBase):
            _driver(out, label, driver)
        for label, task in _registry.live("task", LeaderWatchTask):
            _task(out, label, task)
        for label, node in _registry.live("node", LeaderNode):
            _node(out, label, node)
        for label, cache in _registry.live("client", LeaderCache):
            _client(out, label, cache)
        return list(out)


def collector() -> LeaderwatchCollector:
    """A new collector for ``prometheus_client``: ``REGISTRY.register(collector())``."""
    return LeaderwatchCollector()
