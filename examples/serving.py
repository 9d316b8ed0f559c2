"""Serving gate, redirect decisions and the client's leader cache, end to end.

A node follows, then wins an election and fences before it serves; its
request handler decides serve / redirect / retry from the gate; a client
turns the redirect into its next call. Run: ``python examples/serving.py``.
"""

from __future__ import annotations

import logging

import anyio
import structlog

from leaderwatch import Follower, Leader, LeaderWatch
from leaderwatch.client import LeaderCache
from leaderwatch.hint import parse_hint_headers
from leaderwatch.redirect import Redirect, decide
from leaderwatch.serving import BaseLeadershipHandler, LeaderWatchTask, NotServing, Serving

SELF = "node-a:9000"


class Fence(BaseLeadershipHandler):
    async def on_leader(self, epoch: int) -> None:
        print(f"  on_leader({epoch}): persisting high-water mark before serving")

    async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
        print(f"  on_follower({leader_endpoint}, {leader_epoch})")


async def main() -> None:
    # Library code never configures logging; this example keeps only warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    watch = LeaderWatch("node-a")
    task = LeaderWatchTask(watch.subscribe(), Fence())
    gate = task.serving
    async with anyio.create_task_group() as tg:
        tg.start_soon(task.run)
        print("start:        ", repr(decide(task.current_gate, self_endpoint=SELF)))

        watch.publish(Follower(leader_endpoint="node-b:9000", leader_epoch=4))
        await gate.wait_for(
            lambda state: state == NotServing(leader_endpoint="node-b:9000", leader_epoch=4)
        )
        decision = decide(task.current_gate, self_endpoint=SELF)
        print("follower:     ", repr(decision))
        assert isinstance(decision, Redirect)
        headers = decision.hint.to_headers()
        print("  reply headers:", headers)

        watch.publish(Leader(epoch=5))
        await gate.wait_for(lambda state: isinstance(state, Serving))
        print("leader:       ", repr(decide(task.current_gate, self_endpoint=SELF)))
        tg.cancel_scope.cancel()
    print("after shutdown:", repr(decide(task.current_gate, self_endpoint=SELF)))

    cache = LeaderCache(["node-a:9000", "node-b:9000", "node-c:9000"], tls_required=True)
    print("client follows:", repr(cache.classify(parse_hint_headers(headers))))
    stale = {"leader-endpoint": "node-c:9000", "leader-epoch": "3"}
    print("stale redirect:", repr(cache.classify(parse_hint_headers(stale))))
    downgrade = {"leader-endpoint": "http://node-c:9000", "leader-epoch": "7"}
    print("downgrade:     ", repr(cache.classify(parse_hint_headers(downgrade))))
    print("next calls go to", cache.worklist())


if __name__ == "__main__":
    anyio.run(main)
