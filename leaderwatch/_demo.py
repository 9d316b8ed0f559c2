"""``leaderwatch demo``: a failover on the embedded default election, end to end.

Three nodes elect a leader through :class:`LocalElectionDriver` (a file lock
in a temporary directory), each behind a :class:`LeaderWatchTask` whose gate
opens only after a fence; a client follows their redirects with a
:class:`LeaderCache`. The leader resigns, another takes over at a higher
epoch, and a late redirect from the old term is refused as stale.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from leaderwatch.channel import WatchReceiver
from leaderwatch.client import LeaderCache
from leaderwatch.drivers.local import LocalElectionDriver
from leaderwatch.hint import hint_from_wire
from leaderwatch.redirect import LeaderHint, Redirect, decide
from leaderwatch.serving import BaseLeadershipHandler, LeaderWatchTask, NotServing, Serving

__all__ = ["run_demo"]

_FENCE_SECONDS = 0.02
_DEADLINE_SECONDS = 10.0


class _FencingHandler(BaseLeadershipHandler):
    """Stands in for a service that persists its high-water mark before serving."""

    def __init__(self, say: Callable[[str], None], name: str) -> None:
        self._say = say
        self._name = name

    async def on_leader(self, epoch: int) -> None:
        self._say(f"{self._name} won the election at epoch {epoch}; fencing before it serves")
        await anyio.sleep(_FENCE_SECONDS)


@dataclass
class _Node:
    name: str
    endpoint: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    gate: WatchReceiver[Serving | NotServing] | None = None
    started: anyio.Event = field(default_factory=anyio.Event)

    def serving(self) -> WatchReceiver[Serving | NotServing]:
        if self.gate is None:
            raise RuntimeError(f"{self.name} has not started")
        return self.gate.clone()


async def _run_node(node: _Node, directory: str, say: Callable[[str], None]) -> None:
    with node.scope:
        driver = LocalElectionDriver(
            directory, node_endpoint=node.endpoint, node_id=node.name, poll_interval=0.01
        )
        async with driver, anyio.create_task_group() as tg:
            task = LeaderWatchTask(driver.leadership(), _FencingHandler(say, node.name))
            node.gate = task.serving
            tg.start_soon(task.run)
            node.started.set()
            await anyio.sleep_forever()


async def _first_serving(nodes: list[_Node], *, above: int = -1) -> tuple[_Node, int]:
    winner: list[tuple[_Node, int]] = []

    async def watch(node: _Node, tg: TaskGroup) -> None:
        state = await node.serving().wait_for(lambda s: isinstance(s, Serving) and s.epoch > above)
        assert isinstance(state, Serving)
        winner.append((node, state.epoch))
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(watch, node, tg)
    return winner[0]


async def _ask(
    node: _Node, cache: LeaderCache, say: Callable[[str], None], *, leader_epoch: int
) -> None:
    gate = await node.serving().wait_for(
        lambda s: isinstance(s, NotServing) and s.leader_epoch == leader_epoch
    )
    decision = decide(gate, self_endpoint=node.endpoint)
    outcome = cache.classify(decision.hint if isinstance(decision, Redirect) else None)
    say(f"client asks {node.name}: {decision!r} -> {outcome!r}")


async def run_demo(say: Callable[[str], None] = print) -> None:
    """Run the failover story, reporting each step through ``say``."""
    started = time.monotonic()

    def timed(line: str) -> None:
        say(f"[{time.monotonic() - started:6.3f}s] {line}")

    nodes = [_Node(f"node-{index}", f"127.0.0.1:{9000 + index}") for index in (1, 2, 3)]
    cache = LeaderCache([node.endpoint for node in nodes], tls_required=True)
    with tempfile.TemporaryDirectory(prefix="leaderwatch-demo-") as directory:
        say(f"3 nodes elect a leader through a file lock in {directory}")
        with anyio.fail_after(_DEADLINE_SECONDS):
            async with anyio.create_task_group() as tg:
                for node in nodes:
                    tg.start_soon(_run_node, node, directory, timed)
                    await node.started.wait()

                leader, epoch = await _first_serving(nodes)
                timed(f"{leader.name} ({leader.endpoint}) serves at epoch {epoch}")
                followers = [node for node in nodes if node is not leader]
                for follower in followers:
                    await _ask(follower, cache, timed, leader_epoch=epoch)

                timed(f"{leader.name} resigns (graceful exit: the lock is released)")
                resigned = time.monotonic()
                leader.scope.cancel()
                successor, new_epoch = await _first_serving(followers, above=epoch)
                timed(
                    f"{successor.name} ({successor.endpoint}) serves at epoch {new_epoch}, "
                    f"{(time.monotonic() - resigned) * 1000:.0f} ms after the resignation"
                )
                for follower in followers:
                    if follower is not successor:
                        await _ask(follower, cache, timed, leader_epoch=new_epoch)

                late = LeaderHint(leader_endpoint=leader.endpoint, leader_epoch=epoch)
                timed(f"a late redirect from epoch {epoch} arrives: {cache.classify(late)!r}")
                downgrade = cache.classify(
                    hint_from_wire(f"http://{leader.endpoint}", new_epoch + 1)
                )
                timed(f"a plaintext hint under TLS: {downgrade!r}")
                timed(f"client now calls, in order: {cache.worklist()}")
                tg.cancel_scope.cancel()
    say("done: every node resigned and the election directory was removed")
