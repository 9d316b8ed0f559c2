"""The process runner: its JSON lines, and a user's own driver run in the same harness."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from nodes import NodeSet, assert_history_ok, history_of

from leaderwatch.state import Follower, Leader, Unknown

USERS_RUNNER = textwrap.dedent(
    """
    import sys

    from leaderwatch.drivers import LocalElectionDriver
    from leaderwatch.testing.runner import BACKENDS, NodeBackend, main


    class MyDriver(LocalElectionDriver):
        pass


    def add_arguments(parser):
        parser.add_argument("--directory", required=True)
        parser.add_argument("--endpoint", required=True)


    def open_driver(args, node_id):
        return MyDriver(
            args.directory, node_endpoint=args.endpoint, node_id=node_id, poll_interval=0.01
        )


    BACKENDS.append(NodeBackend("mine", "my election", add_arguments, open_driver))
    sys.exit(main())
    """
)


def test_a_users_driver_runs_in_the_harness_and_its_lines_feed_a_history(
    tmp_path: Path,
) -> None:
    script = tmp_path / "my_runner.py"
    script.write_text(USERS_RUNNER)
    directory = tmp_path / "election"
    endpoints = ["127.0.0.1:7601", "127.0.0.1:7602"]
    with NodeSet(prefix=(sys.executable, str(script))) as cluster:
        nodes = [
            cluster.spawn(
                "mine",
                "--directory",
                str(directory),
                "--endpoint",
                endpoint,
                "--node-id",
                name,
                name=name,
            )
            for name, endpoint in zip(["a", "b"], endpoints, strict=True)
        ]
        leader = cluster.wait_stable(timeout=30)
        other = nodes[1 - nodes.index(leader)]
        epoch = leader.state.epoch if isinstance(leader.state, Leader) else None
        assert other.state == Follower(
            leader_endpoint=endpoints[nodes.index(leader)], leader_epoch=epoch
        )
        leader.terminate()
        assert leader.wait_exit(10) == 0
        assert leader.state == Unknown()
        other.wait_for_state(lambda state: state == Leader(epoch=(epoch or 0) + 1), timeout=10)
        other.terminate()
        assert other.wait_exit(10) == 0
    for node in nodes:
        lines = node.lines
        assert [line["node"] for line in lines] == [node.name] * len(lines)
        assert all(set(line) == {"node", "pid", "t", "wall", "state"} for line in lines)
        assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)
        assert lines[-1]["state"] == {"kind": "unknown"}
        assert not node.bad_lines
    report = assert_history_ok(nodes, complete=True)
    assert report.terms == 2
    assert {term.node for term in history_of(nodes).leader_terms()} == {"a", "b"}


def test_built_in_drivers_are_sent_to_leaderwatch_campaign() -> None:
    built_in = subprocess.run(
        [sys.executable, "-m", "leaderwatch.testing.runner", "--backend", "trio", "local"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built_in.returncode == 2
    assert built_in.stdout == ""
    assert "leaderwatch campaign local:///" in built_in.stderr
    assert "Traceback" not in built_in.stderr
    nothing = subprocess.run(
        [sys.executable, "-m", "leaderwatch.testing.runner"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nothing.returncode == 2
    assert "no driver registered" in nothing.stderr
    assert "leaderwatch campaign URL" in nothing.stderr
