"""Benchmark the HTTP server side: middleware overhead and graceful hand-over.

Three parts, in one run, each against the same thing without leaderwatch:

- ``inprocess``: microseconds per ASGI call of a small app, with and without
  ``LeaderRedirectMiddleware`` (leader serving; follower redirecting), on a
  raw ASGI app and on a Starlette app; plus the hot-path primitives
  (``decide``, ``current_gate``, ``node.gate``, ``node.decide()``).
- ``loopback``: the same app served by uvicorn subprocesses on loopback:
  ``plain`` (``uvicorn.run``), ``runner`` (``leaderwatch.uvicorn.serve`` with
  a node, no middleware) and ``leader`` (the same with the middleware; a
  ``StaticDriver`` leader), driven by a keep-alive HTTP/1.1 client; rounds
  interleave the servers. Reported: the best and median round's mean
  latency, and each server's CPU time per request (Linux ``/proc``), the
  figure least disturbed by other load on the machine.
- ``handover``: two uvicorn nodes on a ``LocalElectionDriver`` directory;
  SIGTERM of the leader (``leaderwatch.uvicorn.serve``), time until the
  successor answers 200, against the driver's own hand-over (in-process
  ``resign()`` until the other driver publishes ``Leader``).

Usage::

    python benchmarks/http.py            # full run, about a minute on 2 cores
    python benchmarks/http.py --quick    # smoke run, a few seconds
    python benchmarks/http.py --json     # JSON on stdout (or --json PATH)
    python benchmarks/http.py --only inprocess --only handover
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path, and this file's name would
# shadow the standard library's ``http`` package for everything imported below.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from typing import Any

import anyio

from leaderwatch import LeaderNode, LocalElectionDriver, ManualDriver, StaticDriver
from leaderwatch.asgi import LeaderRedirectMiddleware
from leaderwatch.redirect import _decide, decide
from leaderwatch.serving import NotServing, Serving
from leaderwatch.state import Leader

SCRIPT = Path(__file__).resolve()
BODY = b'{"ok":true}'


# --------------------------------------------------------------------------
# The app under test (also what the loopback servers run)
# --------------------------------------------------------------------------


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Any) -> Response:
        return Response(BODY, media_type="application/json")

    return Starlette(routes=[Route("/x", endpoint)])


# --------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------


def best_per_call(run: Callable[[int], float], calls: int, repeats: int) -> float:
    """Best microseconds per call over ``repeats`` runs of ``calls`` calls."""
    results = []
    for _ in range(repeats):
        gc.collect()
        results.append(run(calls) / calls * 1e6)
    return min(results)


def timed(function: Callable[[], object]) -> Callable[[int], float]:
    def run(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        return time.perf_counter() - start

    return run


def asgi_caller(app: Any, path: str) -> Callable[[int], Awaitable[float]]:
    """A function running ``calls`` ASGI requests against ``app``; returns µs per call."""
    template = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        pass

    async def run(calls: int) -> float:
        gc.collect()
        start = time.perf_counter()
        for _ in range(calls):
            await app(dict(template), receive, send)
        return (time.perf_counter() - start) / calls * 1e6

    return run


async def interleaved(
    runners: dict[str, Callable[[int], Awaitable[float]]], calls: int, repeats: int
) -> dict[str, float]:
    """Best µs per call of each runner, the runners taking turns (load noise hits all alike)."""
    best = dict.fromkeys(runners, math.inf)
    for _ in range(repeats):
        for name, run in runners.items():
            best[name] = min(best[name], await run(calls))
    return best


async def inprocess(calls: int, repeats: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    leader = LeaderNode(StaticDriver(epoch=7))
    manual = ManualDriver()
    follower = LeaderNode(manual, self_endpoint="127.0.0.1:9001")
    async with leader, follower:
        await leader.serving.wait_for(lambda gate: isinstance(gate, Serving))
        manual.become_follower("127.0.0.1:9000", 7)
        await follower.serving.wait_for(
            lambda gate: isinstance(gate, NotServing) and gate.leader_endpoint is not None
        )
        gate = leader.task.current_gate
        redirect_gate = follower.task.current_gate
        rows["primitives_us"] = {
            "decide_uncached_serve": best_per_call(
                timed(lambda: _decide(gate, "127.0.0.1:9001")), calls, repeats
            ),
            "decide_uncached_redirect": best_per_call(
                timed(lambda: _decide(redirect_gate, "127.0.0.1:9001")), calls, repeats
            ),
            "decide": best_per_call(
                timed(lambda: decide(gate, self_endpoint="127.0.0.1:9001")), calls, repeats
            ),
            "current_gate_old": best_per_call(
                timed(lambda: gate if leader.leadership == Leader(epoch=gate.epoch) else None),
                calls,
                repeats,
            ),
            "current_gate": best_per_call(timed(lambda: leader.task.current_gate), calls, repeats),
            "node_gate": best_per_call(timed(lambda: leader.gate), calls, repeats),
            "node_decide": best_per_call(timed(leader.decide), calls, repeats),
        }
        table = {}
        for name, app in (("raw", hello), ("starlette", starlette_app())):
            best = await interleaved(
                {
                    "plain": asgi_caller(app, "/x"),
                    "leader": asgi_caller(LeaderRedirectMiddleware(app, node=leader), "/x"),
                    "follower": asgi_caller(LeaderRedirectMiddleware(app, node=follower), "/x"),
                },
                calls,
                repeats,
            )
            table[name] = {
                "plain_us": best["plain"],
                "leader_us": best["leader"],
                "overhead_us": best["leader"] - best["plain"],
                "follower_redirect_us": best["follower"],
            }
        rows["asgi"] = table
    return rows


# --------------------------------------------------------------------------
# Loopback with uvicorn
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited ({process.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"server on port {port} did not start")


@contextlib.contextmanager
def server(mode: str, port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--serve", mode, "--port", str(port)],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def keep_alive_load(port: int, requests: int, connections: int) -> dict[str, float]:
    """``requests`` GETs over ``connections`` keep-alive connections; latency and rate."""
    request = f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[float] = []

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(requests // connections) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {
        "rps": len(latencies) / elapsed,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "p50_us": statistics.median(latencies) * 1e6,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LOOPBACK_SERVERS = ("plain", "runner", "leader")
"""plain: uvicorn.run(app); runner: leaderwatch.uvicorn.serve(app) with a node; leader: the
same with the middleware (a StaticDriver leader)."""


def overhead_pct(value: float, base: float) -> float:
    return (value - base) / base * 100


def loopback(requests: int, connections: int, rounds: int) -> dict[str, Any]:
    """Wall-clock latency (best and median round) and server CPU time per request."""
    ports = {name: free_port() for name in LOOPBACK_SERVERS}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in LOOPBACK_SERVERS}
    with contextlib.ExitStack() as stack:
        processes = {name: stack.enter_context(server(name, ports[name])) for name in ports}
        for port in ports.values():
            asyncio.run(keep_alive_load(port, 1_000, connections))  # warm-up
        for _ in range(rounds):
            for name, port in ports.items():
                pid = processes[name].pid
                before = cpu_seconds(pid)
                run = asyncio.run(keep_alive_load(port, requests, connections))
                after = cpu_seconds(pid)
                if before is not None and after is not None:
                    run["server_cpu_us"] = (after - before) / requests * 1e6
                runs[name].append(run)
    summary: dict[str, Any] = {
        "connections": connections,
        "requests_per_round": requests,
        "rounds": rounds,
    }
    for name, results in runs.items():
        row: dict[str, float] = {
            "best_mean_us": min(run["mean_us"] for run in results),
            "median_mean_us": statistics.median(run["mean_us"] for run in results),
            "best_rps": max(run["rps"] for run in results),
        }
        cpu = [run["server_cpu_us"] for run in results if "server_cpu_us" in run]
        if cpu:
            row["server_cpu_us"] = statistics.median(cpu)
        summary[name] = row
    if all("server_cpu_us" in run for results in runs.values() for run in results):
        # Per-round differences: both servers of a round saw the same machine load.
        for name, base in (("leader_vs_plain", "plain"), ("leader_vs_runner", "runner")):
            summary[f"{name}_cpu_diff_us"] = statistics.median(
                leader_run["server_cpu_us"] - base_run["server_cpu_us"]
                for leader_run, base_run in zip(runs["leader"], runs[base], strict=True)
            )
    plain, runner, leader = summary["plain"], summary["runner"], summary["leader"]
    summary["overhead_pct"] = overhead_pct(leader["best_mean_us"], plain["best_mean_us"])
    summary["middleware_overhead_pct"] = overhead_pct(
        leader["best_mean_us"], runner["best_mean_us"]
    )
    if all("server_cpu_us" in row for row in (plain, runner, leader)):
        summary["server_cpu_overhead_pct"] = overhead_pct(
            leader["server_cpu_us"], plain["server_cpu_us"]
        )
        summary["middleware_server_cpu_overhead_pct"] = overhead_pct(
            leader["server_cpu_us"], runner["server_cpu_us"]
        )
    return summary


# --------------------------------------------------------------------------
# Hand-over
# --------------------------------------------------------------------------


def serves(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as connection:
            connection.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return connection.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.0005)
    raise RuntimeError("timed out")


async def driver_handover(directory: str, poll: float) -> float:
    """Seconds from the leader's resign() to the other driver publishing Leader."""
    first = LocalElectionDriver(directory, node_endpoint="127.0.0.1:1", poll_interval=poll)
    second = LocalElectionDriver(directory, node_endpoint="127.0.0.1:2", poll_interval=poll)
    async with first, second:
        winner: list[LocalElectionDriver] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as race:

                async def lead(driver: LocalElectionDriver) -> None:
                    await driver.leadership().wait_for(lambda state: isinstance(state, Leader))
                    winner.append(driver)
                    race.cancel_scope.cancel()

                race.start_soon(lead, first)
                race.start_soon(lead, second)
        leader = winner[0]
        other = (second if leader is first else first).leadership()
        start = anyio.current_time()
        await leader.resign()
        with anyio.fail_after(10):
            await other.wait_for(lambda state: isinstance(state, Leader))
        return anyio.current_time() - start


def handover(rounds: int, poll: float) -> dict[str, Any]:
    graceful: list[float] = []
    driver: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for index in range(rounds):
            driver.append(anyio.run(driver_handover, f"{root}/driver{index}", poll))
            directory = f"{root}/nodes{index}"
            first_port, second_port = free_port(), free_port()
            env = {"LW_BENCH_DIR": directory, "LW_BENCH_POLL": str(poll)}
            with server("node", first_port, **env) as first:
                wait_for(lambda port=first_port: serves(port), 20)
                with server("node", second_port, **env):
                    time.sleep(0.2)  # let the follower settle into its poll loop
                    start = time.monotonic()
                    first.send_signal(signal.SIGTERM)
                    served = wait_for(lambda port=second_port: serves(port), 20)
                    graceful.append(served - start)
                    first.wait(20)
    return {
        "poll_interval_s": poll,
        "rounds": rounds,
        "driver_ms": {"median": statistics.median(driver) * 1e3, "max": max(driver) * 1e3},
        "graceful_ms": {"median": statistics.median(graceful) * 1e3, "max": max(graceful) * 1e3},
        "ratio_median": statistics.median(graceful) / statistics.median(driver),
    }


# --------------------------------------------------------------------------
# Server mode and main
# --------------------------------------------------------------------------


def run_server(mode: str, port: int) -> None:
    import uvicorn

    import leaderwatch.uvicorn

    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
    }
    if mode == "plain":
        uvicorn.run(hello, **options)
        return
    if mode == "runner":  # the runner and a node, without the middleware
        node = LeaderNode(StaticDriver(epoch=1))
        leaderwatch.uvicorn.serve(hello, node=node, **options)
        return
    if mode == "leader":
        node = LeaderNode(StaticDriver(epoch=1))
    else:
        node = LeaderNode(
            LocalElectionDriver(
                os.environ["LW_BENCH_DIR"],
                node_endpoint=f"127.0.0.1:{port}",
                poll_interval=float(os.environ["LW_BENCH_POLL"]),
            )
        )
    leaderwatch.uvicorn.serve(LeaderRedirectMiddleware(hello, node=node), node=node, **options)


def print_table(result: dict[str, Any], out: Any) -> None:
    def line(*cells: object) -> None:
        print(
            "  ".join(f"{cell:>14}" if i else f"{cell:<26}" for i, cell in enumerate(cells)),
            file=out,
        )

    if "inprocess" in result:
        primitives = result["inprocess"]["primitives_us"]
        print("\nhot-path primitives (µs per call)", file=out)
        for name, value in primitives.items():
            line(name, f"{value:.3f}")
        print("\nin-process ASGI call (µs per request)", file=out)
        line("app", "plain", "with leader", "overhead", "follower 307")
        for name, row in result["inprocess"]["asgi"].items():
            line(
                name,
                f"{row['plain_us']:.2f}",
                f"{row['leader_us']:.2f}",
                f"{row['overhead_us']:.2f}",
                f"{row['follower_redirect_us']:.2f}",
            )
    if "loopback" in result:
        loop = result["loopback"]
        print(
            f"\nloopback, uvicorn, {loop['connections']} keep-alive connections, "
            f"{loop['rounds']} interleaved rounds of {loop['requests_per_round']} requests",
            file=out,
        )
        line("server", "best mean µs", "median mean µs", "best req/s", "server CPU µs")
        for name in LOOPBACK_SERVERS:
            row = loop[name]
            line(
                name,
                f"{row['best_mean_us']:.1f}",
                f"{row['median_mean_us']:.1f}",
                f"{row['best_rps']:.0f}",
                f"{row.get('server_cpu_us', math.nan):.1f}",
            )
        line(
            "leader vs plain",
            f"{loop['overhead_pct']:+.2f} %",
            "",
            "",
            f"{loop.get('server_cpu_overhead_pct', math.nan):+.2f} %",
        )
        line(
            "leader vs runner",
            f"{loop['middleware_overhead_pct']:+.2f} %",
            "",
            "",
            f"{loop.get('middleware_server_cpu_overhead_pct', math.nan):+.2f} %",
        )
        if "leader_vs_plain_cpu_diff_us" in loop:
            print(
                "median per-round server CPU difference: leader - plain "
                f"{loop['leader_vs_plain_cpu_diff_us']:+.1f} µs, leader - runner "
                f"{loop['leader_vs_runner_cpu_diff_us']:+.1f} µs per request",
                file=out,
            )
    if "handover" in result:
        hand = result["handover"]
        print(
            f"\nhand-over, local driver (poll {hand['poll_interval_s'] * 1e3:.0f} ms), "
            f"{hand['rounds']} rounds",
            file=out,
        )
        line("", "median ms", "max ms")
        line(
            "driver resign → Leader",
            f"{hand['driver_ms']['median']:.1f}",
            f"{hand['driver_ms']['max']:.1f}",
        )
        line(
            "SIGTERM → successor 200",
            f"{hand['graceful_ms']['median']:.1f}",
            f"{hand['graceful_ms']['max']:.1f}",
        )
        line("ratio (median)", f"{hand['ratio_median']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, a few seconds")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON")
    parser.add_argument(
        "--only",
        choices=("inprocess", "loopback", "handover"),
        action="append",
        help="parts to run",
    )
    parser.add_argument("--poll", type=float, default=0.05, help="local driver poll interval (s)")
    parser.add_argument("--rounds", type=int, help="loopback and hand-over rounds")
    parser.add_argument(
        "--serve", choices=("plain", "runner", "leader", "node"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.port)
        return
    parts = args.only or ["inprocess", "loopback", "handover"]
    quick = args.quick
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {name: version(name) for name in ("anyio", "uvicorn", "starlette", "pydantic")},
        "quick": quick,
    }
    if "inprocess" in parts:
        result["inprocess"] = asyncio.run(
            inprocess(calls=2_000 if quick else 50_000, repeats=2 if quick else 7)
        )
    if "loopback" in parts:
        result["loopback"] = loopback(
            requests=1_000 if quick else 10_000,
            connections=8,
            rounds=args.rounds or (1 if quick else 9),
        )
    if "handover" in parts:
        result["handover"] = handover(rounds=args.rounds or (1 if quick else 5), poll=args.poll)
    if args.json is None:
        print_table(result, sys.stdout)
    else:
        print_table(result, sys.stderr)
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
