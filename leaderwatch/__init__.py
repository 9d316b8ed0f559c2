"""leaderwatch: who leads, at which epoch, and may this node serve.

The rule for the public API: **this top level exports everything a server
and a client need** — the leadership values, the watch and the serving
task, the redirect decision, the client's leader cache, the drivers' names
and the one root error, :class:`LeaderwatchError`. Everything else (the
generic watch channel, hint wire parsers, statistics records, the driver
base class, log formatting, test tools) lives in its submodule:
``leaderwatch.channel``, ``leaderwatch.hint``, ``leaderwatch.redirect``,
``leaderwatch.client``, ``leaderwatch.drivers``, ``leaderwatch.logs``,
``leaderwatch.testing``. Names starting with ``_`` are private everywhere.

Drivers that need an extra (``EtcdElectionDriver``: ``pip install
'leaderwatch[etcd]'``; ``PostgresElectionDriver``: ``pip install
'leaderwatch[postgres]'``) are imported on first use and visible to type
checkers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leaderwatch.channel import ChannelClosed, WatchReceiver
from leaderwatch.client import LeaderCache
from leaderwatch.drivers import (
    LeadershipDriver,
    LocalElectionDriver,
    ManualDriver,
    StaticDriver,
    driver_from_url,
)
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import LeaderHint, NoLeaderYet
from leaderwatch.node import LeaderNode, NotLeader
from leaderwatch.redirect import Redirect, Serve, decide
from leaderwatch.serving import (
    BaseLeadershipHandler,
    LeadershipHandler,
    LeadershipStreamClosed,
    LeaderWatchTask,
    NotServing,
    RetryBackoff,
    Serving,
    ServingState,
    TransientLeadershipError,
)
from leaderwatch.state import (
    Endpoint,
    Epoch,
    Follower,
    InvalidEndpoint,
    InvalidEpoch,
    InvalidLeaderState,
    Leader,
    LeaderState,
    Unknown,
    epoch_from_wire,
    epoch_to_wire,
    leader_state_from_json,
    parse_endpoint,
)
from leaderwatch.watch import EpochConflict, EpochRegression, LeaderWatch

if TYPE_CHECKING:
    from leaderwatch.drivers.etcd import EtcdElectionDriver as EtcdElectionDriver
    from leaderwatch.drivers.postgres import PostgresElectionDriver as PostgresElectionDriver

__all__ = [
    "BaseLeadershipHandler",
    "ChannelClosed",
    "Endpoint",
    "Epoch",
    "EpochConflict",
    "EpochRegression",
    "Follower",
    "InvalidEndpoint",
    "InvalidEpoch",
    "InvalidLeaderState",
    "Leader",
    "LeaderCache",
    "LeaderHint",
    "LeaderNode",
    "LeaderState",
    "LeaderWatch",
    "LeaderWatchTask",
    "LeadershipDriver",
    "LeadershipHandler",
    "LeadershipStreamClosed",
    "LeaderwatchError",
    "LocalElectionDriver",
    "ManualDriver",
    "NoLeaderYet",
    "NotLeader",
    "NotServing",
    "Redirect",
    "RetryBackoff",
    "Serve",
    "Serving",
    "ServingState",
    "StaticDriver",
    "TransientLeadershipError",
    "Unknown",
    "WatchReceiver",
    "decide",
    "driver_from_url",
    "epoch_from_wire",
    "epoch_to_wire",
    "leader_state_from_json",
    "parse_endpoint",
]

_LAZY_DRIVERS = frozenset({"EtcdElectionDriver", "PostgresElectionDriver"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_DRIVERS:
        import leaderwatch.drivers

        value = getattr(leaderwatch.drivers, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_DRIVERS])
