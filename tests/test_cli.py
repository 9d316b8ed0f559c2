"""The ``leaderwatch`` command: the demo tells a real failover story."""

from __future__ import annotations

import re
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leaderwatch", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_demo_fails_over_to_a_higher_epoch_and_refuses_stale_redirects() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    first = re.search(r"(node-\d) \(127\.0\.0\.1:(\d+)\) serves at epoch (\d+)\n", out)
    second = re.search(r"(node-\d) \(127\.0\.0\.1:(\d+)\) serves at epoch (\d+), \d+ ms after", out)
    assert first is not None, out
    assert second is not None, out
    assert first.group(1) != second.group(1)
    assert int(second.group(3)) > int(first.group(3))
    assert f"Follow(endpoint='127.0.0.1:{second.group(2)}', epoch={second.group(3)})" in out
    assert re.search(r"a late redirect from epoch \d+ arrives: Stale\(", out)
    assert "rule='plaintext_downgrade'" in out
    assert out.rstrip().endswith("the election directory was removed")
    assert result.stderr == ""


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
