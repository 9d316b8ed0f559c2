"""Failover time: from losing the leader to the next ``Leader`` report.

    python benchmarks/failover.py --driver local --rounds 10 [--json]
    python benchmarks/failover.py --driver etcd --rounds 10 [--etcd-ttl 2]
    python benchmarks/failover.py --driver postgres --rounds 10 [--pg-ttl 2]

Each round waits for a stable group of node processes (one leader, the
others following it), takes the leader away (``kill9``: SIGKILL, or
``sigterm``: graceful exit, which resigns), and measures from just before
the signal to the successor's ``Leader`` line. Both instants are
``time.monotonic()``, one clock for every process of a Linux host. The
stopped node is then restarted, so every round starts from the same group.

For etcd the script starts a throwaway etcd server (see
``tests/etcd_server.py``) and, as the reference, measures the same graceful
hand-over between ``etcdctl elect`` candidates on that server in the same
run (``etcd-etcdctl`` row; time until the successor prints its proposal).
``etcdctl elect`` always uses a 60 s lease, so its kill -9 failover is not
measured (it would take a minute per round).

For PostgreSQL the script starts a throwaway server (see
``tests/pg_server.py``); the nodes share one election row on it.

Nodes are ``leaderwatch campaign URL --endpoint H:P --format json``
processes (``tests/nodes.py``'s ``RUNNER``). Adding a driver: write a
function ``(args) -> list[Row]`` and register it in ``DRIVERS``; a driver
with an election URL only needs :func:`measure_runner_group` with its node
arguments (the URL and ``--endpoint``); a driver of your own runs under a
:mod:`leaderwatch.testing.runner` script (``NodeSet(prefix=...)``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path, and benchmarks/http.py
# and benchmarks/grpc.py would shadow the ``http`` and ``grpc`` packages.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from etcd_server import EtcdServer, etcd_server
from nodes import NodeProcess, NodeSet, etcd_url, local_url, postgres_url
from pg_server import pg_server

from leaderwatch.state import Leader

STARTUP_S = 30.0
FAILOVER_DEADLINE_S = 10.0
# Before each round every candidate is registered and then left alone this
# long, so a node respawned by the previous round (a Python process importing
# grpc) does not compete for the 2 cores; the etcdctl reference gets the same.
# A random extra of up to SETTLE_JITTER_S keeps the signal from locking onto
# the phase of a polling driver's loop.
SETTLE_S = 0.3
SETTLE_JITTER_S = 0.1


def _settle() -> None:
    time.sleep(SETTLE_S + random.uniform(0.0, SETTLE_JITTER_S))


TARGET_MS = {"kill9": 100.0, "sigterm": 100.0}

SCENARIOS: dict[str, Callable[[NodeProcess], float]] = {
    "kill9": NodeProcess.kill9,
    "sigterm": NodeProcess.terminate,
}
"""How to take the leader away; each returns ``time.monotonic()`` just before the signal."""


@dataclass
class Row:
    """One line of the table: a driver, a scenario and its samples (seconds)."""

    driver: str
    scenario: str
    samples: list[float]
    note: str = ""
    target_ms: float | None = None
    """Overrides the scenario's default target (``TARGET_MS``) for this row."""
    reference: bool = False
    """A baseline measured for comparison: it has no target."""

    def as_dict(self) -> dict[str, object]:
        ms = [s * 1000 for s in self.samples]
        return {
            "driver": self.driver,
            "scenario": self.scenario,
            "rounds": len(ms),
            "median_ms": round(statistics.median(ms), 2),
            "max_ms": round(max(ms), 2),
            "min_ms": round(min(ms), 2),
            "target_ms": (
                None
                if self.reference
                else round(self.target_ms, 2)
                if self.target_ms is not None
                else TARGET_MS.get(self.scenario)
            ),
            "note": self.note,
        }


def _wait_registered(registered: Callable[[], int] | None, size: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while registered is not None and registered() < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {size} candidates registered")
        time.sleep(0.01)


class RunnerGroup:
    """``size`` runner processes of one driver; :meth:`round` takes the leader away once.

    ``node_args(i)`` are the runner arguments of node ``i`` (after ``leaderwatch
    campaign --format json``), e.g. ``["local:///tmp/d", "--endpoint", "127.0.0.1:7100"]``.
    ``registered()``, when given, counts the candidates the backend knows of;
    each round waits until it reaches ``size``.
    """

    def __init__(
        self,
        nodes: NodeSet,
        driver: str,
        scenario: str,
        node_args: Callable[[int], Sequence[str]],
        *,
        size: int = 3,
        registered: Callable[[], int] | None = None,
    ) -> None:
        self._nodes = nodes
        self._driver = driver
        self._take_away = SCENARIOS[scenario]
        self._node_args = node_args
        self._size = size
        self._registered = registered
        self._slots = [self._spawn(i) for i in range(size)]

    def _spawn(self, index: int) -> NodeProcess:
        return self._nodes.spawn(*self._node_args(index), name=f"{self._driver}-{index}")

    def round(self) -> float:
        """Seconds from the signal to the successor's ``Leader`` report."""
        group = self._nodes
        leader = group.wait_stable(timeout=STARTUP_S)
        _wait_registered(self._registered, self._size)
        _settle()
        state = leader.state
        assert isinstance(state, Leader)
        old_epoch = state.epoch

        def successor(state: object) -> bool:
            return isinstance(state, Leader) and state.epoch > old_epoch

        sent = self._take_away(leader)

        def taken_over(nodes: NodeSet) -> bool:
            return any(
                n.first_report_after(sent, successor) is not None
                for n in nodes.nodes
                if n is not leader
            )

        group.wait_for(taken_over, timeout=FAILOVER_DEADLINE_S)
        reports = [
            r
            for n in group.nodes
            if n is not leader and (r := n.first_report_after(sent, successor)) is not None
        ]
        leader.wait_exit(FAILOVER_DEADLINE_S)
        index = self._slots.index(leader)
        self._slots[index] = self._spawn(index)
        return min(r.t for r in reports) - sent


def measure_runner_group(
    driver: str,
    scenario: str,
    node_args: Callable[[int], Sequence[str]],
    *,
    rounds: int,
    size: int = 3,
    note: str = "",
    registered: Callable[[], int] | None = None,
) -> Row:
    """Measure ``scenario`` over ``rounds`` on a :class:`RunnerGroup`."""
    with NodeSet() as nodes:
        group = RunnerGroup(nodes, driver, scenario, node_args, size=size, registered=registered)
        samples = [group.round() for _ in range(rounds)]
    return Row(driver, scenario, samples, note)


def local_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    for scenario in args.scenario:
        with tempfile.TemporaryDirectory(prefix="leaderwatch-failover-", dir=args.workdir) as d:

            def node_args(i: int, d: str = d) -> list[str]:
                return [
                    local_url(d, poll_interval=args.poll_interval),
                    "--endpoint",
                    f"127.0.0.1:{7100 + i}",
                ]

            note = f"poll {args.poll_interval * 1000:g} ms, dir {Path(d).parent}"
            rows.append(
                measure_runner_group("local", scenario, node_args, rounds=args.rounds, note=note)
            )
    return rows


class _Elector:
    """One ``etcdctl elect ELECTION PROPOSAL`` process; notes when it printed its proposal."""

    def __init__(self, server: EtcdServer, election: str, proposal: str) -> None:
        self.proposal = proposal
        self.elected_at: float | None = None
        self._elected = threading.Event()
        self.process = subprocess.Popen(
            server.etcdctl_argv("elect", election, proposal),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.rstrip("\n") == self.proposal and self.elected_at is None:
                self.elected_at = time.monotonic()
                self._elected.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(5)


def _key_count(server: EtcdServer, election: str) -> int:
    return len(server.keys(election + "/"))


class EtcdctlGroup:
    """``size`` ``etcdctl elect`` candidates; :meth:`round` makes the leader resign once."""

    def __init__(self, server: EtcdServer, *, size: int = 3) -> None:
        self._server = server
        self._election = f"failover-etcdctl-{uuid.uuid4().hex[:8]}"
        self._size = size
        self._electors: list[_Elector] = []
        self._slots = [self._spawn(i) for i in range(size)]

    def _spawn(self, index: int) -> _Elector:
        elector = _Elector(self._server, self._election, f"127.0.0.1:{7500 + index}")
        self._electors.append(elector)
        return elector

    def round(self) -> float:
        """Seconds from SIGTERM to the successor printing its proposal."""
        slots = self._slots
        deadline = time.monotonic() + STARTUP_S
        while not any(e.elected_at is not None for e in slots):
            if time.monotonic() > deadline:
                raise RuntimeError("no etcdctl candidate was elected")
            time.sleep(0.01)
        _wait_registered(partial(_key_count, self._server, self._election), self._size)
        _settle()
        leader = next(e for e in slots if e.elected_at is not None)
        sent = time.monotonic()
        os.kill(leader.process.pid, signal.SIGTERM)
        others = [e for e in slots if e is not leader]
        deadline = time.monotonic() + FAILOVER_DEADLINE_S
        while not any(e.elected_at is not None for e in others):
            if time.monotonic() > deadline:
                raise RuntimeError("no etcdctl successor was elected")
            time.sleep(0.001)
        sample = min(e.elected_at for e in others if e.elected_at is not None) - sent
        leader.process.wait(FAILOVER_DEADLINE_S)
        index = slots.index(leader)
        slots[index] = self._spawn(index)
        return sample

    def stop(self) -> None:
        for elector in self._electors:
            elector.stop()


def etcd_rows(args: argparse.Namespace) -> list[Row]:
    """kill -9 and graceful rows; the graceful one interleaves its rounds with the
    etcdctl reference's on the same server, so both see the same machine."""
    rows: list[Row] = []
    ttl = args.etcd_ttl
    with etcd_server() as server:
        for scenario in args.scenario:
            election = f"failover-{scenario}-{uuid.uuid4().hex[:8]}"

            def node_args(i: int, election: str = election) -> list[str]:
                return [
                    etcd_url(server.endpoint, election, ttl=ttl),
                    "--endpoint",
                    f"127.0.0.1:{7400 + i}",
                ]

            row = Row("etcd", scenario, [], f"ttl {ttl} s")
            reference = Row(
                "etcd-etcdctl",
                scenario,
                [],
                "reference: etcdctl elect, same server",
                reference=True,
            )
            with NodeSet() as nodes:
                group = RunnerGroup(
                    nodes,
                    "etcd",
                    scenario,
                    node_args,
                    registered=partial(_key_count, server, election),
                )
                if scenario == "kill9":
                    row.samples = [group.round() for _ in range(args.rounds)]
                    row.target_ms = ttl * 1000 + 500
                else:
                    etcdctl = EtcdctlGroup(server)
                    try:
                        for index in range(args.rounds):
                            pair = [(row, group.round), (reference, etcdctl.round)]
                            for target, measure in pair[:: 1 if index % 2 else -1]:
                                target.samples.append(measure())
                    finally:
                        etcdctl.stop()
                    reference_ms = statistics.median(reference.samples) * 1000
                    row.target_ms = min(50.0, 1.5 * reference_ms)
                    ratio = statistics.median(row.samples) * 1000 / reference_ms
                    row.note += f", {ratio:.2f}x etcdctl median (rounds interleaved)"
            rows.append(row)
            if reference.samples:
                rows.append(reference)
    return rows


def postgres_rows(args: argparse.Namespace) -> list[Row]:
    """kill -9 (target ttl + 0.5 s) and graceful hand-over (target 50 ms) rows."""
    rows: list[Row] = []
    ttl = args.pg_ttl
    with pg_server() as server:
        for scenario in args.scenario:
            election = f"failover-{scenario}-{uuid.uuid4().hex[:8]}"

            def node_args(i: int, election: str = election) -> list[str]:
                return [
                    postgres_url(server.dsn, election, ttl=ttl),
                    "--endpoint",
                    f"127.0.0.1:{7700 + i}",
                ]

            row = measure_runner_group(
                "postgres",
                scenario,
                node_args,
                rounds=args.rounds,
                note=f"ttl {ttl} s, {server.version()}",
            )
            row.target_ms = ttl * 1000 + 500 if scenario == "kill9" else 50.0
            rows.append(row)
    return rows


DRIVERS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "local": local_rows,
    "etcd": etcd_rows,
    "postgres": postgres_rows,
}


def _table(rows: list[dict[str, object]]) -> str:
    columns = ["driver", "scenario", "rounds", "median_ms", "max_ms", "min_ms", "target_ms", "note"]
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--driver", action="append", choices=sorted(DRIVERS), help="repeatable; default: all"
    )
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all"
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds per row (>= 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="local driver poll (s)")
    parser.add_argument("--workdir", default=None, help="where local election directories go")
    parser.add_argument("--etcd-ttl", type=int, default=2, help="etcd lease ttl of the nodes (s)")
    parser.add_argument(
        "--pg-ttl", type=int, default=2, help="PostgreSQL lease ttl of the nodes (s)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.scenario = args.scenario or list(SCENARIOS)
    rows = [row.as_dict() for name in args.driver or list(DRIVERS) for row in DRIVERS[name](args)]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
