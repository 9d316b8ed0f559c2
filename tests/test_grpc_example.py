"""examples/grpc_service.py runs as written: three nodes, a client, a graceful failover."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "grpc_service.py"


def test_grpc_example_runs_and_fails_over(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    handed_over = re.search(r"leader (\S+) hands over", out)
    took_over = re.search(r"successor (\S+) serves at epoch (\d+)", out)
    assert handed_over is not None, out
    assert took_over is not None, out
    assert handed_over.group(1) != took_over.group(1)
    assert out.count("ticket:") == 6
