"""Benchmark the leader-aware httpx transport against a plain httpx.AsyncClient, in one run.

Both clients talk to the same leader, which answers ``200`` with a
``leader-epoch`` header; the leader-aware client has its cache seated (the
steady state: every request goes straight to the leader, as after the first
redirect). Two setups:

- ``asgi``: the app in process, through ``httpx.ASGITransport`` (no network:
  the transport's own cost is most visible here);
- ``loopback``: the app under uvicorn in a child process on 127.0.0.1, through
  httpx's default ``AsyncHTTPTransport`` (keep-alive connections).

Rounds of the two clients alternate, so both see the same machine; the
figure is the median over rounds of the mean time per request.

Usage::

    python benchmarks/http_client.py            # about 30 s
    python benchmarks/http_client.py --quick    # a few seconds
    python benchmarks/http_client.py --json     # JSON on stdout (or --json PATH)
    python benchmarks/http_client.py --strict   # exit 1 if the loopback ratio misses 5 %
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import anyio
import anyio.abc
import httpx

from leaderwatch.client import LeaderCache
from leaderwatch.httpx import LeaderAwareTransport

TARGET_RATIO = 1.05
EPOCH = b"7"


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The leader: a tiny JSON reply with the served epoch."""
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
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"11"),
                (b"leader-epoch", EPOCH),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


@dataclass
class Row:
    setup: str
    requests_per_round: int
    rounds: int
    plain_us: float
    leaderwatch_us: float
    overhead_us: float
    ratio: float
    best_plain_us: float
    best_leaderwatch_us: float
    best_ratio: float
    target_ratio: float
    meets_target: bool


async def _round(client: httpx.AsyncClient, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        response = await client.get("/tickets?x=1")
        if response.status_code != 200:
            raise RuntimeError(f"unexpected status {response.status_code}")
    return (time.perf_counter() - started) / requests * 1e6


async def _compare(
    setup: str,
    plain: httpx.AsyncClient,
    aware: httpx.AsyncClient,
    *,
    rounds: int,
    requests: int,
) -> Row:
    for client in (plain, aware):  # warm up: connections, caches, code paths
        await _round(client, max(requests // 5, 50))
    plain_us: list[float] = []
    aware_us: list[float] = []
    for index in range(rounds):
        order = (plain, aware) if index % 2 == 0 else (aware, plain)
        for client in order:
            (plain_us if client is plain else aware_us).append(await _round(client, requests))
    plain_median = statistics.median(plain_us)
    aware_median = statistics.median(aware_us)
    ratio = aware_median / plain_median
    return Row(
        setup=setup,
        requests_per_round=requests,
        rounds=rounds,
        plain_us=round(plain_median, 2),
        leaderwatch_us=round(aware_median, 2),
        overhead_us=round(aware_median - plain_median, 2),
        ratio=round(ratio, 4),
        best_plain_us=round(min(plain_us), 2),
        best_leaderwatch_us=round(min(aware_us), 2),
        best_ratio=round(min(aware_us) / min(plain_us), 4),
        target_ratio=TARGET_RATIO,
        meets_target=ratio <= TARGET_RATIO,
    )


def _aware_transport(leader: str, inner: httpx.AsyncBaseTransport) -> LeaderAwareTransport:
    endpoints = [leader, "127.0.0.1:9", "127.0.0.1:10"]
    cache = LeaderCache(endpoints)
    cache.record_success(leader, int(EPOCH))
    return LeaderAwareTransport(endpoints, cache=cache, inner=inner)


async def asgi_row(rounds: int, requests: int) -> Row:
    leader = "leader.test:8000"
    plain = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=f"http://{leader}")
    aware = httpx.AsyncClient(
        transport=_aware_transport(leader, httpx.ASGITransport(app)), base_url="http://cluster"
    )
    async with plain, aware:
        return await _compare("asgi", plain, aware, rounds=rounds, requests=requests)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def loopback_row(rounds: int, requests: int) -> Row:
    port = _free_port()
    leader = f"127.0.0.1:{port}"
    server = await anyio.open_process(
        [sys.executable, __file__, "--serve", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with server:
        try:
            await _wait_until_serving(leader, server)
            plain = httpx.AsyncClient(base_url=f"http://{leader}")
            aware = httpx.AsyncClient(
                transport=_aware_transport(leader, httpx.AsyncHTTPTransport()),
                base_url="http://cluster",
            )
            async with plain, aware:
                return await _compare("loopback", plain, aware, rounds=rounds, requests=requests)
        finally:
            server.terminate()
            with anyio.move_on_after(10):
                await server.wait()


async def _wait_until_serving(leader: str, server: anyio.abc.Process) -> None:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as probe:
        while True:
            try:
                await probe.get(f"http://{leader}/")
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or server.returncode is not None:
                    raise RuntimeError("uvicorn did not start within 20 s") from None
                await anyio.sleep(0.05)


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    if "asgi" in args.setup:
        rows.append(await asgi_row(args.rounds, args.requests))
    if "loopback" in args.setup:
        rows.append(await loopback_row(args.rounds, args.requests))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        f"{'setup':<10} {'plain µs':>10} {'leaderwatch µs':>15} {'overhead µs':>12} "
        f"{'ratio':>7} {'best ratio':>10}  target",
    ]
    for row in rows:
        verdict = "ok" if row.meets_target else "MISSED"
        lines.append(
            f"{row.setup:<10} {row.plain_us:>10.1f} {row.leaderwatch_us:>15.1f} "
            f"{row.overhead_us:>12.1f} {row.ratio:>7.3f} {row.best_ratio:>10.3f}  "
            f"<= {row.target_ratio} {verdict}"
        )
    lines.append(
        "per request, median of rounds (best ratio: fastest round of each); the 5 % target "
        "applies to loopback (asgi has no network, so the transport's fixed cost shows fully)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per client (default 15)")
    parser.add_argument("--requests", type=int, default=None, help="requests per round")
    parser.add_argument(
        "--setup", action="append", choices=["asgi", "loopback"], help="repeatable; default both"
    )
    parser.add_argument("--json", nargs="?", const="-", default=None, help="JSON to stdout or PATH")
    parser.add_argument("--strict", action="store_true", help="exit 1 if loopback misses 5 %%")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    args.setup = args.setup or ["asgi", "loopback"]
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.requests = args.requests or (200 if args.quick else 1000)
    rows = anyio.run(run, args, backend="asyncio")
    report = {
        "rows": [asdict(row) for row in rows],
        "python": platform.python_version(),
        "httpx": version("httpx"),
        "uvicorn": version("uvicorn"),
        "cpus": os.cpu_count(),
    }
    text = table(rows)
    if args.json is None:
        print(text)
    else:
        print(text, file=sys.stderr)
        payload = json.dumps(report, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as out:
                out.write(payload + "\n")
    missed = [row for row in rows if row.setup == "loopback" and not row.meets_target]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
