"""The HTTP example runs as written: three uvicorn nodes, a client, two failovers, no leftovers.

(examples/grpc_service.py has its own test, tests/test_grpc_example.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HTTP_EXAMPLE = EXAMPLES / "http_service.py"


def node_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output.split("\n", 1)[0])]


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_http_example_runs_fails_over_and_leaves_nothing_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(HTTP_EXAMPLE)],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 30
    out = result.stdout
    graceful = re.search(r"leader (\S+) hands over \(SIGTERM\)", out)
    killed = re.search(r"leader (\S+) is killed \(SIGKILL\)", out)
    successors = re.findall(r"successor (\S+) serves at epoch (\d+)", out)
    assert graceful is not None, out
    assert killed is not None, out
    assert len(successors) == 2, out
    assert graceful.group(1) != successors[0][0] == killed.group(1) != successors[1][0]
    assert int(successors[0][1]) < int(successors[1][1])
    assert out.count("ticket:") == 9
    pids = node_pids(out)
    assert len(pids) == 3
    assert all(gone(pid) for pid in pids)
    assert list(scratch.iterdir()) == []  # the election directory was removed


def test_http_example_nodes_stop_when_the_example_is_killed_outright(tmp_path: Path) -> None:
    example = subprocess.Popen(
        [sys.executable, str(HTTP_EXAMPLE)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pids: list[int] = []
    try:
        assert example.stdout is not None
        first = example.stdout.readline()  # "nodes: ..." once all three answer
        pids = node_pids(first)
        assert len(pids) == 3, first
        example.send_signal(signal.SIGKILL)
        example.wait(10)
        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in pids):
            if time.monotonic() > deadline:
                pytest.fail(f"example nodes still running after the example was killed: {pids}")
            time.sleep(0.05)
    finally:
        if example.poll() is None:
            example.kill()
            example.wait(10)
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
