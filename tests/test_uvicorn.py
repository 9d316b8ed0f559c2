"""Real uvicorn servers on loopback, elected through a shared directory (tests/http_node_app.py).

Every server is a subprocess on a free loopback port, killed by the fixture
whatever happens. Waits poll with deadlines.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.config import STARTUP_FAILURE

from leaderwatch import LeaderNode, StaticDriver
from leaderwatch.uvicorn import UnsupportedServerOption, serve

APP = Path(__file__).with_name("http_node_app.py")
ROOT = APP.parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """One node of the test app, as a subprocess; its output goes to a log file."""

    def __init__(self, directory: Path, events: Path, log: Path, *, cli: bool, **env: str) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = log
        environment = {
            **os.environ,
            "LW_DIR": str(directory),
            "LW_PORT": str(self.port),
            "LW_EVENTS": str(events),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        if cli:
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(APP.parent),
                "http_node_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
        else:
            argv = [sys.executable, str(APP)]
        self._log = log.open("w")
        self.process = subprocess.Popen(
            argv,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def url(self, path: str) -> str:
        return f"http://{self.endpoint}{path}"

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                pytest.fail(f"{self.endpoint} exited early ({code}):\n{self.output()}")
            try:
                if httpx.get(self.url("/healthz"), timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        pytest.fail(f"{self.endpoint} did not start within {timeout} s:\n{self.output()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.endpoint} did not exit within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers sharing one election directory and one events file; kill them all after."""
    started: list[Server] = []
    directory = tmp_path / "election"

    def start(*, cli: bool = False, **env: str) -> Server:
        index = len(started)
        server = Server(
            directory, tmp_path / "events.jsonl", tmp_path / f"node{index}.log", cli=cli, **env
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def poll(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def status(server: Server, path: str = "/leaderwatch/status") -> httpx.Response:
    return httpx.get(server.url(path), timeout=2)


def is_leader(server: Server) -> bool:
    try:
        return status(server, "/leaderwatch/leader").status_code == 200
    except httpx.TransportError:
        return False


def serves(server: Server) -> bool:
    try:
        return httpx.get(server.url("/whoami"), timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def leader_and_follower(cluster: Callable[..., Server]) -> tuple[Server, Server]:
    first = cluster()
    first.wait_ready()
    poll(lambda: is_leader(first), 20, "the first node to lead")
    second = cluster()
    second.wait_ready()
    poll(
        lambda: status(second).json()["leader_endpoint"] == first.endpoint,
        20,
        "the second node to follow the first",
    )
    return first, second


def test_follower_redirects_to_the_leader_and_sigterm_hands_over_fast(
    cluster: Callable[..., Server], tmp_path: Path
) -> None:
    leader, follower = leader_and_follower(cluster)
    target = "/echo/a%2Fb/caf%C3%A9?q=1&x=a%20b&q=2"
    with httpx.Client(follow_redirects=False, timeout=5) as http:
        redirect = http.post(follower.url(target), content=b"payload")
        assert redirect.status_code == 307
        assert redirect.headers["location"] == leader.url(target)
        assert redirect.headers["leader-endpoint"] == leader.endpoint
        epoch = int(redirect.headers["leader-epoch"])
        # The client repeats the request where it was sent: same method, body, path, query.
        served = http.post(redirect.headers["location"], content=b"payload")
    assert served.status_code == 200
    assert served.json() == {
        "endpoint": leader.endpoint,
        "epoch": epoch,
        "method": "POST",
        "raw_path": "/echo/a%2Fb/caf%C3%A9",
        "query": "q=1&x=a%20b&q=2",
        "body": "payload",
    }
    assert served.headers["leader-epoch"] == str(epoch)

    signalled = time.monotonic()
    leader.process.send_signal(signal.SIGTERM)
    poll(lambda: serves(follower), 10, "the successor to serve", interval=0.002)
    handed_over = time.monotonic() - signalled
    assert leader.wait_exit() == 0
    assert "leader_server_signal" in leader.output()
    # Generous bound for a loaded CI machine; typically tens of milliseconds.
    assert handed_over < 2.0, f"graceful hand-over took {handed_over:.3f} s"
    new_epoch = status(follower).json()["epoch"]
    assert new_epoch > epoch


def test_sigterm_lets_admitted_work_finish_on_the_old_leader_and_never_overlaps(
    cluster: Callable[..., Server], tmp_path: Path
) -> None:
    leader, follower = leader_and_follower(cluster)
    slow: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: slow.append(httpx.get(leader.url("/slow?ms=1500"), timeout=10)),
        daemon=True,
    )
    request.start()
    poll(
        lambda: any(event["kind"] == "admitted" for event in events(tmp_path)),
        10,
        "the slow request to be admitted",
    )
    leader.process.send_signal(signal.SIGTERM)
    # Once the signal is handled, the old leader refuses new work while it drains.
    poll(lambda: status(leader).json()["gate"] == "not_serving", 10, "the gate to close")
    refused = httpx.get(leader.url("/whoami"), timeout=5)
    assert refused.status_code in (503, 307)
    assert slow == []  # the admitted request is still running
    poll(lambda: serves(follower), 15, "the successor to serve", interval=0.002)
    request.join(10)
    assert slow
    assert slow[0].status_code == 200
    assert slow[0].json()["endpoint"] == leader.endpoint
    assert leader.wait_exit() == 0

    log = events(tmp_path)
    done = [event for event in log if event["kind"] == "request"]
    old = [event for event in done if event["node"] == leader.endpoint]
    new = [event for event in done if event["node"] == follower.endpoint]
    assert any(event["path"] == "/slow" for event in old)
    assert new, "the successor served nothing"
    # No request served by the old leader ends after the successor's first one started.
    assert max(event["t1"] for event in old) <= min(event["t0"] for event in new)
    assert {event["epoch"] for event in old}.isdisjoint({event["epoch"] for event in new})
    # Leader-only jobs: one node per term, the old one stopped before the new one started.
    starts = [event for event in log if event["kind"] == "job_start"]
    stops = [event for event in log if event["kind"] == "job_stop"]
    by_epoch: dict[int, set[str]] = {}
    for event in starts:
        by_epoch.setdefault(event["epoch"], set()).add(event["node"])
    assert all(len(nodes) == 1 for nodes in by_epoch.values()), by_epoch
    old_stop = [event["t"] for event in stops if event["node"] == leader.endpoint]
    new_start = [event["t"] for event in starts if event["node"] == follower.endpoint]
    assert old_stop
    assert new_start
    assert max(old_stop) <= min(new_start)
    # The drain held the hand-over: the successor started after the slow request ended.
    slow_end = next(event["t1"] for event in old if event["path"] == "/slow")
    assert min(new_start) >= slow_end


def test_a_driver_failure_after_start_up_makes_the_served_process_exit_non_zero(
    cluster: Callable[..., Server],
) -> None:
    server = cluster(LW_FAIL_AFTER="1.0")
    server.wait_ready()
    code = server.wait_exit()
    output = server.output()
    assert code != 0, output
    assert "leader_node_failed" in output
    assert "injected driver failure" in output


def test_under_the_uvicorn_cli_a_driver_failure_also_ends_the_process(
    cluster: Callable[..., Server],
) -> None:
    server = cluster(cli=True, LW_FAIL_AFTER="1.0")
    server.wait_ready()
    code = server.wait_exit()
    output = server.output()
    assert code != 0, output
    assert "leader_node_terminating_process" in output
    assert "injected driver failure" in output


def test_a_port_in_use_is_uvicorns_one_error_line_and_exit_status(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(APP)],
            env={**os.environ, "LW_DIR": str(tmp_path / "election"), "LW_PORT": str(port)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == STARTUP_FAILURE, output
    assert "address already in use" in output
    assert "Traceback" not in output, output
    assert "ExceptionGroup" not in output, output


def test_serve_refuses_options_that_start_other_processes() -> None:
    node = LeaderNode(StaticDriver())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(UnsupportedServerOption, match="reload"):
        serve(app, node=node, reload=True)
    with pytest.raises(UnsupportedServerOption, match="workers=2"):
        serve(app, node=node, workers=2)


def test_importing_without_uvicorn_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['uvicorn'] = None\n"
        "try:\n"
        "    import leaderwatch.uvicorn\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('imported without uvicorn')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'leaderwatch[http]'" in result.stdout
