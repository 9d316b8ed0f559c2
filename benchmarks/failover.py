"""Failover time: from losing the leader to the next ``Leader`` report.

    python benchmarks/failover.py --driver local --rounds 10 [--json]
    python benchmarks/failover.py --driver etcd --rounds 10 [--etcd-ttl 2]

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

Adding a driver: write a function ``(args) -> list[Row]`` and register it in
``DRIVERS``; a driver whose nodes run under ``leaderwatch.drivers._node``
only needs :func:`measure_runner_group` with its node arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from etcd_server import EtcdServer, etcd_server
from nodes import NodeProcess, NodeSet

from leaderwatch.state import Leader

STARTUP_S = 30.0
FAILOVER_DEADLINE_S = 10.0
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


def measure_runner_group(
    driver: str,
    scenario: str,
    node_args: Callable[[int], Sequence[str]],
    *,
    rounds: int,
    size: int = 3,
    note: str = "",
) -> Row:
    """Measure ``scenario`` over ``rounds`` on ``size`` runner processes.

    ``node_args(i)`` are the runner arguments of node ``i`` (after
    ``python -m leaderwatch.drivers._node``), e.g. ``["local", "--directory", ...]``.
    """
    take_away = SCENARIOS[scenario]
    samples: list[float] = []
    with NodeSet() as group:
        slots = [group.spawn(*node_args(i), name=f"{driver}-{i}") for i in range(size)]
        for _ in range(rounds):
            leader = group.wait_stable(timeout=STARTUP_S)
            state = leader.state
            assert isinstance(state, Leader)
            old_epoch = state.epoch

            def successor(state: object, old: int = old_epoch) -> bool:
                return isinstance(state, Leader) and state.epoch > old

            sent = take_away(leader)

            def taken_over(nodes: NodeSet, sent: float = sent, gone: NodeProcess = leader) -> bool:
                return any(
                    n.first_report_after(sent, successor) is not None
                    for n in nodes.nodes
                    if n is not gone
                )

            group.wait_for(taken_over, timeout=FAILOVER_DEADLINE_S)
            reports = [
                r
                for n in group.nodes
                if n is not leader and (r := n.first_report_after(sent, successor)) is not None
            ]
            samples.append(min(r.t for r in reports) - sent)
            leader.wait_exit(FAILOVER_DEADLINE_S)
            index = slots.index(leader)
            slots[index] = group.spawn(*node_args(index), name=f"{driver}-{index}")
    return Row(driver, scenario, samples, note)


def local_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    for scenario in args.scenario:
        with tempfile.TemporaryDirectory(prefix="leaderwatch-failover-", dir=args.workdir) as d:

            def node_args(i: int, d: str = d) -> list[str]:
                return [
                    "local",
                    "--directory",
                    d,
                    "--endpoint",
                    f"127.0.0.1:{7100 + i}",
                    "--poll-interval",
                    str(args.poll_interval),
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


def etcdctl_reference(server: EtcdServer, *, rounds: int, size: int = 3) -> Row:
    """Graceful hand-over between ``etcdctl elect`` candidates (SIGTERM resigns)."""
    election = f"failover-etcdctl-{uuid.uuid4().hex[:8]}"
    samples: list[float] = []
    electors: list[_Elector] = []

    def spawn(i: int) -> _Elector:
        elector = _Elector(server, election, f"127.0.0.1:{7500 + i}")
        electors.append(elector)
        return elector

    try:
        slots = [spawn(i) for i in range(size)]
        for _ in range(rounds):
            deadline = time.monotonic() + STARTUP_S
            while not any(e.elected_at is not None for e in slots):
                if time.monotonic() > deadline:
                    raise RuntimeError("no etcdctl candidate was elected")
                time.sleep(0.01)
            # Let every candidate register its key before the leader resigns.
            while len(server.keys(election + "/")) < size:
                if time.monotonic() > deadline:
                    raise RuntimeError("etcdctl candidates did not register")
                time.sleep(0.01)
            leader = next(e for e in slots if e.elected_at is not None)
            sent = time.monotonic()
            os.kill(leader.process.pid, signal.SIGTERM)
            others = [e for e in slots if e is not leader]
            deadline = time.monotonic() + FAILOVER_DEADLINE_S
            while not any(e.elected_at is not None for e in others):
                if time.monotonic() > deadline:
                    raise RuntimeError("no etcdctl successor was elected")
                time.sleep(0.001)
            samples.append(min(e.elected_at for e in others if e.elected_at is not None) - sent)
            leader.process.wait(FAILOVER_DEADLINE_S)
            slots[slots.index(leader)] = spawn(slots.index(leader))
    finally:
        for elector in electors:
            elector.stop()
    return Row(
        "etcd-etcdctl", "sigterm", samples, "reference: etcdctl elect, same server", reference=True
    )


def etcd_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    ttl = args.etcd_ttl
    with etcd_server() as server:
        reference = (
            etcdctl_reference(server, rounds=args.rounds) if "sigterm" in args.scenario else None
        )
        for scenario in args.scenario:
            election = f"failover-{scenario}-{uuid.uuid4().hex[:8]}"

            def node_args(i: int, election: str = election) -> list[str]:
                return [
                    "etcd",
                    "--endpoints",
                    server.endpoint,
                    "--election",
                    election,
                    "--endpoint",
                    f"127.0.0.1:{7400 + i}",
                    "--ttl",
                    str(ttl),
                ]

            note = f"ttl {ttl} s"
            row = measure_runner_group("etcd", scenario, node_args, rounds=args.rounds, note=note)
            if scenario == "kill9":
                row.target_ms = ttl * 1000 + 500
            elif reference is not None:
                reference_ms = statistics.median(reference.samples) * 1000
                row.target_ms = min(50.0, 1.5 * reference_ms)
                ratio = statistics.median(row.samples) * 1000 / reference_ms
                row.note += f", {ratio:.2f}x etcdctl median"
            rows.append(row)
        if reference is not None:
            rows.append(reference)
    return rows


DRIVERS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "local": local_rows,
    "etcd": etcd_rows,
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
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.scenario = args.scenario or list(SCENARIOS)
    rows = [row.as_dict() for name in args.driver or list(DRIVERS) for row in DRIVERS[name](args)]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
