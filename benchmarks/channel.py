"""Benchmark leaderwatch's watch channel against two baselines, in one run.

Baselines, run on the same asyncio event loop with the same task and
catch-up machinery as the channel under test:

- ``floor``: one shared ``asyncio.Event`` that the sender sets and replaces,
  each receiver re-checking a version counter (the least a broadcast can do);
- ``floor-anyio``: the same with ``anyio.Event`` (isolates anyio's wrapper);
- ``queue``: the naive broadcast, one ``asyncio.Queue`` per receiver.

Usage::

    python benchmarks/channel.py            # full run, about a minute
    python benchmarks/channel.py --quick    # smoke run, a few seconds
    python benchmarks/channel.py --json     # JSON on stdout (or --json PATH)
    python benchmarks/channel.py --strict   # exit 1 if a target is missed

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path, and benchmarks/http.py
# and benchmarks/grpc.py would shadow the ``http`` and ``grpc`` packages.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import asyncio
import gc
import json
import platform
import statistics
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from importlib.metadata import version
from typing import Any, Protocol

import anyio

from leaderwatch.channel import WatchReceiver, WatchSender, watch_channel
from leaderwatch.state import Leader
from leaderwatch.watch import LeaderWatch

RECEIVER_COUNTS = (1, 100, 1_000, 10_000)
TARGET_N = 1_000
BURST = 10
STALLED_SENDS = (10_000, 100_000)

# Distinct int objects (not small-int singletons), so a queue that keeps
# every sent value pays for it as a real value would.
VALUE_BASE = 1 << 40
STOP = -1


# --------------------------------------------------------------------------
# The catch-up gate: identical for every implementation.
# --------------------------------------------------------------------------


class CatchUp:
    """Lets the sender wait until every receiver has processed the newest value."""

    __slots__ = ("done", "n", "pending", "target")

    def __init__(self, n: int) -> None:
        self.n = n
        self.target = -1
        self.pending = 0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        self.target = target
        self.pending = self.n
        self.done = asyncio.Event()

    def ack(self, value: int) -> None:
        if value == self.target:
            self.pending -= 1
            if self.pending == 0:
                self.done.set()


class Broadcast(Protocol):
    name: str

    def receivers(self) -> list[Callable[[], Coroutine[Any, Any, None]]]: ...

    def send(self, value: int) -> None: ...


# --------------------------------------------------------------------------
# The three implementations (plus the anyio.Event floor).
# --------------------------------------------------------------------------


class WatchBroadcast:
    """leaderwatch.channel: ``await rx.changed()`` then ``rx.borrow()``."""

    name = "watch"

    def __init__(self, n: int, catch_up: CatchUp) -> None:
        self.catch_up = catch_up
        self.tx: WatchSender[int]
        self.tx, first = watch_channel(VALUE_BASE)
        self.rxs: list[WatchReceiver[int]] = [first] + [self.tx.subscribe() for _ in range(n - 1)]

    async def _receive(self, rx: WatchReceiver[int]) -> None:
        while True:
            await rx.changed()
            value = rx.borrow()
            if value == STOP:
                return
            self.catch_up.ack(value)

    def receivers(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [partial(self._receive, rx) for rx in self.rxs]

    def send(self, value: int) -> None:
        self.tx.send(value)


class FloorBroadcast:
    """One shared event, set and replaced per send; receivers re-check a version."""

    name = "floor"
    make_event: Callable[[], asyncio.Event | anyio.Event] = asyncio.Event

    def __init__(self, n: int, catch_up: CatchUp) -> None:
        self.catch_up = catch_up
        self.n = n
        self.value = VALUE_BASE
        self.version = 0
        self.event = self.make_event()

    async def _receive(self, seen: int) -> None:
        while True:
            while seen == self.version:
                await self.event.wait()
            seen = self.version
            value = self.value
            if value == STOP:
                return
            self.catch_up.ack(value)

    def receivers(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [partial(self._receive, self.version) for _ in range(self.n)]

    def send(self, value: int) -> None:
        self.value = value
        self.version += 1
        event = self.event
        self.event = self.make_event()
        event.set()


class AnyioFloorBroadcast(FloorBroadcast):
    name = "floor-anyio"
    make_event = anyio.Event


class QueueBroadcast:
    """The naive broadcast: one unbounded ``asyncio.Queue`` per receiver."""

    name = "queue"

    def __init__(self, n: int, catch_up: CatchUp) -> None:
        self.catch_up = catch_up
        self.queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(n)]

    async def _receive(self, queue: asyncio.Queue[int]) -> None:
        while True:
            value = await queue.get()
            if value == STOP:
                return
            self.catch_up.ack(value)

    def receivers(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [partial(self._receive, q) for q in self.queues]

    def send(self, value: int) -> None:
        for queue in self.queues:
            queue.put_nowait(value)


class Factory(Protocol):
    name: str

    def __call__(self, n: int, catch_up: CatchUp) -> Broadcast: ...


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic collector out of the timed region (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Bench:
    """One implementation with ``n`` live receivers, driven in rounds."""

    def __init__(self, factory: Factory, n: int) -> None:
        self.name = factory.name
        self.n = n
        self.catch_up = CatchUp(n)
        self.impl = factory(n, self.catch_up)
        self.sequence = VALUE_BASE

    async def run(self, rounds: int, sends_per_round: int) -> None:
        """``rounds`` times: send ``sends_per_round`` values, then wait until all caught up."""
        catch_up, send = self.catch_up, self.impl.send
        for _ in range(rounds):
            first = self.sequence + 1
            self.sequence += sends_per_round
            catch_up.arm(self.sequence)
            for value in range(first, self.sequence + 1):
                send(value)
            await catch_up.done.wait()

    async def timed(self, rounds: int, sends_per_round: int) -> float:
        """Nanoseconds per round per receiver."""
        with gc_paused():
            start = time.perf_counter_ns()
            await self.run(rounds, sends_per_round)
            elapsed = time.perf_counter_ns() - start
        return elapsed / (rounds * self.n)

    def stop(self) -> None:
        self.impl.send(STOP)


@dataclass
class Series:
    """Per-implementation samples (ns per round per receiver), one per repetition."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def paired_ratio(self, num: str, den: str) -> float:
        """Median over repetitions of num/den measured back to back (robust to drift)."""
        return statistics.median(
            a / b for a, b in zip(self.samples[num], self.samples[den], strict=True)
        )


@asynccontextmanager
async def receiving(impls: list[Broadcast], spawn: str) -> AsyncIterator[None]:
    """Run every receiver of ``impls`` as a task, blocked in its wait on entry; stop them on exit.

    ``spawn="asyncio"`` uses bare ``loop.create_task`` (the strictest floor);
    ``spawn="anyio"`` uses an anyio task group, which wraps every task's
    coroutine in one more frame (same cost for every implementation).
    """
    if spawn == "anyio":
        async with anyio.create_task_group() as tg:
            for impl in impls:
                for receive in impl.receivers():
                    tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            try:
                yield
            finally:
                for impl in impls:
                    impl.send(STOP)
        return
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(receive()) for impl in impls for receive in impl.receivers()]
    try:
        await anyio.wait_all_tasks_blocked()
        yield
    finally:
        for impl in impls:
            impl.send(STOP)
        await asyncio.gather(*tasks)


def rotated(items: list[Bench], shift: int) -> list[Bench]:
    shift %= len(items)
    return items[shift:] + items[:shift]


async def measure_n(factories: list[Factory], n: int, config: Config) -> tuple[Series, Series]:
    """Steady and burst samples for ``n`` receivers, implementations interleaved."""
    steady, burst = Series(), Series()
    steady_rounds = max(3, min(config.round_cap, config.work // n))
    burst_rounds = max(3, steady_rounds // 3)
    benches = [Bench(factory, n) for factory in factories]
    async with receiving([bench.impl for bench in benches], config.spawn):
        for bench in benches:
            await bench.run(max(2, steady_rounds // 10), 1)
            await bench.run(max(2, burst_rounds // 10), BURST)
        # Long-lived receivers would otherwise make every collection slower.
        gc.collect()
        gc.freeze()
        try:
            for rep in range(config.reps):
                for bench in rotated(benches, rep):
                    steady.add(bench.name, await bench.timed(steady_rounds, 1))
                for bench in rotated(benches, rep + 1):
                    burst.add(bench.name, await bench.timed(burst_rounds, BURST))
        finally:
            gc.unfreeze()
    return steady, burst


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


@contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Bytes currently allocated since entry, via tracemalloc (after a full collection)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]

    def current() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base

    try:
        yield current
    finally:
        tracemalloc.stop()


async def stalled_bytes(factory: Factory, sends: int) -> int:
    """Bytes held after ``sends`` sends while the only receiver never reads."""
    never = anyio.Event()
    impl = factory(1, CatchUp(1))

    async def stalled() -> None:
        await never.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stalled)
        await anyio.lowlevel.checkpoint()
        impl.send(VALUE_BASE + 1)  # allocate whatever a first send allocates, untraced
        with traced() as held:
            for i in range(sends):
                impl.send(VALUE_BASE + 2 + i)
                if i % 1_000 == 999:
                    await anyio.lowlevel.checkpoint()
            result = held()
        never.set()
    del impl
    return result


def idle_receiver_bytes(count: int) -> dict[str, float]:
    """Bytes per receiver that is subscribed but not waiting."""
    tx, first = watch_channel(VALUE_BASE)
    out: dict[str, float] = {}
    with traced() as held:
        rxs = [tx.subscribe() for _ in range(count)]
        out["watch"] = held() / count
    del rxs
    with traced() as held:
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(count)]
        out["queue"] = held() / count
    del queues, first
    # The floor's per-receiver state is its last seen version, a small int.
    out["floor"] = 0.0
    return out


async def waiting_receiver_bytes(
    factories: list[Factory], count: int, spawn: str
) -> dict[str, float]:
    """Bytes per receiver blocked in its wait, task and coroutine frames included."""
    out: dict[str, float] = {}
    for factory in factories:
        catch_up = CatchUp(count)
        with traced() as held:
            impl = factory(count, catch_up)
            async with receiving([impl], spawn):
                out[impl.name] = held() / count
        del impl
    return out


# --------------------------------------------------------------------------
# Synchronous per-call costs
# --------------------------------------------------------------------------


def per_call_ns(call: Callable[[], object], calls: int, reps: int) -> float:
    """Median ns per call (10 calls per loop iteration, loop overhead included)."""
    loops = max(1, calls // 10)
    samples = []
    for _ in range(reps):
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in range(loops):
                call()
                call()
                call()
                call()
                call()
                call()
                call()
                call()
                call()
                call()
            samples.append((time.perf_counter_ns() - start) / (loops * 10))
    return statistics.median(samples)


def call_costs(calls: int, reps: int) -> dict[str, float]:
    watch = LeaderWatch("bench", initial=Leader(epoch=7))
    rx = watch.subscribe()
    equal = Leader(epoch=7)  # equal payload, distinct object: the realistic re-publish
    current = watch.current
    sender: WatchSender[int]
    sender, int_rx = watch_channel(VALUE_BASE)
    same = VALUE_BASE
    costs = {
        "publish_suppressed": per_call_ns(lambda: watch.publish(equal), calls, reps),
        "leader_eq": per_call_ns(lambda: equal == current, calls, reps),
        "send_if_changed_int": per_call_ns(lambda: sender.send_if_changed(same), calls, reps),
        "borrow": per_call_ns(rx.borrow, calls, reps),
        "empty_call": per_call_ns(lambda: None, calls, reps),
    }
    assert watch.stats.delivered == 0, "suppressed publishes must not deliver"
    del int_rx
    return costs


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


@dataclass
class Config:
    reps: int
    work: int
    round_cap: int
    calls: int
    idle_count: int
    stalled_sends: tuple[int, ...]
    receiver_counts: tuple[int, ...] = RECEIVER_COUNTS
    spawn: str = "asyncio"


FULL = Config(
    reps=9,
    work=80_000,
    round_cap=5_000,
    calls=500_000,
    idle_count=10_000,
    stalled_sends=STALLED_SENDS,
)
QUICK = Config(
    reps=1,
    work=3_000,
    round_cap=300,
    calls=20_000,
    idle_count=1_000,
    stalled_sends=(1_000, 10_000),
    receiver_counts=(1, 100, 1_000),
)


async def run_all(config: Config, progress: Callable[[str], None]) -> dict[str, Any]:
    factories: list[Factory] = [WatchBroadcast, FloorBroadcast, AnyioFloorBroadcast, QueueBroadcast]
    results: dict[str, Any] = {"steady": {}, "burst": {}, "stalled": {}}

    for n in config.receiver_counts:
        progress(f"steady and burst, N={n}")
        s, b = await measure_n(factories, n, config)
        results["steady"][n] = {
            **{name: s.median(name) for name in s.samples},
            "ratio_vs_floor": s.paired_ratio("watch", "floor"),
            "anyio_floor_vs_floor": s.paired_ratio("floor-anyio", "floor"),
            "watch_vs_anyio_floor": s.paired_ratio("watch", "floor-anyio"),
            "samples": s.samples,
        }
        results["burst"][n] = {
            **{name: b.median(name) for name in b.samples},
            "speedup_vs_queue": b.paired_ratio("queue", "watch"),
            "ratio_vs_floor": b.paired_ratio("watch", "floor"),
            "samples": b.samples,
        }

    progress("stalled")
    stalled_impls: list[Factory] = [WatchBroadcast, FloorBroadcast, QueueBroadcast]
    for sends in config.stalled_sends:
        results["stalled"][sends] = {f.name: await stalled_bytes(f, sends) for f in stalled_impls}

    progress("memory per receiver")
    results["idle_receiver_bytes"] = idle_receiver_bytes(config.idle_count)
    results["waiting_receiver_bytes"] = await waiting_receiver_bytes(
        stalled_impls, config.idle_count, config.spawn
    )
    progress("per-call costs")
    results["calls_ns"] = call_costs(config.calls, max(3, config.reps))
    return results


def judge(results: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    steady = results["steady"][TARGET_N]
    burst = results["burst"][TARGET_N]
    small, large = config.stalled_sends[0], config.stalled_sends[-1]
    stall_small = results["stalled"][small]["watch"]
    stall_large = results["stalled"][large]["watch"]
    q_small, q_large = results["stalled"][small]["queue"], results["stalled"][large]["queue"]
    growth = large / small
    calls = results["calls_ns"]
    return [
        {
            "target": f"steady <= 1.3x floor @N={TARGET_N}",
            "measured": f"{steady['ratio_vs_floor']:.2f}x",
            "ok": steady["ratio_vs_floor"] <= 1.3,
        },
        {
            "target": f"burst >= 2.5x faster than queue @N={TARGET_N}",
            "measured": f"{burst['speedup_vs_queue']:.2f}x",
            "ok": burst["speedup_vs_queue"] >= 2.5,
        },
        {
            # Constant: growing the send count 10x adds < 1 KiB; the queue grows ~linearly.
            "target": f"stalled memory constant ({small:,} -> {large:,} sends)",
            "measured": f"{stall_small:,} B -> {stall_large:,} B"
            f" (queue {q_small:,} -> {q_large:,})",
            "ok": stall_large - stall_small < 1024 and q_large > 0.5 * growth * q_small,
        },
        {
            "target": "suppressed publish <= 2 us",
            "measured": f"{calls['publish_suppressed']:.0f} ns",
            "ok": calls["publish_suppressed"] <= 2_000,
        },
        {
            "target": "borrow() <= 0.2 us",
            "measured": f"{calls['borrow']:.0f} ns",
            "ok": calls["borrow"] <= 200,
        },
        {
            "target": "<= 400 B per idle receiver",
            "measured": f"{results['idle_receiver_bytes']['watch']:.0f} B",
            "ok": results["idle_receiver_bytes"]["watch"] <= 400,
        },
    ]


def render(results: dict[str, Any], verdicts: list[dict[str, Any]], config: Config) -> str:
    lines: list[str] = []
    add = lines.append
    add(
        f"leaderwatch {version('leaderwatch')} watch channel - Python"
        f" {platform.python_version()}, asyncio via anyio {version('anyio')},"
        f" median of {config.reps} rep(s), ratios paired per rep"
    )
    add("")
    add("steady: 1 send, all receivers catch up - ns per send per receiver")
    add(f"{'N':>7} {'watch':>7} {'floor':>7} {'ratio':>6} {'floor-anyio':>18} {'queue':>7}")
    for n, r in results["steady"].items():
        add(
            f"{n:>7,} {r['watch']:>7.0f} {r['floor']:>7.0f} {r['ratio_vs_floor']:>5.2f}x"
            f" {r['floor-anyio']:>9.0f} ({r['anyio_floor_vs_floor']:.2f}x)  {r['queue']:>7.0f}"
        )
    add("")
    add(f"burst: {BURST} sends back to back, all catch up - ns per burst per receiver")
    add(f"{'N':>7} {'watch':>7} {'queue':>7} {'speedup':>8} {'floor':>7} {'ratio':>6}")
    for n, r in results["burst"].items():
        add(
            f"{n:>7,} {r['watch']:>7.0f} {r['queue']:>7.0f} {r['speedup_vs_queue']:>7.2f}x"
            f" {r['floor']:>7.0f} {r['ratio_vs_floor']:>5.2f}x"
        )
    add("")
    add("stalled: one receiver never reads - bytes held after the sends (tracemalloc)")
    add(f"{'sends':>9} {'watch':>10} {'floor':>10} {'queue':>12}")
    for sends, r in results["stalled"].items():
        add(f"{sends:>9,} {r['watch']:>10,} {r['floor']:>10,} {r['queue']:>12,}")
    add("")
    idle, waiting = results["idle_receiver_bytes"], results["waiting_receiver_bytes"]
    add("bytes per receiver      watch    floor    queue")
    add(f"  idle (subscribed) {idle['watch']:>9.0f} {idle['floor']:>8.0f} {idle['queue']:>8.0f}")
    add(
        f"  waiting (task)    {waiting['watch']:>9.0f} {waiting['floor']:>8.0f}"
        f" {waiting['queue']:>8.0f}"
    )
    add("")
    c = results["calls_ns"]
    add("per call (ns, loop overhead included)")
    add(f"  LeaderWatch.publish, equal value (suppressed) {c['publish_suppressed']:>7.0f}")
    add(f"    of which Leader == Leader (pydantic)        {c['leader_eq']:>7.0f}")
    add(f"  WatchSender.send_if_changed, equal int        {c['send_if_changed_int']:>7.0f}")
    add(f"  WatchReceiver.borrow()                        {c['borrow']:>7.0f}")
    add(f"  empty lambda call (reference)                 {c['empty_call']:>7.0f}")
    add("")
    add("targets")
    for v in verdicts:
        add(f"  {'PASS' if v['ok'] else 'MISS'}  {v['target']:<46} {v['measured']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run (a few seconds)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write JSON results to PATH (stdout if omitted); the table goes to stderr",
    )
    parser.add_argument(
        "--spawn",
        choices=("asyncio", "anyio"),
        default="asyncio",
        help="run receivers as bare asyncio tasks (default) or in an anyio task group",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else FULL, spawn=args.spawn)

    def progress(stage: str) -> None:
        print(f"... {stage}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    main_coro: Callable[[], Coroutine[Any, Any, dict[str, Any]]] = lambda: run_all(config, progress)  # noqa: E731
    results = anyio.run(main_coro, backend="asyncio")
    verdicts = judge(results, config)
    table = render(results, verdicts, config)
    elapsed = time.perf_counter() - started

    if args.json is None:
        print(table)
        print(f"\n({elapsed:.1f} s)")
    else:
        print(table, file=sys.stderr)
        payload = {
            "config": {"quick": args.quick, **asdict(config)},
            "python": platform.python_version(),
            "elapsed_s": elapsed,
            "units": {
                "steady": "ns per send per receiver",
                "burst": f"ns per burst of {BURST} sends per receiver",
                "stalled": "bytes held",
                "idle_receiver_bytes": "bytes",
                "waiting_receiver_bytes": "bytes",
                "calls_ns": "ns per call",
            },
            **results,
            "targets": verdicts,
        }
        text = json.dumps(payload, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as out:
                out.write(text + "\n")
    return 1 if args.strict and not all(v["ok"] for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
