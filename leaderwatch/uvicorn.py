"""Run an ASGI app under uvicorn with a :class:`~leaderwatch.node.LeaderNode`.

``pip install 'leaderwatch[http]'``. uvicorn drains HTTP connections *before*
the application's lifespan ends, so a node that resigns in its lifespan hands
over only after that drain (about 200 ms, or much longer with slow clients).
:func:`serve` starts the hand-over at the signal instead::

    leaderwatch.uvicorn.serve(app, node=node, host="127.0.0.1", port=8001)

uvicorn runs only on asyncio, so this module reads the running asyncio loop
to forward the signal from its handler into the loop.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType
from typing import Any, Final

try:
    import uvicorn
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "leaderwatch.uvicorn needs uvicorn, which is not installed; "
        "install it with: pip install 'leaderwatch[http]'"
    ) from error

import anyio
from anyio.abc import TaskStatus

from leaderwatch._log import get_logger
from leaderwatch.asgi import ASGIApp
from leaderwatch.errors import LeaderwatchError
from leaderwatch.node import LeaderNode

__all__ = ["EVENT_NAMES", "UnsupportedServerOption", "serve", "serve_async"]

_log = get_logger("leaderwatch.uvicorn")

EVENT_NAMES: Final = ("leader_server_signal", "leader_server_node_failed")
"""Every log event this module emits (stable names)."""


class UnsupportedServerOption(LeaderwatchError, ValueError):
    """A uvicorn option that cannot work with one :class:`LeaderNode` per process."""


def serve(app: ASGIApp | str, *, node: LeaderNode, **uvicorn_options: Any) -> None:
    """Run ``app`` under uvicorn with ``node``; blocks until the server stopped.

    ``uvicorn_options`` are :class:`uvicorn.Config` arguments (``host``,
    ``port``, ``loop``, ``log_config``, ...). Guarantees:

    - The node is entered before the server accepts connections and left
      after the server stopped (an app using ``lifespan=node.lifespan``
      finds it running and leaves it alone).
    - At the first SIGTERM or SIGINT, :meth:`LeaderNode.step_down` starts
      at once (the gate closes, admitted requests drain, leader-only jobs
      stop, the driver resigns) while the server keeps answering with
      redirects; only then does uvicorn's own shutdown begin. A second
      signal goes to uvicorn (SIGINT twice forces exit). After a
      signal-initiated stop this returns normally.
    - If the node fails (driver or leadership task) the failure is logged,
      the server shuts down, and this raises the error, so a process whose
      main lets it propagate exits non-zero instead of answering 503
      forever.
    - If uvicorn cannot start (the port is in use, ...), it logs why, the
      node is left, and this raises uvicorn's ``SystemExit`` as itself: the
      process exits with uvicorn's status and one-line error, no traceback.

    Raises :class:`UnsupportedServerOption` for ``reload`` or ``workers``
    other than 1 (each process needs its own node: run one ``serve`` per
    process).
    """
    _LeaderServer(_config(app, uvicorn_options), node).run()


async def serve_async(app: ASGIApp | str, *, node: LeaderNode, **uvicorn_options: Any) -> None:
    """:func:`serve` on the running asyncio event loop (signals need the main thread)."""
    await _LeaderServer(_config(app, uvicorn_options), node).serve()


def _config(app: ASGIApp | str, options: dict[str, Any]) -> uvicorn.Config:
    if options.get("reload"):
        raise UnsupportedServerOption(
            "serve() cannot reload: the reloader runs the app in child processes, each needing "
            "its own LeaderNode; drop reload=True (or use the uvicorn CLI with node.lifespan)"
        )
    workers = options.get("workers")
    if workers not in (None, 1):
        raise UnsupportedServerOption(
            f"serve() runs one server process (got workers={workers!r}); every process needs "
            "its own LeaderNode and election candidacy: start one serve() per process"
        )
    return uvicorn.Config(app, **options)


class _LeaderServer(uvicorn.Server):
    """A uvicorn server that owns a node and starts its hand-over at the first signal."""

    def __init__(self, config: uvicorn.Config, node: LeaderNode) -> None:
        if not isinstance(node, LeaderNode):
            raise TypeError(f"node must be a LeaderNode (got {type(node).__name__})")
        super().__init__(config)
        self._node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hand_over: anyio.Event | None = None
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop, hand_over = self._loop, self._hand_over
        if self._signalled or loop is None or hand_over is None:
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # A signal handler interrupts the loop between two bytecodes: schedule, do not act.
        loop.call_soon_threadsafe(self._on_signal, sig, hand_over)

    def _on_signal(self, sig: int, hand_over: anyio.Event) -> None:
        _log.info("leader_server_signal", signal=signal.Signals(sig).name)
        hand_over.set()

    async def _step_down_on_signal(
        self,
        hand_over: anyio.Event,
        *,
        task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await hand_over.wait()
            try:
                await self._node.step_down()
            finally:
                self.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        node = self._node
        started = anyio.Event()
        server_done = anyio.Event()
        failure: list[BaseException] = []
        server_exit: list[SystemExit] = []

        async def run_node() -> None:
            try:
                async with node:
                    started.set()
                    await server_done.wait()
            except Exception as error:
                failure.append(error)
                _log.error("leader_server_node_failed", error=repr(error))
                self.should_exit = True
            finally:
                started.set()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_node)
            await started.wait()
            if failure:
                server_done.set()
            else:
                hand_over = anyio.Event()
                signals = await task_group.start(self._step_down_on_signal, hand_over)
                self._loop = asyncio.get_running_loop()
                self._hand_over = hand_over
                try:
                    await super().serve(sockets)
                except SystemExit as stop:
                    # uvicorn exits like this when it cannot start (a port in use, ...);
                    # raised below as itself, not wrapped in the task group's error group.
                    server_exit.append(stop)
                finally:
                    self._hand_over = None
                    signals.cancel()
                    server_done.set()
        if failure:
            raise failure[0]
        if server_exit:
            raise server_exit[0]
