"""A small leader-only HTTP service for the real-server tests, configured by environment.

Run it with leaderwatch's runner (hand-over starts at the signal)::

    LW_DIR=/tmp/election LW_PORT=8001 python tests/http_node_app.py

or under the plain uvicorn CLI (the node runs in the app's lifespan)::

    LW_DIR=/tmp/e LW_PORT=8001 python -m uvicorn --app-dir tests http_node_app:app --port 8001

Environment: ``LW_DIR`` election directory (required), ``LW_PORT`` (required),
``LW_HOST`` (127.0.0.1), ``LW_POLL`` driver poll interval (0.01 s),
``LW_DRAIN`` drain timeout (5 s), ``LW_EVENTS`` a file that gets one JSON line
per admitted request and per leader-job start/stop (``time.monotonic()``
stamps, comparable across processes), ``LW_FAIL_AFTER`` seconds after which
the driver fails (fault injection).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

import leaderwatch.uvicorn
from leaderwatch import LeaderNode, LocalElectionDriver
from leaderwatch.asgi import LeaderRedirectMiddleware, leader_status_app

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")

HOST = os.environ.get("LW_HOST", "127.0.0.1")
PORT = int(os.environ["LW_PORT"])
ENDPOINT = f"{HOST}:{PORT}"
FAIL_AFTER = os.environ.get("LW_FAIL_AFTER")
EVENTS = os.environ.get("LW_EVENTS")
_events_fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if EVENTS else None


def record(kind: str, **fields: Any) -> None:
    """Append one event line (a single write on an O_APPEND file: lines never interleave)."""
    if _events_fd is not None:
        line = json.dumps({"kind": kind, "node": ENDPOINT, **fields}) + "\n"
        os.write(_events_fd, line.encode())


class FailingDriver(LocalElectionDriver):
    """The local election, plus a background task that fails after ``LW_FAIL_AFTER`` seconds."""

    async def _start(self, task_group: TaskGroup) -> None:
        await super()._start(task_group)
        task_group.start_soon(self._fail_later)

    async def _fail_later(self) -> None:
        await anyio.sleep(float(FAIL_AFTER or 0))
        raise RuntimeError("injected driver failure (LW_FAIL_AFTER)")


driver_class = FailingDriver if FAIL_AFTER else LocalElectionDriver
node = LeaderNode(
    driver_class(
        os.environ["LW_DIR"],
        node_endpoint=ENDPOINT,
        poll_interval=float(os.environ.get("LW_POLL", "0.01")),
    ),
    drain_timeout=float(os.environ.get("LW_DRAIN", "5")),
)


async def whoami(request: Request) -> JSONResponse:
    started = time.monotonic()
    epoch = request.state.leader_epoch
    record("request", path="/whoami", epoch=epoch, t0=started, t1=time.monotonic())
    return JSONResponse({"endpoint": ENDPOINT, "epoch": epoch})


async def echo(request: Request) -> JSONResponse:
    started = time.monotonic()
    body = await request.body()
    epoch = request.state.leader_epoch
    record("request", path=request.url.path, epoch=epoch, t0=started, t1=time.monotonic())
    return JSONResponse(
        {
            "endpoint": ENDPOINT,
            "epoch": epoch,
            "method": request.method,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "body": body.decode("latin-1"),
        }
    )


async def slow(request: Request) -> JSONResponse:
    started = time.monotonic()
    epoch = request.state.leader_epoch
    record("admitted", path="/slow", epoch=epoch, t0=started)
    await anyio.sleep(int(request.query_params.get("ms", "500")) / 1000)
    record("request", path="/slow", epoch=epoch, t0=started, t1=time.monotonic())
    return JSONResponse({"endpoint": ENDPOINT, "epoch": epoch})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(node.stats.model_dump(mode="json"))


async def tick(epoch: int) -> None:
    """A leader-only job: records when it starts and stops."""
    record("job_start", epoch=epoch, t=time.monotonic())
    try:
        await anyio.sleep_forever()
    finally:
        record("job_stop", epoch=epoch, t=time.monotonic())


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with node.lifespan(app), anyio.create_task_group() as jobs:
        jobs.start_soon(node.run_as_leader, tick)
        yield
        await node.step_down()


app = Starlette(
    routes=[
        Route("/whoami", whoami),
        Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/slow", slow),
        Route("/healthz", healthz),
        Route("/stats", stats),
        Mount("/leaderwatch", app=leader_status_app(node)),
    ],
    middleware=[
        Middleware(
            LeaderRedirectMiddleware, node=node, exempt=("/healthz", "/stats", "/leaderwatch")
        )
    ],
    lifespan=lifespan,
)


if __name__ == "__main__":
    leaderwatch.uvicorn.serve(app, node=node, host=HOST, port=PORT, log_level="warning")
