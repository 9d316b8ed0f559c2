"""Node processes of the gRPC test service (tests/grpc_node_server.py), for tests and benchmarks.

Usage::

    cluster = Cluster(tmp_path, 3)        # three nodes sharing one election directory
    cluster.node(endpoint).kill(SIGKILL)  # or SIGTERM: a graceful hand-over
    cluster.served()                      # every event the nodes wrote, as dicts
    cluster.stop()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVER = Path(__file__).resolve().parent / "grpc_node_server.py"
STARTUP_S = 30.0


class NodeFailed(AssertionError):
    """A node process did not start in time, or exited."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NodeServer:
    """One node process; ``ready`` is set when it printed its ready line."""

    def __init__(
        self, directory: Path, events: Path | None, *extra: str, port: int | None = None
    ) -> None:
        self.port = free_port() if port is None else port
        self.endpoint = f"127.0.0.1:{self.port}"
        self.stderr = directory.parent / f"node-{self.port}.stderr"
        argv = [
            sys.executable,
            str(SERVER),
            "--directory",
            str(directory),
            "--port",
            str(self.port),
            *(() if events is None else ("--events", str(events))),
            *extra,
        ]
        with self.stderr.open("wb") as stderr:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if json.loads(line).get("ready") == self.endpoint:
                self.ready.set()

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise NodeFailed(
                    f"node {self.endpoint} did not start (exit {self.process.poll()}):\n"
                    + self.stderr.read_text()[-3000:]
                )

    def kill(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        self.kill(signal.SIGKILL)
        self.process.wait(10)


class Cluster:
    """``size`` nodes electing through one directory under ``base``; started and ready."""

    def __init__(
        self, base: Path, size: int, extra: Sequence[str] = (), *, events: bool = True
    ) -> None:
        self.directory = base / "election"
        self.directory.mkdir(parents=True)
        self.events: Path | None = base / "events.jsonl" if events else None
        self.extra = tuple(extra)
        self.nodes = [NodeServer(self.directory, self.events, *extra) for _ in range(size)]
        deadline = time.monotonic() + STARTUP_S
        for node in self.nodes:
            node.wait_ready(deadline)

    def restart(self, endpoint: str) -> NodeServer:
        """Start a new process for the node at ``endpoint`` (after it exited), same port."""
        old = self.node(endpoint)
        old.process.wait(15)
        new = NodeServer(self.directory, self.events, *self.extra, port=old.port)
        self.nodes[self.nodes.index(old)] = new
        new.wait_ready(time.monotonic() + STARTUP_S)
        return new

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def endpoints(self) -> list[str]:
        return [node.endpoint for node in self.nodes]

    def node(self, endpoint: str) -> NodeServer:
        return next(node for node in self.nodes if node.endpoint == endpoint)

    def served(self) -> list[dict[str, Any]]:
        """Every event the nodes wrote so far."""
        if self.events is None or not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]
