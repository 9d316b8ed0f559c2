"""Benchmark leaderwatch.grpc: interceptor and pool overhead, client-visible failover outage.

    python benchmarks/grpc.py            # about a minute
    python benchmarks/grpc.py --quick    # a few seconds per part
    python benchmarks/grpc.py --json     # JSON on stdout (or --json PATH)

Every server is ``tests/grpc_node_server.py`` in its own process on
127.0.0.1: a ``LeaderNode`` over ``LocalElectionDriver`` behind a
``grpc.aio`` server, serving one small unary method (``Who``).

- **overhead**: the same single-node server with and without
  ``LeaderInterceptor``, called over loopback by a plain ``grpc.aio``
  channel; and ``LeaderChannelPool`` (cache seated: the steady state)
  against a plain channel to the same interceptor server. Sequential calls
  (latency) and 16 concurrent callers (throughput); rounds alternate, so
  both sides see the same machine. Two figures: the median over rounds of
  the mean wall time per call, and the CPU time per call of the side that
  changed (the server's, from ``/proc``, for the interceptor; this
  client's for the pool), summed over all rounds: on a busy machine the
  CPU figure is the steadier one. Target: at most 5 % for the interceptor.
- **failover**: three nodes; a client calls ``Who`` back to back through a
  ``LeaderChannelPool`` (each call with a 5 s deadline); the leader is
  killed (``kill9``) or stopped (``sigterm``: it steps down, drains, resigns
  and keeps redirecting). Outage = from the signal to the first reply served
  by the successor; failed calls must be 0, and every epoch must be served
  by one node, never decreasing along the client's sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named grpc.py: keep its own directory off the import path, or
# "import grpc" would import it instead of grpcio.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests"))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from grpc_cluster import Cluster  # noqa: E402
from grpc_service import WHO, TicketStub, decode, identity  # noqa: E402

from leaderwatch.grpc import LeaderChannelPool  # noqa: E402
from leaderwatch.retry import RetryPolicy  # noqa: E402

TARGET_RATIO = 1.05
CONCURRENCY = 16
CALL_TIMEOUT = 5.0
POLICY = RetryPolicy(
    deadline=CALL_TIMEOUT, attempt_timeout=1.0, backoff_initial=0.005, backoff_maximum=0.05
)


@dataclass
class OverheadRow:
    name: str
    mode: str
    baseline: str
    subject: str
    baseline_us: float
    subject_us: float
    ratio: float
    cpu_side: str
    baseline_cpu_us: float
    subject_cpu_us: float
    cpu_ratio: float
    rounds: int
    calls_per_round: int


@dataclass
class FailoverRow:
    fault: str
    rounds: int
    outage_median_ms: float
    outage_max_ms: float
    calls: int
    failed_calls: int
    served_by_non_leader: int
    outages_ms: list[float] = field(default_factory=list)


# --- overhead --------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def per_call_us(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    """Mean wall time per call, in microseconds, with ``concurrency`` callers."""
    each = calls // concurrency

    async def caller() -> None:
        for _ in range(each):
            await call()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    return (time.perf_counter() - started) / (each * concurrency) * 1e6


@dataclass
class Subject:
    """One way of calling ``Who``, and the CPU its server and this client spent on it."""

    call: Callable[[], Awaitable[Any]]
    server_pid: int
    wall_us: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    calls: int = 0

    async def round(self, calls: int, concurrency: int) -> None:
        server_before, client_before = process_cpu(self.server_pid), time.process_time()
        self.wall_us.append(await per_call_us(self.call, calls, concurrency))
        self.server_cpu += process_cpu(self.server_pid) - server_before
        self.client_cpu += time.process_time() - client_before
        self.calls += calls // concurrency * concurrency


async def overhead(base: Path, rounds: int, calls: int) -> list[OverheadRow]:
    with_interceptor = Cluster(base / "with", 1, events=False)
    without = Cluster(base / "without", 1, ["--no-interceptor"], events=False)
    try:
        leader = with_interceptor.endpoints[0]
        plain_endpoint = without.endpoints[0]
        leader_pid = with_interceptor.nodes[0].process.pid
        plain_pid = without.nodes[0].process.pid
        async with (
            grpc.aio.insecure_channel(leader) as to_leader,
            grpc.aio.insecure_channel(plain_endpoint) as to_plain,
            LeaderChannelPool([leader], policy=POLICY) as pool,
        ):
            intercepted = to_leader.unary_unary(WHO, identity, decode)
            plain = to_plain.unary_unary(WHO, identity, decode)
            pooled = pool.stub(TicketStub).Who
            rows = []
            for mode, concurrency in (
                ("sequential", 1),
                (f"{CONCURRENCY} concurrent", CONCURRENCY),
            ):
                subjects = {
                    "server without interceptor": Subject(lambda: plain(b""), plain_pid),
                    "server with interceptor": Subject(lambda: intercepted(b""), leader_pid),
                    "LeaderChannelPool": Subject(lambda: pooled(b""), leader_pid),
                }
                for subject in subjects.values():  # warm up: connections, caches
                    await per_call_us(subject.call, 400, concurrency)
                for index in range(rounds):
                    order = list(subjects.values())
                    if index % 2:
                        order.reverse()
                    for subject in order:
                        await subject.round(calls, concurrency)
                for name, baseline_name, subject_name, side in (
                    ("interceptor", "server without interceptor", "server with interceptor",
                     "server"),
                    ("client pool", "server with interceptor", "LeaderChannelPool", "client"),
                ):  # fmt: skip
                    baseline, subject = subjects[baseline_name], subjects[subject_name]
                    wall = statistics.median(baseline.wall_us), statistics.median(subject.wall_us)
                    cpu = tuple(
                        (each.server_cpu if side == "server" else each.client_cpu)
                        / each.calls
                        * 1e6
                        for each in (baseline, subject)
                    )
                    rows.append(
                        OverheadRow(
                            name=name,
                            mode=mode,
                            baseline=baseline_name,
                            subject=subject_name,
                            baseline_us=round(wall[0], 1),
                            subject_us=round(wall[1], 1),
                            ratio=round(wall[1] / wall[0], 4),
                            cpu_side=side,
                            baseline_cpu_us=round(cpu[0], 1),
                            subject_cpu_us=round(cpu[1], 1),
                            cpu_ratio=round(cpu[1] / cpu[0], 4),
                            rounds=rounds,
                            calls_per_round=calls,
                        )
                    )
            return rows
    finally:
        with_interceptor.stop()
        without.stop()


# --- failover --------------------------------------------------------------------------------


class FailoverRound:
    """One round's client: back-to-back calls until told to stop; who answered, when."""

    def __init__(self, stub: Any, old_epoch: int) -> None:
        self.stub = stub
        self.old_epoch = old_epoch
        self.replies: list[tuple[float, str, int]] = []
        self.calls = 0
        self.failed = 0
        self.took_over = anyio.Event()
        self.done = anyio.Event()

    async def call_until_done(self) -> None:
        while not self.done.is_set():
            self.calls += 1
            try:
                reply = await self.stub.Who(b"", timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError:
                self.failed += 1
                continue
            self.replies.append((time.monotonic(), reply["endpoint"], reply["epoch"]))
            if reply["epoch"] > self.old_epoch:
                self.took_over.set()

    def out_of_order(self) -> int:
        """Replies whose epoch went down, or whose epoch another node already served."""
        seen: dict[int, str] = {}
        last_epoch = -1
        count = 0
        for _, endpoint, epoch in self.replies:
            if seen.setdefault(epoch, endpoint) != endpoint or epoch < last_epoch:
                count += 1
            last_epoch = max(last_epoch, epoch)
        return count


async def failover(base: Path, fault: str, rounds: int) -> FailoverRow:
    cluster = Cluster(base / fault, 3, events=False)
    outages: list[float] = []
    calls = failed = non_leader = 0
    try:
        async with LeaderChannelPool(cluster.endpoints, policy=POLICY) as pool:
            stub = pool.stub(TicketStub, idempotent=True)
            for _ in range(rounds):
                first = await stub.Who(b"", timeout=CALL_TIMEOUT)
                old_leader = first["endpoint"]
                await anyio.sleep(0.3)  # settle: a respawned node finishes starting
                round_ = FailoverRound(stub, first["epoch"])
                async with anyio.create_task_group() as tg:
                    tg.start_soon(round_.call_until_done)
                    await anyio.sleep(0.1)
                    faulted_at = time.monotonic()
                    cluster.node(old_leader).kill(
                        signal.SIGKILL if fault == "kill9" else signal.SIGTERM
                    )
                    with anyio.fail_after(15):
                        await round_.took_over.wait()
                    await anyio.sleep(0.05)
                    round_.done.set()
                successor = next(t for t, _, e in round_.replies if e > round_.old_epoch)
                outages.append((successor - faulted_at) * 1000)
                calls += round_.calls
                failed += round_.failed
                non_leader += round_.out_of_order()
                cluster.restart(old_leader)
    finally:
        cluster.stop()
    return FailoverRow(
        fault=fault,
        rounds=rounds,
        outage_median_ms=round(statistics.median(outages), 1),
        outage_max_ms=round(max(outages), 1),
        calls=calls,
        failed_calls=failed,
        served_by_non_leader=non_leader,
        outages_ms=[round(value, 1) for value in outages],
    )


# --- report ----------------------------------------------------------------------------------


def table(overheads: list[OverheadRow], failovers: list[FailoverRow]) -> str:
    lines = [
        "overhead per unary call over loopback: wall time (median of per-round means) and CPU",
        f"{'what':<12} {'mode':<14} {'base µs':>8} {'with µs':>8} {'ratio':>6}   "
        f"{'CPU of':<6} {'base µs':>8} {'with µs':>8} {'ratio':>6}",
    ]
    for row in overheads:
        lines.append(
            f"{row.name:<12} {row.mode:<14} {row.baseline_us:>8.1f} {row.subject_us:>8.1f} "
            f"{row.ratio:>6.3f}   {row.cpu_side:<6} {row.baseline_cpu_us:>8.1f} "
            f"{row.subject_cpu_us:>8.1f} {row.cpu_ratio:>6.3f}"
        )
    lines += [
        "",
        "client-visible failover (LocalElectionDriver, 3 nodes, back-to-back calls)",
        f"{'fault':<8} {'rounds':>6} {'median ms':>10} {'max ms':>8} {'calls':>7} "
        f"{'failed':>7} {'non-leader':>10}",
    ]
    for failover_row in failovers:
        lines.append(
            f"{failover_row.fault:<8} {failover_row.rounds:>6} "
            f"{failover_row.outage_median_ms:>10.1f} {failover_row.outage_max_ms:>8.1f} "
            f"{failover_row.calls:>7} {failover_row.failed_calls:>7} "
            f"{failover_row.served_by_non_leader:>10}"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds, calls, failover_rounds = (3, 400, 2) if args.quick else (10, 2000, 5)
    with tempfile.TemporaryDirectory(prefix="lw-grpc-bench-") as directory:
        base = Path(directory)
        overheads = await overhead(base, rounds, calls)
        failovers = [await failover(base, fault, failover_rounds) for fault in ("kill9", "sigterm")]
    return {
        "overhead": [asdict(row) for row in overheads],
        "failover": [asdict(row) for row in failovers],
        "target_ratio": TARGET_RATIO,
        "environment": {
            "python": platform.python_version(),
            "grpcio": version("grpcio"),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="write JSON (stdout if no PATH)"
    )
    args = parser.parse_args()
    result = anyio.run(run, args, backend="asyncio")
    if args.json is None:
        print(
            table(
                [OverheadRow(**row) for row in result["overhead"]],
                [FailoverRow(**row) for row in result["failover"]],
            )
        )
    elif args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
