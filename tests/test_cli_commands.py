"""``leaderwatch observe``, ``campaign`` and ``status``, run as a user runs them: as processes.

Signals are real (SIGINT is Ctrl-C), every wait has a deadline, and every
process started here is reaped before its test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from etcd_server import EtcdServer, etcd_server, free_port
from nodes import (
    NodeProcess,
    NodeSet,
    assert_epochs_never_decrease,
    assert_one_leader_per_epoch,
)

from leaderwatch.drivers.local import EPOCH_FILE, LOCK_FILE, RECORD_FILE
from leaderwatch.state import Follower, Leader, LeaderState, Unknown, leader_state_from_json

LEADERWATCH = (sys.executable, "-m", "leaderwatch")
STARTUP = 20.0
HANDOVER = 10.0
REPORT_KEYS = {"node", "pid", "t", "wall", "state"}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEADERWATCH, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, *fragments: str
) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def state_of(line: str) -> LeaderState:
    report = json.loads(line)
    assert set(report) == REPORT_KEYS
    return leader_state_from_json(json.dumps(report["state"]))


def text_lines(node: NodeProcess) -> list[str]:
    """The lines of a node run with ``--format text`` (not JSON, so kept as "bad lines")."""
    return [line.rstrip("\n") for line in node.bad_lines]


@pytest.fixture
def cluster() -> Iterator[NodeSet]:
    with NodeSet(LEADERWATCH) as nodes:
        yield nodes
        assert_epochs_never_decrease(nodes.nodes)
        assert_one_leader_per_epoch(nodes.nodes)
    assert all(node.process.returncode is not None for node in nodes.nodes)


def campaign(cluster: NodeSet, url: str, port: int, *extra: str) -> NodeProcess:
    return cluster.spawn(
        "campaign",
        url,
        "--endpoint",
        f"127.0.0.1:{port}",
        "--format",
        "json",
        *extra,
        name=f"node-{port}",
    )


def only_election_files(directory: Path) -> None:
    assert {path.name for path in directory.iterdir()} <= {LOCK_FILE, RECORD_FILE, EPOCH_FILE}


# --- observe --once ------------------------------------------------------------------------


def test_observe_once_without_a_leader_exits_3(tmp_path: Path) -> None:
    url = f"local://{tmp_path}"
    text = run_cli("observe", url, "--once")
    assert (text.returncode, text.stdout, text.stderr) == (3, "no leader known\n", "")
    as_json = run_cli("observe", "--local", str(tmp_path), "--once", "--format", "json")
    assert as_json.returncode == 3, as_json.stderr
    assert state_of(as_json.stdout) == Unknown()
    # An observer never takes the lock, so no epoch was ever used.
    assert not (tmp_path / EPOCH_FILE).exists()
    only_election_files(tmp_path)


def test_observe_once_with_a_leader_exits_0(tmp_path: Path, cluster: NodeSet) -> None:
    url = f"local://{tmp_path}?poll_interval=0.02"
    leader = campaign(cluster, url, 7001)
    state = leader.wait_for_state(lambda s: isinstance(s, Leader), timeout=STARTUP)
    assert state == Leader(epoch=1)
    result = run_cli("observe", url, "--once", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert state_of(result.stdout) == Follower(leader_endpoint="127.0.0.1:7001", leader_epoch=1)
    text = run_cli("observe", "--local", str(tmp_path), "--once")
    assert (text.returncode, text.stdout) == (0, "leader 127.0.0.1:7001 at epoch 1\n")
    os.kill(leader.pid, signal.SIGINT)
    assert leader.wait_exit(HANDOVER) == 0
    only_election_files(tmp_path)


# --- campaign ------------------------------------------------------------------------------


def test_sigint_makes_the_leader_resign_and_the_other_take_over(
    tmp_path: Path, cluster: NodeSet
) -> None:
    url = f"local://{tmp_path}?poll_interval=0.02"
    first = campaign(cluster, url, 7001)
    second = campaign(cluster, url, 7002, "--node-id", "second")
    leader = cluster.wait_stable(timeout=STARTUP)
    other = second if leader is first else first
    state = leader.state
    assert isinstance(state, Leader)
    for line in first.lines + second.lines:
        assert set(line) == REPORT_KEYS
    assert {line["pid"] for line in leader.lines} == {leader.pid}
    assert {line["node"] for line in second.lines} == {"second"}

    os.kill(leader.pid, signal.SIGINT)
    assert leader.wait_exit(HANDOVER) == 0
    assert leader.state == Unknown()
    assert "Traceback" not in "".join(leader.stderr_lines)
    other.wait_for_state(
        lambda s: isinstance(s, Leader) and s.epoch > state.epoch, timeout=HANDOVER
    )
    os.kill(other.pid, signal.SIGTERM)
    assert other.wait_exit(HANDOVER) == 0
    assert other.state == Unknown()
    only_election_files(tmp_path)


def test_observe_follows_each_transition_and_never_leads(tmp_path: Path, cluster: NodeSet) -> None:
    url = f"local://{tmp_path}?poll_interval=0.02"
    observer = cluster.spawn("observe", url, "--format", "json", name="observer")
    watcher = cluster.spawn("observe", url, name="text-observer")

    def both_see(state: LeaderState, text: str) -> None:
        observer.wait_for_state(lambda s: s == state, timeout=STARTUP)
        watcher.wait_for(
            lambda n: bool(text_lines(n)) and text_lines(n)[-1].endswith(f"  {text}"),
            timeout=STARTUP,
        )

    both_see(Unknown(), "no leader known")
    first = cluster.spawn("campaign", url, "--endpoint", "127.0.0.1:7001", name="first")
    both_see(
        Follower(leader_endpoint="127.0.0.1:7001", leader_epoch=1),
        "leader 127.0.0.1:7001 at epoch 1",
    )
    first.wait_for(
        lambda n: [line.split("  ", 1)[1] for line in text_lines(n)] == ["leading at epoch 1"],
        timeout=STARTUP,
    )

    os.kill(first.pid, signal.SIGTERM)
    assert first.wait_exit(HANDOVER) == 0
    assert text_lines(first)[-1].endswith("  resigned; left the election")
    both_see(Unknown(), "no leader known")

    second = campaign(cluster, url, 7002)
    both_see(
        Follower(leader_endpoint="127.0.0.1:7002", leader_epoch=2),
        "leader 127.0.0.1:7002 at epoch 2",
    )
    for node in (observer, watcher):
        os.kill(node.pid, signal.SIGINT)
        assert node.wait_exit(HANDOVER) == 0
    # Leaving prints nothing more: the observer's last word is still the live leader.
    assert observer.state == Follower(leader_endpoint="127.0.0.1:7002", leader_epoch=2)
    assert not any(isinstance(state, Leader) for state in observer.states)
    assert [line.split("  ", 1)[1] for line in text_lines(watcher)] == [
        "no leader known",
        "leader 127.0.0.1:7001 at epoch 1",
        "no leader known",
        "leader 127.0.0.1:7002 at epoch 2",
    ]
    os.kill(second.pid, signal.SIGINT)
    assert second.wait_exit(HANDOVER) == 0


# --- etcd ----------------------------------------------------------------------------------


def test_etcd_url_observe_and_campaign(etcd: EtcdServer, cluster: NodeSet) -> None:
    election = f"cli/{uuid.uuid4().hex[:10]}"
    url = f"etcd://{etcd.endpoint}/{election}?ttl=2"
    empty = run_cli("observe", url, "--once")
    assert (empty.returncode, empty.stdout) == (3, "no leader known\n"), empty.stderr

    node = cluster.spawn(
        "campaign",
        "--etcd",
        etcd.endpoint,
        "--election",
        election,
        "--ttl",
        "2",
        "--endpoint",
        "127.0.0.1:7301",
        "--format",
        "json",
        name="etcd-node",
    )
    state = node.wait_for_state(lambda s: isinstance(s, Leader), timeout=STARTUP)
    assert isinstance(state, Leader)
    keys = etcd.keys(election + "/")
    assert [(key.value, key.create_revision) for key in keys] == [("127.0.0.1:7301", state.epoch)]
    expected = Follower(leader_endpoint="127.0.0.1:7301", leader_epoch=state.epoch)
    once = run_cli("observe", url, "--once", "--format", "json")
    assert once.returncode == 0, once.stderr
    assert state_of(once.stdout) == expected

    observer = cluster.spawn("observe", url, "--format", "json", name="etcd-observer")
    observer.wait_for_state(lambda s: s == expected, timeout=STARTUP)
    os.kill(node.pid, signal.SIGINT)
    assert node.wait_exit(HANDOVER) == 0
    assert node.state == Unknown()
    # Resigning deleted the key at once; the observer saw the election empty.
    assert etcd.keys(election + "/") == []
    observer.wait_for_state(lambda s: s == Unknown(), timeout=HANDOVER)
    os.kill(observer.pid, signal.SIGTERM)
    assert observer.wait_exit(HANDOVER) == 0
    assert run_cli("observe", url, "--once").returncode == 3


def test_etcd_url_with_credentials_against_an_etcd_with_authentication(cluster: NodeSet) -> None:
    with etcd_server() as secured:
        secured.etcdctl("user", "add", "root", "--new-user-password=s3cret")
        secured.etcdctl("auth", "enable")
        election = f"cli-auth-{uuid.uuid4().hex[:8]}"
        url = f"etcd://root:s3cret@{secured.endpoint}/{election}?ttl=2"
        node = cluster.spawn(
            "campaign", url, "--endpoint", "127.0.0.1:7302", "--format", "json", name="auth-node"
        )
        state = node.wait_for_state(lambda s: isinstance(s, Leader), timeout=STARTUP)
        assert isinstance(state, Leader)
        once = run_cli("observe", url, "--once", "--format", "json")
        assert once.returncode == 0, once.stderr
        assert state_of(once.stdout) == Follower(
            leader_endpoint="127.0.0.1:7302", leader_epoch=state.epoch
        )
        wrong = run_cli("observe", f"etcd://root:nope@{secured.endpoint}/{election}", "--once")
        line = assert_one_line_error(wrong, 1, "leaderwatch observe: error:", secured.endpoint)
        assert "nope" not in line  # the password is never shown
        anonymous = run_cli("observe", f"etcd://{secured.endpoint}/{election}", "--once")
        assert_one_line_error(anonymous, 1, "leaderwatch observe: error:", secured.endpoint)
        os.kill(node.pid, signal.SIGINT)
        assert node.wait_exit(HANDOVER) == 0


@pytest.mark.parametrize("command", ["observe", "campaign"])
def test_unreachable_etcd_is_a_one_line_error(command: str) -> None:
    port = free_port()
    args = [command, f"etcd://127.0.0.1:{port}/myapp?connect_timeout=0.5"]
    if command == "campaign":
        args += ["--endpoint", "127.0.0.1:7001"]
    result = run_cli(*args)
    assert_one_line_error(result, 1, f"leaderwatch {command}: error:", f"127.0.0.1:{port}")


# --- usage errors --------------------------------------------------------------------------

NOWHERE = "/nonexistent-leaderwatch-cli-test/election"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["observe", "zookeeper://h:2181/x"], ["scheme: 'zookeeper' is unknown", "etcd://"]),
        (["observe", "etcd://h1:99999/x", "--once"], ["etcd endpoint 'h1:99999'", "1-65535"]),
        (["observe", "local://var/x"], ["names no host", "local:///var/x"]),
        (["observe", "etcd://h1:2379/x?tll=2"], ["'tll': unknown; allowed: ttl"]),
        (["observe", "postgres://db/prod"], ["?election=NAME"]),
        (
            ["campaign", f"local://{NOWHERE}", "--endpoint", "http://127.0.0.1:7001"],
            ["Invalid value for '--endpoint'", "must not carry a scheme", "use '127.0.0.1:7001'"],
        ),
        (
            ["campaign", f"local://{NOWHERE}", "--endpoint", "127.0.0.1"],
            ["'--endpoint'", "missing its port"],
        ),
        (["campaign", f"local://{NOWHERE}"], ["Missing option '--endpoint'"]),
        (
            ["observe", "--frobnicate"],
            ["No such option", "--frobnicate", "leaderwatch observe --help"],
        ),
        (["observe"], ["name the election", "--local DIR"]),
        (["observe", f"local://{NOWHERE}", "--local", NOWHERE], ["name the election once"]),
        (["observe", "--etcd", "h1:2379"], ["--etcd needs --election NAME"]),
        (["observe", "--etcd", "h1:http", "--election", "x"], ["'--etcd'", "port must be"]),
        (["observe", f"local://{NOWHERE}", "--ttl", "3"], ["--ttl goes with", "?ttl=10"]),
        (["observe", "--local", NOWHERE, "--ttl", "3"], ["--ttl does not apply to --local"]),
        (["observe", "--etcd", "h1:2379", "--election", "x", "--ttl", "0"], ["'--ttl'", "0"]),
        (["observe", "--etcd", "h1:2379", "--election", "x", "--user", "u"], ["--password"]),
        (["observe", "--postgres", "host=db", "--election", "x"], ["takes a URL DSN"]),
        (["observe", "--local", NOWHERE, "--format", "xml"], ["'--format'", "xml"]),
        (["status"], ["Missing argument 'URL...'"]),
        (["status", "ftp://h/x"], ["must use http:// or https://"]),
        (["--log-level", "loud", "status", "h:1"], ["'--log-level'", "loud"]),
        (["frobnicate"], ["No such command 'frobnicate'"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], fragments: list[str]) -> None:
    result = run_cli(*args)
    assert_one_line_error(result, 2, "error:", *fragments)
    assert not Path(NOWHERE).parent.exists()


def test_an_unusable_directory_is_a_one_line_failure() -> None:
    result = run_cli("observe", "local:///proc/leaderwatch-election", "--once")
    assert_one_line_error(result, 1, "/proc/leaderwatch-election", "is not usable")


def test_no_command_shows_the_commands() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "Usage: leaderwatch" in result.stderr
    for command in ("campaign", "demo", "observe", "status"):
        assert command in result.stderr


# --- help, version, logs -------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["demo"], ["observe"], ["campaign"], ["status"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: leaderwatch {' '.join(command)}".rstrip())
    assert "--log-level" in result.stdout


def test_version() -> None:
    from importlib.metadata import version

    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"leaderwatch {version('leaderwatch')}\n")


def test_logs_go_to_stderr_as_json_data_to_stdout(tmp_path: Path, cluster: NodeSet) -> None:
    url = f"local://{tmp_path}"
    node = cluster.spawn(
        "--log-format",
        "json",
        "campaign",
        url,
        "--endpoint",
        "127.0.0.1:7001",
        "--format",
        "json",
        "--log-level",
        "info",
        name="logging",
    )
    node.wait_for_state(lambda s: isinstance(s, Leader), timeout=STARTUP)
    os.kill(node.pid, signal.SIGINT)
    assert node.wait_exit(HANDOVER) == 0
    assert node.bad_lines == []
    events = [json.loads(line) for line in node.stderr_lines]
    names = [event["event"] for event in events]
    assert "local_election_won" in names
    assert {"event": "cli_stopping", "signal": "SIGINT"}.items() <= events[
        names.index("cli_stopping")
    ].items()
    assert names.index("local_election_won") < names.index("local_election_resigned")


def test_console_logs_accept_the_options_after_the_command(tmp_path: Path) -> None:
    result = run_cli("observe", f"local://{tmp_path}", "--once", "--log-level", "debug")
    assert result.returncode == 3
    assert result.stdout == "no leader known\n"
    quiet = run_cli("--log-level", "error", "demo")
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    verbose = run_cli("demo", "-v")
    assert verbose.returncode == 0, verbose.stderr
    line = next(line for line in verbose.stderr.splitlines() if "local_election_won" in line)
    assert "[info" in line
    assert "[leaderwatch.drivers.local]" in line
    assert "epoch=1" in line
    assert not any(line.lstrip().startswith("{") for line in verbose.stdout.splitlines())


# --- status --------------------------------------------------------------------------------

LEADER_REPLY = {
    "state": {"kind": "leader", "epoch": 5},
    "gate": {"kind": "serving", "epoch": 5},
    "epoch": 5,
    "leader_endpoint": "127.0.0.1:7001",
    "node_endpoint": "127.0.0.1:7001",
}
FOLLOWER_REPLY = {
    "state": {"kind": "follower", "leader_endpoint": "127.0.0.1:7001", "leader_epoch": 5},
    "gate": {"kind": "not_serving", "leader_endpoint": "127.0.0.1:7001", "leader_epoch": 5},
    "epoch": 5,
    "leader_endpoint": "127.0.0.1:7001",
    "node_endpoint": "127.0.0.1:7002",
    "uptime_seconds": 12,
}
# An older or smaller reply: only the state, no gate and no top-level fields.
TERSE_REPLY = {
    "state": {"kind": "follower", "leader_endpoint": "127.0.0.1:7001", "leader_epoch": 5}
}
LONELY_REPLY = {
    "state": {"kind": "unknown"},
    "gate": {"kind": "not_serving", "leader_endpoint": None, "leader_epoch": None},
    "epoch": None,
    "leader_endpoint": None,
    "node_endpoint": "127.0.0.1:7003",
}
REPLIES: dict[str, Any] = {
    "/leader/status": LEADER_REPLY,
    "/follower/status": FOLLOWER_REPLY,
    "/terse/status": TERSE_REPLY,
    "/lonely/status": LONELY_REPLY,
    "/html/status": b"<html>hello</html>",
    "/typo/status": {"epoch": "five"},
}


class _StatusHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        reply = REPLIES.get(self.path)
        if reply is None:
            self.send_error(404)
            return
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def services() -> Iterator[str]:
    """A tiny HTTP server answering like ``leader_status_app`` under several prefixes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert not thread.is_alive()


def test_status_prints_a_table_and_marks_unreachable_services(services: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = run_cli(
        "status",
        f"{services}/leader",
        f"{services}/follower/",
        f"{services}/terse/status",
        f"{services}/missing",
        dead,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows == [
        ["NODE", "ROLE", "EPOCH", "GATE", "LEADER"],
        ["127.0.0.1:7001", "leader", "5", "serving", "127.0.0.1:7001"],
        ["127.0.0.1:7002", "follower", "5", "not", "serving", "127.0.0.1:7001"],
        [f"{services}/terse", "follower", "5", "-", "127.0.0.1:7001"],
        [f"{services}/missing", "unreachable", "-", "-", "-"],
        [f"http://{dead}", "unreachable", "-", "-", "-"],
    ]
    problems = result.stderr.splitlines()
    assert len(problems) == 2
    assert f"{services}/missing/status: HTTP 404" in problems[0]
    assert f"http://{dead}/status: connection refused" in problems[1]


def test_status_json_and_exit_codes(services: str) -> None:
    result = run_cli(
        "status", "--format", "json", f"{services}/leader", f"{services}/html", f"{services}/typo"
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["services"]
    assert found[0] == {
        "url": f"{services}/leader/status",
        "reachable": True,
        "node": "127.0.0.1:7001",
        "role": "leader",
        "epoch": 5,
        "gate": "serving",
        "leader": "127.0.0.1:7001",
        "error": None,
    }
    assert [service["reachable"] for service in found] == [True, False, False]
    assert "not a leaderwatch status reply (not JSON)" in found[1]["error"]
    assert "epoch" in found[2]["error"]

    lonely = run_cli("status", f"{services}/lonely")
    assert lonely.returncode == 3, lonely.stderr
    assert lonely.stdout.splitlines()[1].split() == [
        "127.0.0.1:7003",
        "unknown",
        "-",
        "not",
        "serving",
        "-",
    ]
    nobody = run_cli("status", "--timeout", "1", f"127.0.0.1:{free_port()}", f"{services}/nope")
    assert nobody.returncode == 1
    assert len(nobody.stderr.splitlines()) == 2
