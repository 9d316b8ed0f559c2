"""``leaderwatch demo``: real node processes fail over while a client keeps getting served.

:func:`run_demo` starts ``nodes`` processes of :mod:`leaderwatch._demo_node`
(a :class:`~leaderwatch.node.LeaderNode` on :class:`LocalElectionDriver`, a
fenced ticket desk behind :class:`~leaderwatch.asgi.LeaderRedirectMiddleware`
under :func:`leaderwatch.uvicorn.serve`), each on its own loopback port, all
electing through a file lock in a new temporary directory. A client asks for
tickets without pause, each request entering the cluster at a random node
through :class:`~leaderwatch.httpx.LeaderAwareTransport`, and a watcher polls
every node's status endpoint. Each round SIGKILLs the leader, then stops the
next one with SIGTERM (its hand-over starts at the signal), restarting each
stopped node as a follower; every failover's client-visible outage is the
time from the signal to the first ticket the new leader issued.

Guarantees: every process it started is stopped and reaped, and the directory
removed, however the demo ends (finished, failed, SIGINT or SIGTERM); the
node processes also exit by themselves if the demo dies without stopping them.
Exit status: 0 when every request was served and every check held, 1
otherwise, 130 after SIGINT (Ctrl-C), 143 after SIGTERM — an interrupted demo
did not show what it promised, so it does not claim success.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TextIO

import anyio
import httpx
from anyio.abc import Process, TaskGroup

from leaderwatch._demo_node import LEDGER_FILE, STATUS_PREFIX, TICKETS_PATH
from leaderwatch._demo_view import JSONView, TextView, View
from leaderwatch.channel import WatchSender
from leaderwatch.client import LeaderCache
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import ENDPOINT_HEADER, EPOCH_HEADER
from leaderwatch.httpx import LeaderAwareTransport, LeaderUnavailable
from leaderwatch.retry import RetryPolicy

__all__ = ["DemoFailed", "DemoOptions", "run_demo"]

_HOST: Final = "127.0.0.1"
_PORTS_FROM: Final = 20000
_REQUEST_INTERVAL: Final = 0.02
_STATUS_INTERVAL: Final = 0.05
_STATUS_TIMEOUT: Final = 1.0
_STEADY_SECONDS: Final = 0.3
_STEADY_REQUESTS: Final = 5
_STARTUP_TIMEOUT: Final = 30.0
_FAILOVER_TIMEOUT: Final = 15.0
_GRACEFUL_STOP_TIMEOUT: Final = 5.0
_POLICY: Final = RetryPolicy(
    deadline=10.0, attempt_timeout=1.0, backoff_initial=0.005, backoff_maximum=0.05
)
_EXIT_CODES: Final = {signal.SIGINT: 130, signal.SIGTERM: 143}

FaultKind = Literal["SIGKILL", "SIGTERM"]
_FAULT_SIGNALS: Final[dict[FaultKind, signal.Signals]] = {
    "SIGKILL": signal.SIGKILL,
    "SIGTERM": signal.SIGTERM,
}


class DemoFailed(LeaderwatchError, RuntimeError):
    """The demo could not show a failover (a node died, no leader came); the message says why."""


@dataclass(frozen=True)
class DemoOptions:
    """How the demo runs and shows itself."""

    nodes: int = 3
    rounds: int = 2
    json_lines: bool = False
    color: bool = True
    progress: bool = True
    log_level: str = "error"
    log_format: str = "console"


@dataclass
class _Node:
    name: str
    port: int = 0
    process: Process | None = None
    starts: int = 0
    stopping: bool = False
    signalled_at: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class _Hop(NamedTuple):
    node: str
    result: str
    status: int | None
    epoch: int | None
    to: str | None


class _Success(NamedTuple):
    n: int
    at: float
    node: str
    epoch: int
    ticket: int
    repeated: bool


_ROUTE: contextvars.ContextVar[list[_Hop]] = contextvars.ContextVar("leaderwatch_demo_route")


class _RouteRecorder(httpx.AsyncHTTPTransport):
    """The client's connection pool; notes what each attempt got, for the timeline."""

    def __init__(self, names: dict[str, str]) -> None:
        # Plain HTTP on loopback: no certificate is ever checked, and loading the CA
        # bundle for nothing can take most of a second on a busy machine.
        super().__init__(verify=False)
        self._names = names

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = _ROUTE.get(None)
        node = self._names.get(f"{request.url.host}:{request.url.port}", str(request.url.netloc))
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as error:
            if route is not None:
                route.append(_Hop(node, _failure_kind(error), None, None, None))
            raise
        if route is not None:
            headers = response.headers
            epoch = headers.get(EPOCH_HEADER)
            leader = headers.get(ENDPOINT_HEADER)
            result = {200: "served", 307: "redirect", 503: "no_leader"}.get(
                response.status_code, "other"
            )
            route.append(
                _Hop(
                    node,
                    result,
                    response.status_code,
                    int(epoch) if epoch is not None and epoch.isdigit() else None,
                    None if leader is None else self._names.get(leader, leader),
                )
            )
        return response


def _failure_kind(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.ConnectError):
        return "refused"
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    return "broken"


class _Changes:
    """A counter bumped whenever anything the demo waits on changes."""

    def __init__(self) -> None:
        self._sender: WatchSender[int] = WatchSender(0)

    def bump(self) -> None:
        self._sender.send(self._sender.borrow() + 1)

    async def until(self, predicate: Callable[[], bool], seconds: float, what: str) -> None:
        receiver = self._sender.subscribe()
        try:
            with anyio.fail_after(seconds):
                while not predicate():
                    await receiver.changed()
        except TimeoutError:
            raise DemoFailed(f"gave up after {seconds:g} s waiting for {what}") from None
        finally:
            receiver.close()


class _Leaders:
    """Reports each epoch's leader once: from its status endpoint or its first ticket."""

    def __init__(self, view: View) -> None:
        self._view = view
        self._epochs: set[int] = set()

    def seen(self, node: str, epoch: int, source: Literal["status", "ticket"]) -> None:
        if epoch not in self._epochs:
            self._epochs.add(epoch)
            self._view.event("leader_elected", node=node, epoch=epoch, source=source)


class _Client:
    """Asks for one ticket after another, each entering the cluster at a random node."""

    def __init__(
        self, nodes: list[_Node], view: View, changes: _Changes, leaders: _Leaders
    ) -> None:
        self._leaders = leaders
        self._endpoints = [node.endpoint for node in nodes]
        self._pool = _RouteRecorder({node.endpoint: node.name for node in nodes})
        self._view = view
        self._changes = changes
        self._rng = random.Random()
        self._wake = anyio.Event()
        self._stopping = False
        self.stopped = anyio.Event()
        self.sent = 0
        self.failed = 0
        self.served: list[_Success] = []

    @property
    def last(self) -> _Success | None:
        return self.served[-1] if self.served else None

    def wake(self) -> None:
        """Send the next request now (a fault just happened)."""
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._stopping:
                await self._one()
                with anyio.move_on_after(_REQUEST_INTERVAL):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()
        finally:
            self.stopped.set()
            with anyio.CancelScope(shield=True):
                await self._pool.aclose()

    async def finish(self) -> None:
        """Let the request in flight complete (its ticket is counted), then stop."""
        self._stopping = True
        self._wake.set()
        await self.stopped.wait()

    async def _one(self) -> None:
        self.sent += 1
        n = self.sent
        route: list[_Hop] = []
        token = _ROUTE.set(route)
        started = time.monotonic()
        try:
            # A new cache per request: it enters at a random node, as through a plain
            # load balancer, so the timeline shows the redirects.
            transport = LeaderAwareTransport(
                self._endpoints,
                cache=LeaderCache(self._endpoints, rng=self._rng),
                policy=_POLICY,
                inner=self._pool,
                idempotency_keys=True,
            )
            request = httpx.Request("POST", f"http://cluster{TICKETS_PATH}", json={"n": n})
            response = await transport.handle_async_request(request)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            error = None if response.status_code == 200 else f"HTTP {response.status_code}"
        except LeaderUnavailable as gave_up:
            error = str(gave_up)
        finally:
            _ROUTE.reset(token)
        done = time.monotonic()
        hops = [hop._asdict() for hop in route]
        if error is not None:
            self.failed += 1
            self._view.event("request_failed", n=n, error=error, route=hops)
        else:
            ticket = json.loads(body)
            success = _Success(
                n, done, ticket["node"], ticket["epoch"], ticket["ticket"], ticket["repeated"]
            )
            self.served.append(success)
            self._leaders.seen(success.node, success.epoch, "ticket")
            self._view.event(
                "request",
                n=n,
                route=hops,
                node=success.node,
                epoch=success.epoch,
                ticket=success.ticket,
                repeated=success.repeated,
                ms=round((done - started) * 1000, 2),
            )
        self._view.counts(self.sent, self.failed)
        self._changes.bump()


class _Watcher:
    """Polls every running node's status endpoint; reports nodes ready and leaders elected."""

    def __init__(
        self, nodes: list[_Node], view: View, changes: _Changes, leaders: _Leaders
    ) -> None:
        self._leaders = leaders
        self._nodes = nodes
        self._view = view
        self._changes = changes
        self._names = {node.endpoint: node.name for node in nodes}
        self.ready: set[str] = set()
        self.leader: tuple[str, int] | None = None

    def restarted(self, node: _Node) -> None:
        self.ready.discard(node.name)

    async def run(self) -> None:
        async with httpx.AsyncClient(
            timeout=_STATUS_TIMEOUT, trust_env=False, verify=False
        ) as http:
            while True:
                async with anyio.create_task_group() as task_group:
                    for node in self._nodes:
                        if node.running:
                            task_group.start_soon(self._poll, http, node)
                await anyio.sleep(_STATUS_INTERVAL)

    async def _poll(self, http: httpx.AsyncClient, node: _Node) -> None:
        process = node.process
        try:
            response = await http.get(f"http://{node.endpoint}{STATUS_PREFIX}/status")
            status = response.json()
        except (httpx.HTTPError, ValueError):
            return
        if node.process is not process or not node.running:
            return
        epoch = status.get("epoch")
        leader = status.get("leader_endpoint")
        changed = False
        if node.name not in self.ready and status.get("state") in ("leader", "follower"):
            self.ready.add(node.name)
            changed = True
            self._view.event(
                "node_ready",
                node=node.name,
                state=status["state"],
                epoch=epoch,
                leader=None if leader is None else self._names.get(leader, leader),
            )
        if status.get("gate") == "serving" and isinstance(epoch, int):
            self._leaders.seen(node.name, epoch, "status")
            if self.leader != (node.name, epoch):
                self.leader = (node.name, epoch)
                changed = True
        if changed:
            self._changes.bump()


class _Demo:
    """One run: the nodes, the client, the watcher, the faults, and the numbers."""

    def __init__(self, options: DemoOptions, view: View, directory: Path) -> None:
        self._options = options
        self._view = view
        self._directory = directory
        self._changes = _Changes()
        self.nodes = [_Node(f"node-{index}") for index in range(1, options.nodes + 1)]
        self._task_group: TaskGroup | None = None
        self._watcher: _Watcher | None = None
        self._client: _Client | None = None
        self.outages: dict[FaultKind, list[float]] = {"SIGKILL": [], "SIGTERM": []}
        self._exited: set[int] = set()
        self._rng = random.Random()

    # -- processes ---------------------------------------------------------------------

    async def _spawn(self, node: _Node) -> None:
        if not node.port:
            node.port = _free_port(self._rng, {other.port for other in self.nodes})
        options = self._options
        command = [
            sys.executable,
            "-m",
            "leaderwatch._demo_node",
            "--directory",
            str(self._directory),
            "--port",
            str(node.port),
            "--name",
            node.name,
            # Named now: a node still starting when the demo dies would see its new parent.
            "--parent",
            str(os.getpid()),
            "--log-level",
            options.log_level,
            "--log-format",
            options.log_format,
        ]
        # Its own session: Ctrl-C in a terminal reaches the demo only, which stops the
        # nodes itself. Logs go to the demo's stderr. Shielded: a process started is
        # always recorded, so it is always stopped.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                start_new_session=True,
            )
        node.process = process
        node.stopping = False
        node.starts += 1
        if self._watcher is not None:
            self._watcher.restarted(node)
        assert self._task_group is not None
        self._task_group.start_soon(self._watch_exit, node, process)
        self._view.event(
            "node_started",
            node=node.name,
            endpoint=node.endpoint,
            pid=process.pid,
            restart=node.starts > 1,
        )

    async def _watch_exit(self, node: _Node, process: Process) -> None:
        code = await process.wait()
        self._exited.add(process.pid)
        self._changes.bump()
        name = signal.Signals(-code).name if code < 0 else None
        self._view.event(
            "node_exited",
            node=node.name,
            pid=process.pid,
            returncode=code,
            signal=name,
            ms=round((time.monotonic() - node.signalled_at) * 1000, 1),
        )
        if not node.stopping:
            how = f"killed by {name}" if name else f"exit status {code}"
            raise DemoFailed(
                f"{node.name} (pid {process.pid}) stopped on its own ({how}); "
                "any error it reported is above"
            )

    async def stop_all(self, *, graceful: bool) -> int:
        """Stop and reap every node process; how many could not be reaped (0)."""
        processes = [
            node.process
            for node in self.nodes
            if node.process is not None and node.process.returncode is None
        ]
        for node in self.nodes:
            node.stopping = True
        for process in processes:
            _send(process, signal.SIGTERM if graceful else signal.SIGKILL)
        if graceful:
            with anyio.move_on_after(_GRACEFUL_STOP_TIMEOUT):
                for process in processes:
                    await process.wait()
            for process in processes:
                _send(process, signal.SIGKILL)
        with anyio.move_on_after(_GRACEFUL_STOP_TIMEOUT):
            for process in processes:
                await process.wait()
        return sum(process.returncode is None for process in processes)

    # -- the story ---------------------------------------------------------------------

    async def run(self) -> None:
        options = self._options
        view = self._view
        view.event(
            "demo_started",
            nodes=options.nodes,
            rounds=options.rounds,
            directory=str(self._directory),
        )
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_group.start_soon(view.animate)
            view.phase(f"starting {options.nodes} node processes")
            for node in self.nodes:
                await self._spawn(node)
            leaders = _Leaders(view)
            watcher = self._watcher = _Watcher(self.nodes, view, self._changes, leaders)
            task_group.start_soon(watcher.run)
            view.phase("waiting for the nodes to elect a leader")
            await self._changes.until(
                lambda: watcher.leader is not None,
                _STARTUP_TIMEOUT,
                "the nodes to start and elect a leader",
            )
            client = self._client = _Client(self.nodes, view, self._changes, leaders)
            task_group.start_soon(client.run)
            faults: list[tuple[int, FaultKind]] = [
                (number, kind)
                for number in range(1, options.rounds + 1)
                for kind in ("SIGKILL", "SIGTERM")
            ]
            for index, (number, kind) in enumerate(faults):
                await self._steady(watcher, client)
                await self._fault(number, kind, client, restart=index < len(faults) - 1)
            await self._steady(watcher, client, successor=False)
            self._view.phase("finishing the last request")
            await client.finish()
            task_group.cancel_scope.cancel()

    async def _steady(self, watcher: _Watcher, client: _Client, *, successor: bool = True) -> None:
        """Traffic until the leader served a while and (``successor``) a follower is ready."""
        since = time.monotonic()
        count = len(client.served)

        def follower_ready(leader: str) -> bool:
            return any(
                node.name in watcher.ready and node.running and not node.stopping
                for node in self.nodes
                if node.name != leader
            )

        def settled() -> bool:
            last = client.last
            if last is None or watcher.leader != (last.node, last.epoch):
                self._view.phase("client traffic: waiting for the leader to serve")
                return False
            if successor and not follower_ready(last.node):
                self._view.phase("client traffic: waiting for a follower to be ready")
                return False
            self._view.phase("client traffic")
            return (
                len(client.served) - count >= _STEADY_REQUESTS
                and time.monotonic() - since >= _STEADY_SECONDS
            )

        await self._changes.until(settled, _STARTUP_TIMEOUT, "a leader serving and a follower")

    async def _fault(self, number: int, kind: FaultKind, client: _Client, *, restart: bool) -> None:
        last = client.last
        assert last is not None
        node = next(node for node in self.nodes if node.name == last.node)
        process = node.process
        assert process is not None
        self._view.event(
            "fault", round=number, kind=kind, node=node.name, pid=process.pid, epoch=last.epoch
        )
        node.stopping = True
        node.signalled_at = time.monotonic()
        _send(process, _FAULT_SIGNALS[kind])
        client.wake()
        self._view.phase(f"{kind} {node.name}: waiting for a new leader to serve the client")
        await self._changes.until(
            lambda: client.last is not None and client.last.epoch > last.epoch,
            _FAILOVER_TIMEOUT,
            f"a new leader to serve the client after {kind} of {node.name}",
        )
        first = client.last
        assert first is not None
        outage = first.at - node.signalled_at
        self.outages[kind].append(outage)
        self._view.event(
            "failover",
            round=number,
            kind=kind,
            from_node=node.name,
            from_epoch=last.epoch,
            to_node=first.node,
            to_epoch=first.epoch,
            outage_ms=round(outage * 1000, 2),
            request=first.n,
        )
        if restart:
            assert self._task_group is not None
            self._task_group.start_soon(self._restart, node, process, kind)

    async def _restart(self, node: _Node, process: Process, kind: FaultKind) -> None:
        """Start ``node`` again once its stopped process exited (it rejoins as a follower)."""
        await self._changes.until(
            lambda: process.pid in self._exited,
            _GRACEFUL_STOP_TIMEOUT,
            f"{node.name} to exit after {kind}",
        )
        await self._spawn(node)

    # -- the numbers -------------------------------------------------------------------

    def summary(self, elapsed: float, ledger: list[dict[str, Any]]) -> dict[str, Any]:
        client = self._client
        served = client.served if client is not None else []
        per_epoch: dict[int, list[str]] = {}
        for success in served:
            per_epoch.setdefault(success.epoch, []).append(success.node)
        epochs = [success.epoch for success in served]
        tickets = [success.ticket for success in served]
        ledger_tickets = [entry["ticket"] for entry in ledger]
        checks = {
            "no_failed_requests": client is not None and client.failed == 0,
            "one_node_per_epoch": all(len(set(nodes)) == 1 for nodes in per_epoch.values()),
            "epochs_never_decrease": all(a <= b for a, b in itertools.pairwise(epochs)),
            "tickets_in_order": all(a < b for a, b in itertools.pairwise(tickets)),
            "ledger_matches": sorted(ledger_tickets) == sorted(set(ledger_tickets))
            and set(ledger_tickets) == set(tickets),
        }
        outage_ms = {
            kind: {
                "failovers": len(samples),
                "median": round(statistics.median(samples) * 1000, 2) if samples else None,
                "max": round(max(samples) * 1000, 2) if samples else None,
                "samples": [round(sample * 1000, 2) for sample in samples],
            }
            for kind, samples in self.outages.items()
        }
        return {
            "rounds": self._options.rounds,
            "nodes": self._options.nodes,
            "elapsed_s": round(elapsed, 3),
            "requests": client.sent if client is not None else 0,
            "served": len(served),
            "failed": client.failed if client is not None else 0,
            "repeated": sum(success.repeated for success in served),
            "ledger_tickets": len(ledger_tickets),
            "outage_ms": outage_ms,
            "epochs": [
                {"epoch": epoch, "node": nodes[0], "requests": len(nodes)}
                for epoch, nodes in sorted(per_epoch.items())
            ],
            "checks": checks,
            "ok": all(checks.values()),
        }


def _send(process: Process, signum: signal.Signals) -> None:
    """Signal ``process`` unless it is known to have exited.

    Not ``Popen.send_signal``: it polls first, which can reap the process behind
    the back of asyncio's child watcher (which then warns about an unknown child).
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _free_port(rng: random.Random, taken: set[int]) -> int:
    """A free loopback port below the ephemeral range, else any free one.

    The node binds it itself, a moment later, and again after each restart;
    a port the kernel never hands out for outgoing connections stays free meanwhile.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = [rng.randrange(_PORTS_FROM, low) for _ in range(64)] if low > _PORTS_FROM else []
    for port in [*candidates, 0]:
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((_HOST, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise DemoFailed("no free loopback port found")


def _remove(directory: Path) -> bool:
    """Remove the election directory; whether it is gone."""
    shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()


def _read_ledger(directory: Path) -> list[dict[str, Any]]:
    try:
        text = (directory / LEDGER_FILE).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def make_view(options: DemoOptions, out: TextIO) -> View:
    """The JSON-lines view or the text timeline, as ``options`` ask."""
    if options.json_lines:
        return JSONView(out)
    return TextView(out, color=options.color, progress=options.progress)


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Run the demo, writing its events to ``out``; the exit status (see the module)."""
    if options.nodes < 2 or options.rounds < 1:
        raise ValueError("the demo needs at least 2 nodes and 1 round")
    view = make_view(options, out)
    caught: list[signal.Signals] = []
    outcome: dict[str, Any] | None = None
    failure: BaseException | None = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        directory = Path(tempfile.mkdtemp(prefix="leaderwatch-demo-"))
        demo = _Demo(options, view, directory)
        started = time.monotonic()
        try:
            async with anyio.create_task_group() as task_group:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        caught.append(signal.Signals(signum))
                        view.event("interrupted", signal=signal.Signals(signum).name)
                        task_group.cancel_scope.cancel()
                        return

                task_group.start_soon(stop_on_signal)
                try:
                    await demo.run()
                except* DemoFailed as group:
                    failure = group.exceptions[0]
                task_group.cancel_scope.cancel()
            if not caught and failure is None:
                # The client has stopped: the ledger is final although the nodes still run.
                outcome = demo.summary(time.monotonic() - started, _read_ledger(directory))
                view.event("summary", **outcome)
        finally:
            view.phase("stopping the node processes")
            with anyio.CancelScope(shield=True):
                left = await demo.stop_all(graceful=not caught and failure is None)
            removed = _remove(directory)
            view.close()
        if caught:
            code = _EXIT_CODES[caught[0]]
        elif failure is not None or outcome is None or not outcome["ok"]:
            code = 1
        else:
            code = 0
        if left:
            code = code or 1
        if failure is not None:
            view.event("failed", error=str(failure))
        view.event(
            "finished",
            exit_code=code,
            processes=sum(node.starts for node in demo.nodes),
            processes_left=left,
            directory=str(directory),
            directory_removed=removed,
        )
    if failure is not None:
        raise failure
    return code
