"""Short seeded chaos runs (benchmarks/chaos.py) for etcd and local, in parallel: no rule broken.

Each run injects faults for 60 s into a group of real candidate processes
(etcd: on a real 3-member cluster), records every transition in a
LeadershipHistory and checks it; see benchmarks/chaos.py and docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from etcd_server import EtcdNotFound, find_etcd, find_etcdctl

CHAOS = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"
SEED = 20260
DURATION_S = 60
DEADLINE_S = 600

# Known defects of issue 11 §1 that these runs must not hide:
# TODO(issue 11 §1 defect 1, epoch reuse after etcd loses its data): the etcd_wipe fault is
# left out here (the default fault set). Once fixed, move "etcd_wipe" from KNOWN_BROKEN to
# STANDARD_FAULTS in benchmarks/chaos.py so this test requires 0 violations under it too.
# TODO(issue 11 §1 defects 4 and 5): hints at an abandoned campaign's key are attributed to
# these defects by benchmarks/chaos.py (etcd_backend's explain) and reported, not failed;
# once fixed, drop that attribution so they fail this test.
RUNS = {
    "etcd": ["--driver", "etcd", "--candidates", "3", "--ttl", "2"],
    "local": ["--driver", "local", "--candidates", "3"],
}


def test_seeded_chaos_runs_break_no_rule_and_leak_nothing(tmp_path: Path) -> None:
    try:
        find_etcd()
        find_etcdctl()
    except EtcdNotFound as error:
        pytest.fail(f"the etcd chaos run needs a real etcd: {error}")
    processes = {
        driver: subprocess.Popen(
            [
                sys.executable,
                str(CHAOS),
                *args,
                "--duration",
                str(DURATION_S),
                "--seed",
                str(SEED),
                "--json",
                str(tmp_path / f"{driver}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for driver, args in RUNS.items()
    }
    outputs = {}
    try:
        for driver, process in processes.items():
            outputs[driver], _ = process.communicate(timeout=DEADLINE_S)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    for driver, process in processes.items():
        table = outputs[driver]
        report = json.loads((tmp_path / f"{driver}.json").read_text())
        assert report["seed"] == SEED
        assert report["violations"] == 0, table
        assert report["leaks"] == 0, table
        assert report["ok"], table
        assert process.returncode == 0, table
        [phase] = report["phases"]
        assert phase["known_defect"] is None
        assert phase["duration_s"] >= DURATION_S
        assert phase["stalls"] == 0, table
        assert phase["crashes"] == [], table
        assert phase["unclean_exits"] == [], table
        assert all(count == 0 for count in phase["leaks"].values()), table
        # The run really attacked the group: most fault kinds, several leader changes
        # (bounds loose enough for a loaded 2-core machine, where faults come slower).
        assert phase["faults"] >= 10, table
        assert len(phase["by_kind"]) >= 4, table
        assert phase["failovers"] >= 3, table
        assert phase["failover_ms"]["count"] >= 3, table
        assert phase["terms"] >= phase["failovers"], table
