"""Node processes of the HTTP test service (tests/http_node_app.py), for tests.

Usage::

    cluster = HttpCluster(tmp_path, 3)      # three uvicorn nodes sharing one election
    leader = cluster.wait_leader()          # the node that serves, once the others follow it
    cluster.node(endpoint).signal(SIGKILL)  # or SIGTERM (graceful), SIGSTOP / SIGCONT
    cluster.events()                        # every event the nodes wrote, as dicts
    cluster.stop()                          # kills whatever still runs

Every node runs ``leaderwatch.uvicorn.serve`` on a free loopback port and
appends one JSON line per admitted request and per leader-job start/stop to
a shared events file, stamped with ``time.monotonic()`` (one clock for all
processes of a Linux host). Waits poll with deadlines and fail with the
node's output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

APP = Path(__file__).resolve().with_name("http_node_app.py")
STARTUP_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def poll(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Wait until ``condition()`` holds (blocking: for set-up outside the event loop), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class TLSFiles:
    """A server certificate for 127.0.0.1 and the client context that trusts it (trustme)."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("127.0.0.1")
        self.cert = directory / "server.pem"
        self.key = directory / "server.key"
        self.server.cert_chain_pems[0].write_to_path(str(self.cert))
        for blob in self.server.cert_chain_pems[1:]:
            blob.write_to_path(str(self.cert), append=True)
        self.server.private_key_pem.write_to_path(str(self.key))

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        return context


class HttpNode:
    """One node process; its output goes to a log file."""

    def __init__(
        self,
        base: Path,
        events: Path,
        env: dict[str, str],
        *,
        tls: TLSFiles | None = None,
        port: int | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.endpoint = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.log_path = base / f"node-{self.port}.log"
        environment = {
            **os.environ,
            "LW_PORT": str(self.port),
            "LW_EVENTS": str(events),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        if tls is not None:
            environment["LW_TLS_CERT"] = str(tls.cert)
            environment["LW_TLS_KEY"] = str(tls.key)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(APP)],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.endpoint}{path}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
        """A plain request straight to this node (no leader-aware transport)."""
        verify: ssl.SSLContext | bool = self.tls.client_context() if self.tls else True
        return httpx.get(self.url(path), timeout=timeout, verify=verify)

    def status(self) -> dict[str, Any] | None:
        try:
            response = self.get("/leaderwatch/status", timeout=1.0)
        except httpx.TransportError:
            return None
        return dict(response.json()) if response.status_code == 200 else None

    def stats(self) -> dict[str, Any]:
        return dict(self.get("/stats").json())

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"node {self.endpoint} exited early ({self.process.returncode}):\n"
                    + self.output()[-3000:]
                )
            try:
                if self.get("/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        pytest.fail(f"node {self.endpoint} did not start in time:\n" + self.output()[-3000:])

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"node {self.endpoint} did not exit in {timeout} s:\n{self.output()[-3000:]}"
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot die otherwise
            self.process.kill()
        self.process.wait(10)


class HttpCluster:
    """``size`` nodes sharing one election (a directory under ``base`` unless ``env`` names
    another with ``LW_DRIVER_URL``), started and answering."""

    def __init__(self, base: Path, size: int, *, tls: TLSFiles | None = None, **env: str) -> None:
        self.base = base
        self.events_path = base / "events.jsonl"
        self.env = {"LW_DIR": str(base / "election"), **env}
        self.tls = tls
        self.nodes = [HttpNode(base, self.events_path, self.env, tls=tls) for _ in range(size)]
        deadline = time.monotonic() + STARTUP_S
        for node in self.nodes:
            node.wait_ready(deadline)

    @property
    def endpoints(self) -> list[str]:
        return [node.endpoint for node in self.nodes]

    def node(self, endpoint: str) -> HttpNode:
        return next(node for node in self.nodes if node.endpoint == endpoint)

    def wait_leader(self, timeout: float = 20.0) -> HttpNode:
        """The node that serves, once every other running node names it as leader."""
        found: list[HttpNode] = []

        def settled() -> bool:
            statuses = {node.endpoint: node.status() for node in self.running()}
            serving = [e for e, s in statuses.items() if s and s["gate"] == "serving"]
            if len(serving) != 1:
                return False
            if not all(s and s["leader_endpoint"] == serving[0] for s in statuses.values()):
                return False
            found[:] = [self.node(serving[0])]
            return True

        poll(settled, timeout, "one node to serve and the others to follow it")
        return found[0]

    def running(self) -> list[HttpNode]:
        return [node for node in self.nodes if node.process.poll() is None]

    def events(self) -> list[dict[str, Any]]:
        """Every event the nodes wrote so far."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
