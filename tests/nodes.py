"""Spawn election node processes and watch what they report, with deadlines.

Backend-agnostic: a node is any command that prints one JSON object per
line, ``{"node", "pid", "t", "state"}``, as ``leaderwatch campaign --format
json`` (the process runner, :data:`RUNNER`) and ``leaderwatch.testing.runner``
do. Used by the multi-process tests and by the benchmarks.

    with NodeSet() as nodes:
        a = nodes.spawn(local_url(d, poll_interval=0.02), "--endpoint", "127.0.0.1:7001")
        a.wait_for(lambda n: isinstance(n.state, Leader), timeout=10)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from leaderwatch.state import Follower, Leader, Unknown, leader_state_from_json
from leaderwatch.testing import HistoryReport, HistoryViolation, LeadershipHistory

__all__ = [
    "RUNNER",
    "NodeProcess",
    "NodeSet",
    "NodeTimeout",
    "Report",
    "assert_epochs_never_decrease",
    "assert_history_ok",
    "assert_one_leader_per_epoch",
    "etcd_url",
    "history_of",
    "local_url",
    "postgres_url",
]

RUNNER: tuple[str, ...] = (
    sys.executable,
    "-m",
    "leaderwatch",
    "--log-format",
    "json",
    "--log-level",
    "info",
    "campaign",
    "--format",
    "json",
)
"""The process runner: ``leaderwatch campaign --format json``, info log events on stderr as
JSON lines. Add the election URL and ``--endpoint HOST:PORT`` (``--node-id``, ``--backend``)."""


def _options(**options: object) -> str:
    given = {key: str(value) for key, value in options.items() if value is not None}
    return urlencode(given, quote_via=quote)


def local_url(directory: str | Path, *, poll_interval: float | None = None) -> str:
    """``local:///DIR[?poll_interval=S]`` for ``directory`` (made absolute)."""
    options = _options(poll_interval=poll_interval)
    path = quote(str(Path(directory).absolute()))
    return f"local://{path}" + (f"?{options}" if options else "")


def etcd_url(
    endpoints: str | Sequence[str],
    election: str,
    *,
    ttl: int | None = None,
    margin: float | None = None,
    connect_timeout: float | None = None,
) -> str:
    """``etcd://H:P[,H:P]/ELECTION[?ttl=...]``; endpoints are tried in the order given."""
    hosts = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
    options = _options(ttl=ttl, margin=margin, connect_timeout=connect_timeout)
    return f"etcd://{hosts}/{quote(election, safe='/')}" + (f"?{options}" if options else "")


def postgres_url(
    dsn: str,
    election: str,
    *,
    ttl: int | None = None,
    margin: float | None = None,
    schema: str | None = None,
) -> str:
    """``dsn`` (a ``postgres(ql)://`` URL) with the election and its options in the query."""
    options = _options(election=election, ttl=ttl, margin=margin, schema=schema)
    return dsn + ("&" if "?" in dsn else "?") + options


State = Leader | Follower | Unknown


class NodeTimeout(AssertionError):
    """A node did not reach the awaited condition before its deadline."""


@dataclass(frozen=True)
class Report:
    """One line a node printed: its state and when (``time.monotonic()``)."""

    t: float
    state: State
    raw: dict[str, Any]


class NodeProcess:
    """One running node; its reports accumulate in :attr:`reports` as they arrive."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        changed: threading.Condition | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.reports: list[Report] = []
        self.stderr_lines: list[str] = []
        self.bad_lines: list[str] = []
        self.signalled_at: float | None = None
        """When SIGKILL or SIGTERM was last sent (``time.monotonic()``)."""
        # Shared with a NodeSet so that one wait sees every node's reports.
        self._changed = changed or threading.Condition()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def __repr__(self) -> str:
        return f"<NodeProcess {self.name} pid={self.pid} state={self.state!r}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def states(self) -> list[State]:
        """Every state reported so far, in order."""
        with self._changed:
            return [report.state for report in self.reports]

    @property
    def state(self) -> State | None:
        """The last state reported, ``None`` before the first."""
        with self._changed:
            return self.reports[-1].state if self.reports else None

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line printed so far, as parsed."""
        with self._changed:
            return [report.raw for report in self.reports]

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                raw = json.loads(line)
                report = Report(
                    t=float(raw["t"]),
                    state=leader_state_from_json(json.dumps(raw["state"])),
                    raw=raw,
                )
            except (ValueError, KeyError, TypeError):
                with self._changed:
                    self.bad_lines.append(line)
                continue
            with self._changed:
                self.reports.append(report)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.stderr_lines.append(line)

    def wait_for(self, predicate: Callable[[NodeProcess], bool], *, timeout: float) -> None:
        """Return once ``predicate(self)`` holds; raise :class:`NodeTimeout` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NodeTimeout(
                        f"{self.name}: condition not met in {timeout}s; {self.describe()}"
                    )
                if self.process.poll() is not None and not self._readers[0].is_alive():
                    if predicate(self):
                        return
                    raise NodeTimeout(
                        f"{self.name} exited before the condition held; {self.describe()}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def wait_for_state(self, predicate: Callable[[State], bool], *, timeout: float) -> State:
        """Wait until the last reported state satisfies ``predicate``; return it."""
        self.wait_for(
            lambda node: node.state is not None and predicate(node.state), timeout=timeout
        )
        state = self.state
        assert state is not None
        return state

    def first_report_after(self, t: float, predicate: Callable[[State], bool]) -> Report | None:
        """The first report at or after monotonic time ``t`` whose state satisfies ``predicate``."""
        with self._changed:
            return next((r for r in self.reports if r.t >= t and predicate(r.state)), None)

    def describe(self) -> str:
        with self._changed:
            states = [r.state for r in self.reports[-5:]]
            stderr = "".join(self.stderr_lines[-10:])
        return (
            f"returncode={self.process.poll()} last states={states!r} "
            f"bad lines={self.bad_lines[-3:]!r} stderr tail:\n{stderr}"
        )

    def kill9(self) -> float:
        """Send SIGKILL; return ``time.monotonic()`` just before sending it."""
        sent = self.signalled_at = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        return sent

    def terminate(self) -> float:
        """Send SIGTERM; return ``time.monotonic()`` just before sending it."""
        sent = self.signalled_at = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        return sent

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit and its output to be read; return its exit code.

        A process still running after ``timeout`` seconds is killed and reaped, and
        :class:`NodeTimeout` is raised.
        """
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise NodeTimeout(
                f"{self.name} did not exit within {timeout}s (killed); {self.describe()}"
            ) from None
        self._finish_reading(timeout)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs, reap it and close its pipes; idempotent."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._finish_reading(5)

    def _finish_reading(self, timeout: float) -> None:
        for reader in self._readers:
            reader.join(timeout)
        # A reader still blocked (a grandchild kept the pipe open) owns its pipe: leave it.
        for reader, pipe in zip(
            self._readers, (self.process.stdout, self.process.stderr), strict=True
        ):
            if pipe is not None and not reader.is_alive():
                pipe.close()


class NodeSet:
    """Spawns nodes and, on exit (or :meth:`stop_all`), kills every one still running."""

    def __init__(self, prefix: Sequence[str] = RUNNER) -> None:
        self.prefix = tuple(prefix)
        self.nodes: list[NodeProcess] = []
        self._changed = threading.Condition()

    def spawn(self, *args: str, name: str | None = None) -> NodeProcess:
        """Start ``prefix + args`` (by default :data:`RUNNER`: an election URL, ``--endpoint``)."""
        return self.spawn_command([*self.prefix, *args], name=name)

    def spawn_command(self, argv: Sequence[str], *, name: str | None = None) -> NodeProcess:
        """Start an arbitrary command that prints node reports."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        node = NodeProcess(
            argv, name=name or f"node{len(self.nodes)}", env=env, changed=self._changed
        )
        self.nodes.append(node)
        return node

    def running(self) -> list[NodeProcess]:
        return [node for node in self.nodes if node.process.poll() is None]

    def leaders(self) -> list[NodeProcess]:
        """Running nodes whose last report is ``Leader``."""
        return [node for node in self.running() if isinstance(node.state, Leader)]

    def wait_for(self, predicate: Callable[[NodeSet], bool], *, timeout: float) -> None:
        """Return once ``predicate(self)`` holds; poll reports until ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = "\n".join(f"{node.name}: {node.describe()}" for node in self.nodes)
                    raise NodeTimeout(f"cluster condition not met in {timeout}s\n{detail}")
                # Exits are not reported through the condition, hence the bounded wait.
                self._changed.wait(min(remaining, 0.1))

    def wait_stable(self, *, timeout: float) -> NodeProcess:
        """Wait until one running node leads and every other follows it; return the leader."""

        def stable(nodes: NodeSet) -> bool:
            leaders = nodes.leaders()
            if len(leaders) != 1:
                return False
            leader = leaders[0].state
            assert isinstance(leader, Leader)
            return all(
                node in leaders
                or (isinstance(node.state, Follower) and node.state.leader_epoch == leader.epoch)
                for node in nodes.running()
            )

        self.wait_for(stable, timeout=timeout)
        return self.leaders()[0]

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NodeSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _endpoint_of(node: NodeProcess) -> str | None:
    argv = node.argv
    return argv[argv.index("--endpoint") + 1] if "--endpoint" in argv[:-1] else None


def history_of(nodes: Sequence[NodeProcess]) -> LeadershipHistory:
    """Everything ``nodes`` reported, as a :class:`LeadershipHistory` keyed by process name.

    Each node's ``--endpoint`` is declared; a process that exited is marked
    gone when it was signalled (or at its last report, if later).
    """
    history = LeadershipHistory()
    for node in nodes:
        endpoint = _endpoint_of(node)
        if endpoint is not None:
            history.declare(node.name, endpoint=endpoint)
        reports = list(node.reports)
        for report in reports:
            history.record(node.name, report.state, t=report.t)
        if node.process.poll() is not None:
            last = reports[-1].t if reports else time.monotonic()
            history.mark_gone(node.name, t=max(last, node.signalled_at or last))
    return history


def log_events(node: NodeProcess) -> list[dict[str, Any]]:
    """A node's JSON log events (its stderr lines that parse as JSON objects)."""
    events = []
    for line in node.stderr_lines:
        try:
            logged = json.loads(line)
        except ValueError:
            continue
        if isinstance(logged, dict):
            events.append(logged)
    return events


def abandoned_campaign_hint(
    nodes: Sequence[NodeProcess], violation: HistoryViolation
) -> float | None:
    """How long a hint at an epoch nobody led at lasted, if it named an abandoned campaign.

    That is what is left of issue 11 defect 5 (docs/reliability.md, "What is
    left"): the hinted node logged ``etcd_campaign_started`` for a key at the
    hinted revision and ``etcd_campaign_abandoned`` for that key's lease
    without leading on it (etcd did not answer while it waited in line), and
    other nodes followed the key until its retried revoke went through. The
    duration runs from the hint to the hinting node's next report
    (``math.inf`` if it never reported again). ``None`` for any other violation.
    """
    if violation.kind != "hint_unled_epoch" or not violation.events:
        return None
    hint = violation.events[0]
    state = hint.state
    if not isinstance(state, Follower) or state.leader_epoch is None:
        return None
    for node in nodes:
        if _endpoint_of(node) != state.leader_endpoint:
            continue
        logged = log_events(node)
        leases = {
            str(event.get("key", "")).rsplit("/", 1)[-1]
            for event in logged
            if event.get("event") == "etcd_campaign_started"
            and event.get("create_revision") == state.leader_epoch
        }
        if any(
            event.get("event") == "etcd_campaign_abandoned"
            and event.get("lease_id") in leases
            and not event.get("was_leader")
            for event in logged
        ):
            hinter = next(n for n in nodes if n.name == hint.node)
            later = [report.t for report in hinter.reports if report.t > hint.t]
            return min(later, default=math.inf) - hint.t
    return None


def assert_history_ok(
    nodes: Sequence[NodeProcess],
    *,
    overlap_margin: float = 0.0,
    complete: bool = False,
    abandoned_hints_within: float | None = None,
) -> HistoryReport:
    """Every rule of :meth:`LeadershipHistory.check` holds for what ``nodes`` reported.

    With ``abandoned_hints_within``, a hint at an epoch nobody led at is
    excused when it named a campaign abandoned while etcd did not answer
    and lasted at most that many seconds (:func:`abandoned_campaign_hint`).
    """
    report = history_of(nodes).check(overlap_margin=overlap_margin, complete=complete)
    if abandoned_hints_within is not None:
        bound = abandoned_hints_within

        def excused(violation: HistoryViolation) -> bool:
            lasted = abandoned_campaign_hint(nodes, violation)
            return lasted is not None and lasted <= bound

        kept = tuple(violation for violation in report.violations if not excused(violation))
        report = report.model_copy(update={"violations": kept})
    report.raise_for_violations()
    return report


def _assert_none(nodes: Sequence[NodeProcess], *kinds: str) -> None:
    report = history_of(nodes).check(overlap_margin=float("inf"))
    found = [violation for violation in report.violations if violation.kind in kinds]
    assert not found, "\n".join(violation.describe() for violation in found)


def assert_epochs_never_decrease(nodes: Sequence[NodeProcess]) -> None:
    """Each node's reported epochs (Leader or Follower) never go down."""
    _assert_none(nodes, "epoch_decreased")


def assert_one_leader_per_epoch(nodes: Sequence[NodeProcess]) -> None:
    """No two processes ever reported ``Leader`` at the same epoch."""
    _assert_none(nodes, "epoch_led_twice")
