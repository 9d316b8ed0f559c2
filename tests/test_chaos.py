"""Short seeded chaos runs (benchmarks/chaos.py) for etcd and local, in parallel: no rule broken.

Each run injects faults for 60 s or more into a group of real candidate
processes, records every transition in a LeadershipHistory and checks it
(``complete=True``: every hint names an epoch some candidate led at); see
benchmarks/chaos.py and docs/reliability.md. etcd runs two phases: 45 s of
candidate and member faults on a real 3-member cluster, then 20 s of wiping a
single-member etcd's data (a store gone back in time, issue 11 §1 defect 1).
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
DEADLINE_S = 600
# Every phase of each run (the driver's whole default fault set) and its duration.
PHASES = {"etcd": {"etcd": 45, "etcd-etcd_wipe": 20}, "local": {"local": 60}}
RUNS = {
    "etcd": [
        "--driver",
        "etcd",
        "--candidates",
        "3",
        "--ttl",
        "2",
        "--duration",
        str(PHASES["etcd"]["etcd"]),
        "--wipe-duration",
        str(PHASES["etcd"]["etcd-etcd_wipe"]),
    ],
    "local": [
        "--driver",
        "local",
        "--candidates",
        "3",
        "--duration",
        str(PHASES["local"]["local"]),
    ],
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
    reports = {}
    for driver, process in processes.items():
        table = outputs[driver]
        report = reports[driver] = json.loads((tmp_path / f"{driver}.json").read_text())
        assert report["seed"] == SEED
        assert report["violations"] == 0, table
        assert report["leaks"] == 0, table
        assert report["ok"], table
        assert process.returncode == 0, table
        phases = {phase["phase"]: phase for phase in report["phases"]}
        assert set(phases) == set(PHASES[driver]), table
        for name, phase in phases.items():
            assert phase["duration_s"] >= PHASES[driver][name], table
            assert phase["known_defect"] is None
            assert phase["violations"] == 0, table
            assert phase["stalls"] == 0, table
            assert phase["crashes"] == [], table
            assert phase["unclean_exits"] == [], table
            assert all(count == 0 for count in phase["leaks"].values()), table
        # The run really attacked the group: most fault kinds, several leader changes
        # (bounds loose enough for a loaded 2-core machine, where faults come slower).
        main = phases[driver]
        assert main["faults"] >= 8, table
        assert len(main["by_kind"]) >= 4, table
        assert main["failovers"] >= 3, table
        assert main["failover_ms"]["count"] >= 3, table
        assert main["terms"] >= main["failovers"], table
    # Every wipe sent etcd back to revision 1 under the old leader: the group elected a new
    # term after each (the phase waits for one), and no epoch named two leaders (violations
    # 0 above). The candidates said so loudly, at most once each per wipe.
    wipe = {phase["phase"]: phase for phase in reports["etcd"]["phases"]}["etcd-etcd_wipe"]
    tables = outputs["etcd"]
    assert wipe["etcd_members"] == 1, tables
    assert wipe["faults"] >= 3, tables
    assert set(wipe["by_kind"]) == {"etcd_wipe"}, tables
    assert wipe["failovers"] >= wipe["faults"], tables
    went_back = wipe["store_went_back_logs"]
    assert went_back["wipes"] == wipe["faults"], tables
    assert went_back["total"] >= wipe["faults"], tables
    assert went_back["max_per_process_per_wipe"] == 1, tables
