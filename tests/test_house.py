"""House rules that every module keeps: one error root, printed values name their kind,
logs never reach stdout, lazily loaded names are typed, one timing model, one backoff."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import leaderwatch
from leaderwatch import (
    Follower,
    Leader,
    LeaderHint,
    LeaderwatchError,
    NoLeaderYet,
    NotServing,
    Redirect,
    Serve,
    Serving,
    Unknown,
)
from leaderwatch._backoff import Backoff
from leaderwatch.client import Follow, Rejected, Stale
from leaderwatch.drivers import LeaseTiming
from leaderwatch.hint import MalformedHint
from leaderwatch.logs import JSONFormatter, event_of, structlog_fields
from leaderwatch.testing import capture_events

ROOT = Path(__file__).resolve().parent.parent

OPTIONAL = ("leaderwatch.drivers.etcd", "leaderwatch.drivers.postgres", "leaderwatch.grpc")


def library_modules() -> list[str]:
    names = ["leaderwatch"]
    for info in pkgutil.walk_packages(leaderwatch.__path__, "leaderwatch."):
        names.append(info.name)
    return names


def test_every_library_error_derives_from_the_root() -> None:
    found = []
    for name in library_modules():
        if name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            assert name.startswith(OPTIONAL) or "." in name, name
            continue
        for _, value in inspect.getmembers(module, inspect.isclass):
            if (
                value.__module__.startswith("leaderwatch")
                and issubclass(value, BaseException)
                and not value.__name__.startswith("_")
            ):
                found.append(value)
                assert issubclass(value, LeaderwatchError), value
    assert len(found) >= 8


def test_errors_keep_their_conventional_bases() -> None:
    assert issubclass(leaderwatch.InvalidEndpoint, ValueError)
    assert issubclass(leaderwatch.InvalidEpoch, ValueError)
    assert issubclass(leaderwatch.EpochRegression, RuntimeError)
    with pytest.raises(LeaderwatchError):
        leaderwatch.parse_endpoint("http://a:1")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Leader(epoch=2), "Leader(epoch=2)"),
        (Follower(leader_endpoint="a:1", leader_epoch=2), "Follower("),
        (Unknown(), "Unknown()"),
        (Serving(epoch=2), "Serving(epoch=2)"),
        (NotServing(), "NotServing("),
        (Serve(epoch=2), "Serve(epoch=2)"),
        (Redirect(hint=LeaderHint(leader_endpoint="a:1", leader_epoch=2)), "Redirect(hint="),
        (NoLeaderYet(leader_epoch=2), "NoLeaderYet("),
        (Follow(endpoint="a:1", epoch=2), "Follow("),
        (MalformedHint(rule="r", reason="x"), "MalformedHint("),
    ],
)
def test_printed_values_name_their_kind(value: object, text: str) -> None:
    assert str(value).startswith(text)
    assert repr(value).startswith(text)


def test_rejected_and_stale_print_their_kind() -> None:
    for cls in (Rejected, Stale):
        fields = {name: None for name in cls.model_fields}
        sample = cls.model_construct(**fields)
        assert str(sample).startswith(cls.__name__ + "(")


def test_top_level_exports_what_a_server_and_a_client_need() -> None:
    for name in (
        "Leader",
        "Follower",
        "Unknown",
        "LeaderState",
        "LeaderWatch",
        "LeaderWatchTask",
        "decide",
        "LeaderCache",
        "LocalElectionDriver",
        "StaticDriver",
        "ManualDriver",
        "LeaderwatchError",
    ):
        assert name in leaderwatch.__all__, name
        assert getattr(leaderwatch, name) is not None
    assert leaderwatch.EtcdElectionDriver.__name__ == "EtcdElectionDriver"


def test_library_logs_go_to_logging_never_stdout() -> None:
    code = textwrap.dedent(
        """
        import anyio
        from leaderwatch import Leader, LeaderWatch

        watch = LeaderWatch("node-a")
        watch.publish(Leader(epoch=1))
        watch.publish(Leader(epoch=0))  # a regression: an error event
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    # No handler configured: nothing anywhere (NullHandler), least of all stdout.
    assert result.stdout == ""
    assert result.stderr == ""
    configured = "import logging; logging.basicConfig(level=logging.INFO)\n" + code
    result = subprocess.run(
        [sys.executable, "-c", configured], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == ""
    assert "leader_state_changed node_id='node-a'" in result.stderr
    assert "ERROR:leaderwatch.watch:leader_state_epoch_regression" in result.stderr


def test_events_carry_their_fields_as_data() -> None:
    with capture_events() as events:
        leaderwatch.LeaderWatch("n").publish(Leader(epoch=3))
    assert events == [
        {
            "event": "leader_state_changed",
            "log_level": "info",
            "node_id": "n",
            "from": {"kind": "unknown"},
            "to": {"kind": "leader", "epoch": 3},
        }
    ]
    record = logging.LogRecord("leaderwatch.watch", logging.INFO, "f", 1, "m", None, None)
    record.leaderwatch_event = "leader_state_changed"
    record.leaderwatch_fields = {"node_id": "n"}
    assert event_of(record) == ("leader_state_changed", {"node_id": "n"})
    line = JSONFormatter().format(record)
    assert '"event": "leader_state_changed"' in line
    assert '"node_id": "n"' in line
    assert structlog_fields(None, "info", {"event": "x", "_record": record}) == {
        "event": "leader_state_changed",
        "node_id": "n",
        "_record": record,
    }


def test_lazily_loaded_drivers_are_typed(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from leaderwatch.drivers import EtcdElectionDriver\n"
        "EtcdElectionDriver('127.0.0.1:2379', election='e', tll=3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert 'Unexpected keyword argument "tll"' in result.stdout, result.stdout


def test_lease_timing_derives_every_duration() -> None:
    timing = LeaseTiming.of(10)
    assert timing.margin == 2.0
    assert timing.proof_window == 8.0
    assert timing.renew_interval == pytest.approx(8 / 3)
    assert timing.call_timeout == timing.renew_interval
    assert timing.resign_wait == 1.0
    assert timing.proven_until(100.0) == 108.0
    assert timing.proven_until(100.0, granted_ttl=5) == 103.0
    assert LeaseTiming.of(2).margin == 0.5
    backoff = timing.backoff()
    assert [backoff.next_delay() for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    for ttl, margin in ((0, None), (True, None), (3, 3), (3, 0), (3, math.nan), (2.5, None)):
        with pytest.raises(ValueError, match=r"ttl|margin"):
            LeaseTiming.of(ttl, margin)  # type: ignore[arg-type]


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 0.5, multiplier=3)
    assert [backoff.next_delay() for _ in range(4)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    backoff.reset()
    assert backoff.next_delay() == 0.1
    for bad in ((0, 1, 2), (2, 1, 2), (0.1, 1, 0.5)):
        with pytest.raises(ValueError, match="backoff"):
            Backoff(*bad)
