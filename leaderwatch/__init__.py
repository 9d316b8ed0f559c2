"""leaderwatch: who leads, at which epoch, and may this node serve.

The public names are re-exported here; everything else lives in its
submodule (``leaderwatch.channel``, ``leaderwatch.redirect``,
``leaderwatch.client``, ``leaderwatch.drivers``).
"""

from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender, watch_channel
from leaderwatch.serving import (
    BaseLeadershipHandler,
    LeadershipHandler,
    LeadershipStreamClosed,
    LeaderWatchTask,
    LeaderWatchTaskStats,
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
    Leader,
    LeaderState,
    Unknown,
    epoch_from_wire,
    epoch_to_wire,
    leader_state_from_json,
    parse_endpoint,
)
from leaderwatch.watch import EpochRegression, LeaderWatch, LeaderWatchStats

__all__ = [
    "BaseLeadershipHandler",
    "ChannelClosed",
    "Endpoint",
    "Epoch",
    "EpochRegression",
    "Follower",
    "InvalidEndpoint",
    "InvalidEpoch",
    "Leader",
    "LeaderState",
    "LeaderWatch",
    "LeaderWatchStats",
    "LeaderWatchTask",
    "LeaderWatchTaskStats",
    "LeadershipHandler",
    "LeadershipStreamClosed",
    "NotServing",
    "RetryBackoff",
    "Serving",
    "ServingState",
    "TransientLeadershipError",
    "Unknown",
    "WatchReceiver",
    "WatchSender",
    "epoch_from_wire",
    "epoch_to_wire",
    "leader_state_from_json",
    "parse_endpoint",
    "watch_channel",
]
