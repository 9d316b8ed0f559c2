"""``leaderwatch demo``, run as a user runs it: real node processes fail over under traffic.

Every run is a subprocess under a deadline; afterwards no process the demo
started may be alive (checked by pid and by scanning /proc for command lines
naming its directory) and its directory must be gone.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

LEADERWATCH = (sys.executable, "-m", "leaderwatch")
# Well above the few seconds a demo takes, for a loaded 2-core machine.
DEMO_DEADLINE = 90.0
STOP_DEADLINE = 10.0
ORPHAN_DEADLINE = 30.0


def run_cli(*args: str, timeout: float = DEMO_DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEADERWATCH, *args], capture_output=True, text=True, timeout=timeout)


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def alive(pid: int, directory: str) -> bool:
    """Whether ``pid`` is still one of the demo's nodes (a reused pid would not name it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return directory in cmdline


def assert_nothing_left(directory: str, pids: list[int]) -> None:
    assert "leaderwatch-demo-" in directory, directory
    assert not Path(directory).exists(), f"{directory} was left behind"
    assert processes_mentioning(directory) == []
    assert [pid for pid in pids if alive(pid, directory)] == []


def started_pids(events: list[dict[str, Any]]) -> list[int]:
    return [event["pid"] for event in events if event["event"] == "node_started"]


# --- the whole story, as JSON events ------------------------------------------------------


def test_demo_fails_over_under_traffic_and_leaves_nothing_behind() -> None:
    started = time.monotonic()
    result = run_cli("demo", "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    events = events_of(result.stdout)
    names = [event["event"] for event in events]
    assert names[0] == "demo_started"
    assert names[-2:] == ["summary", "finished"]
    assert all(event["t"] >= 0 for event in events)
    first = events[0]
    assert (first["nodes"], first["rounds"]) == (3, 2)
    directory = first["directory"]

    # Two rounds: SIGKILL, then SIGTERM of the next leader, each followed by a failover.
    faults = [event for event in events if event["event"] == "fault"]
    failovers = [event for event in events if event["event"] == "failover"]
    assert [fault["kind"] for fault in faults] == ["SIGKILL", "SIGTERM"] * 2
    assert [failover["kind"] for failover in failovers] == ["SIGKILL", "SIGTERM"] * 2
    for fault, failover in zip(faults, failovers, strict=True):
        assert failover["from_node"] == fault["node"]
        assert failover["to_node"] != fault["node"]
        assert failover["to_epoch"] > failover["from_epoch"] == fault["epoch"]
        assert 0 < failover["outage_ms"] < 10_000

    # The killed node died of SIGKILL; the stopped one stepped down and exited 0.
    exits = {e["pid"]: e for e in events if e["event"] == "node_exited"}
    assert exits[faults[0]["pid"]]["signal"] == "SIGKILL"
    assert exits[faults[1]["pid"]]["returncode"] == 0

    # Every request was served; served epochs never go back; one node per epoch.
    requests = [event for event in events if event["event"] == "request"]
    assert "request_failed" not in names
    epochs = [request["epoch"] for request in requests]
    assert epochs == sorted(epochs)
    assert len(set(epochs)) >= 5  # one more per failover
    served_by: dict[int, set[str]] = {}
    for request in requests:
        served_by.setdefault(request["epoch"], set()).add(request["node"])
        assert request["route"][-1]["result"] == "served"
        assert request["route"][-1]["node"] == request["node"]
    assert all(len(nodes) == 1 for nodes in served_by.values())
    tickets = [request["ticket"] for request in requests]
    assert tickets == list(range(1, len(tickets) + 1))
    # Requests entered at followers and were redirected to the leader.
    assert any(request["route"][0]["result"] == "redirect" for request in requests)

    # Leaders as the nodes reported them, and what the summary says.
    elected = [event for event in events if event["event"] == "leader_elected"]
    elected_epochs = [event["epoch"] for event in elected]
    assert elected_epochs == sorted(set(elected_epochs))
    assert set(epochs) <= set(elected_epochs)
    summary = events[-2]
    assert summary["failed"] == 0
    assert summary["requests"] == summary["served"] == len(requests) == summary["ledger_tickets"]
    assert summary["ok"] is True
    assert all(summary["checks"].values()), summary["checks"]
    for kind in ("SIGKILL", "SIGTERM"):
        outage = summary["outage_ms"][kind]
        assert outage["failovers"] == 2
        assert 0 < outage["median"] <= outage["max"]
        assert outage["samples"] == [f["outage_ms"] for f in failovers if f["kind"] == kind]
    assert [e["epoch"] for e in summary["epochs"]] == sorted(set(epochs))

    finished = events[-1]
    assert finished["exit_code"] == 0
    assert finished["processes"] == len(started_pids(events)) == 3 + 3
    assert finished["processes_left"] == 0
    assert finished["directory_removed"] is True
    assert_nothing_left(directory, started_pids(events))
    assert elapsed < DEMO_DEADLINE


# --- the timeline for people --------------------------------------------------------------


def test_demo_timeline_shows_the_failovers_and_a_summary_table() -> None:
    result = run_cli("demo", "--nodes", "2", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "\x1b[" not in out  # not a terminal: no colours, no progress line
    assert out.startswith("leaderwatch demo: 2 node processes")
    directory = re.search(r"(/\S+/leaderwatch-demo-\w+)", out)
    assert directory is not None, out
    assert re.search(r"\* node-\d leads at epoch 1 ", out)
    assert re.search(r"round 1: SIGKILL node-\d \(kill -9\), the leader at epoch 1", out)
    assert re.search(r"round 1: SIGTERM node-\d \(graceful stop\), the leader at epoch 2", out)
    outages = re.findall(
        r"failover after (SIGKILL|SIGTERM): .* client-visible outage [\d.]+ ms", out
    )
    assert outages == ["SIGKILL", "SIGTERM"]
    assert re.search(r"#1 +node-\d", out)
    assert re.search(r"requests  (\d+) sent, \1 served, 0 failed", out)
    assert "each served by one node, never going back" in out
    assert re.search(r"SIGKILL +1 +[\d.]+ ms +[\d.]+ ms", out)
    assert re.search(r"SIGTERM +1 +[\d.]+ ms +[\d.]+ ms", out)
    assert out.rstrip().endswith(f"all 3 node processes stopped; {directory.group(1)} removed.")
    assert_nothing_left(directory.group(1), [])


def test_demo_on_a_terminal_shows_progress_and_no_colour_with_no_color() -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*LEADERWATCH, "demo", "--nodes", "2", "--rounds", "1", "--no-color"],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
            env={key: value for key, value in os.environ.items() if key != "NO_COLOR"},
        )
        os.close(terminal)
        terminal = -1
        output = bytearray()
        deadline = time.monotonic() + DEMO_DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal closed: the demo exited
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=STOP_DEADLINE) == 0
        assert process.stderr is not None
        assert process.stderr.read() == b""
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    text = output.decode()
    assert "\r\x1b[2K" in text  # the progress line is drawn and cleared
    assert re.search(r"[|/\\-] (starting|waiting for the nodes)", text)
    assert re.search(r"\x1b\[(1|3\d|9\d)m", text) is None  # no bold, no colour
    assert "failover after SIGTERM" in text


# --- Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt_after", ["node_started", "fault"])
def test_ctrl_c_stops_every_node_removes_the_directory_and_exits_130(
    interrupt_after: str,
) -> None:
    process = subprocess.Popen(
        [*LEADERWATCH, "demo", "--json", "--rounds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict[str, Any]] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + DEMO_DEADLINE
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"the demo ended before {interrupt_after}: {process.wait()}"
            events.append(json.loads(line))
            if events[-1]["event"] == interrupt_after:
                break
        else:
            pytest.fail(f"no {interrupt_after} event within {DEMO_DEADLINE} s")
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=STOP_DEADLINE)
        stopped = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert stopped < 5.0
    events += events_of(rest)
    names = [event["event"] for event in events]
    assert "interrupted" in names
    assert "summary" not in names
    assert events[names.index("interrupted")]["signal"] == "SIGINT"
    finished = events[-1]
    assert finished["event"] == "finished"
    assert finished["exit_code"] == 130
    assert finished["processes_left"] == 0
    assert finished["directory_removed"] is True
    assert_nothing_left(events[0]["directory"], started_pids(events))
    assert "Traceback" not in stderr


# --- without the http extra ----------------------------------------------------------------


def test_demo_without_the_http_extra_says_how_to_install_it() -> None:
    # httpx made unimportable, as in an installation without the http extra.
    code = (
        "import sys; sys.modules['httpx'] = None; "
        "from leaderwatch.cli import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "leaderwatch demo: error: the demo needs the http extra" in result.stderr
    assert "pip install 'leaderwatch[http]'" in result.stderr


# --- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--nodes", "1"], ["--rounds", "0"], ["--nodes", "x"]])
def test_bad_demo_options_are_usage_errors(option: list[str]) -> None:
    result = run_cli("demo", *option, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("leaderwatch demo: error: Invalid value for")
    assert result.stdout == ""


def test_unknown_command_is_a_clear_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert result.stderr == (
        "leaderwatch: error: No such command 'frobnicate'. (see 'leaderwatch --help')\n"
    )


def test_no_command_is_a_clear_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "Usage: leaderwatch [OPTIONS] COMMAND" in result.stderr


# --- a node dying on its own ---------------------------------------------------------------


def test_a_node_dying_unexpectedly_fails_the_demo_in_one_line_and_cleans_up() -> None:
    process = subprocess.Popen(
        [*LEADERWATCH, "demo", "--json", "--rounds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict[str, Any]] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + DEMO_DEADLINE
        follower = None
        while follower is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"the demo ended early: {process.wait()}"
            events.append(json.loads(line))
            if events[-1]["event"] == "node_ready" and events[-1]["state"] == "follower":
                follower = events[-1]["node"]
        assert follower is not None
        pid = next(e["pid"] for e in events if e.get("node") == follower and "pid" in e)
        os.kill(pid, signal.SIGKILL)  # not the demo's doing
        rest, stderr = process.communicate(timeout=DEMO_DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    assert stderr.splitlines() == [
        f"leaderwatch demo: error: {follower} (pid {pid}) stopped on its own (killed by SIGKILL); "
        "any error it reported is above"
    ]
    events += events_of(rest)
    names = [event["event"] for event in events]
    assert "summary" not in names
    assert names[-2:] == ["failed", "finished"]
    assert events[-1]["exit_code"] == 1
    assert events[-1]["processes_left"] == 0
    assert_nothing_left(events[0]["directory"], started_pids(events))


@pytest.mark.parametrize("kill_after", ["node_started", "request"])
def test_nodes_stop_by_themselves_when_the_demo_is_killed_outright(kill_after: str) -> None:
    process = subprocess.Popen(
        [*LEADERWATCH, "demo", "--json", "--rounds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    events: list[dict[str, Any]] = []
    try:
        assert process.stdout is not None
        while not any(event["event"] == kill_after for event in events):
            line = process.stdout.readline()
            assert line, f"the demo ended early: {process.wait()}"
            events.append(json.loads(line))
        process.kill()  # no chance to clean up: only the nodes' own watch is left
        process.wait(timeout=STOP_DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    directory = events[0]["directory"]
    try:
        # A node still starting (imports, on a loaded machine) notices once it serves.
        deadline = time.monotonic() + ORPHAN_DEADLINE
        while processes_mentioning(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(directory) == []
    finally:
        for pid, _ in processes_mentioning(directory):  # only if the test failed
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
