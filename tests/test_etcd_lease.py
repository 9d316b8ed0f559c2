"""The etcd lease's keep-alive on a virtual clock: when a leader asks to leave a
frozen endpoint, and how soon its next renewal goes to the one it moved to.

Runs on trio's ``MockClock`` (time jumps when every task waits), so the
timings asserted are exact and independent of the machine's load.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient
from leaderwatch.drivers.etcd._lease import Lease

TIMING = LeaseTiming.of(2)  # proof window 1.5 s: renew every 0.5 s, patience 0.25 s, retry 0.1 s
FROZEN, SPARE = "10.0.0.1:2379", "10.0.0.2:2379"


class FreezingClient:
    """Answers renewals on ``FROZEN`` until ``answers`` were sent, then never again.

    Leaving ``FROZEN`` takes ``switch_takes`` seconds; the switch then cuts
    the renewal still waiting there (as closing a gRPC channel does).
    """

    def __init__(self, answers: int, switch_takes: float, *, can_switch: bool = True) -> None:
        self.endpoint = FROZEN
        self.answers = answers
        self.switch_takes = switch_takes
        self.can_switch = can_switch
        self.sends: list[tuple[float, str]] = []
        self.leave_asked: list[float] = []
        self._leave = trio.Event()
        self._settled: trio.Event | None = None
        self._closed = trio.Event()

    def leave_endpoint(self) -> None:
        self.leave_asked.append(trio.current_time())
        if self.can_switch and self._settled is None:
            self._settled = trio.Event()
            self._leave.set()

    async def switcher(self) -> None:
        await self._leave.wait()
        await trio.sleep(self.switch_takes)
        self.endpoint = SPARE
        self._closed.set()
        assert self._settled is not None
        self._settled.set()

    async def moved_from(self, endpoint: str) -> bool:
        if self._settled is not None:
            await self._settled.wait()
        return self.endpoint != endpoint

    async def keep_alive_once(self, lease_id: int) -> int:
        endpoint = self.endpoint
        self.sends.append((trio.current_time(), endpoint))
        if endpoint == SPARE or len(self.sends) <= self.answers:
            return TIMING.ttl
        with trio.move_on_after(TIMING.call_timeout):
            await self._closed.wait()
            raise CallFailed(FROZEN, "_ChannelClosed", "channel closed", is_auth=False)
        raise CallFailed(FROZEN, "DEADLINE_EXCEEDED", "Deadline Exceeded", is_auth=False)


def keep_alive_for(client: FreezingClient, seconds: float) -> tuple[str | None, Lease]:
    """Run the lease's keep-alive (and the client's switcher) for ``seconds`` of virtual time."""
    outcome: list[str] = []
    lease_box: list[Lease] = []

    async def main() -> None:
        lease = Lease(
            cast(EtcdClient, cast(Any, client)),
            TIMING,
            0x1D,
            acked_send=trio.current_time(),
            proven_until=TIMING.proven_until(trio.current_time()),
            node_id="10.0.0.9:7000",
            on_unanswered=client.leave_endpoint,
        )
        lease_box.append(lease)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.switcher)
            with trio.move_on_after(seconds):
                outcome.append(await lease.keep_alive())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return (outcome[0] if outcome else None), lease_box[0]


def test_a_frozen_endpoint_is_left_after_the_patience_and_renewed_elsewhere_at_once() -> None:
    # Renewals at 0.5 and 1.0 are answered; the one sent at 1.5 never is.
    # A switch that takes 0.6 s (a loaded host) still leaves time to renew
    # before the proof from the renewal sent at 1.0 runs out at 2.5.
    client = FreezingClient(answers=2, switch_takes=0.6)
    outcome, lease = keep_alive_for(client, 10)

    assert outcome is None, (outcome, client.sends)  # still proven after 10 s
    assert client.sends[:3] == [(0.5, FROZEN), (1.0, FROZEN), (1.5, FROZEN)]
    # Asked to leave once, the patience after the unanswered renewal was sent.
    assert client.leave_asked == [1.5 + TIMING.renewal_patience]
    # The renewal cut by the switch is retried on the new endpoint at once
    # (not renew_retry later, and never again on the frozen one).
    switched = 1.5 + TIMING.renewal_patience + client.switch_takes
    assert client.sends[3] == (switched, SPARE)
    assert all(endpoint == SPARE for _, endpoint in client.sends[3:])
    assert lease.last_acked_send >= switched


def test_without_another_endpoint_the_lease_is_unproven_when_its_window_ends() -> None:
    # Nothing to switch to: renewals on the frozen endpoint time out and are
    # retried there until the proof from the last answered one (sent at 1.0) ends.
    client = FreezingClient(answers=2, switch_takes=0.45, can_switch=False)
    outcome, lease = keep_alive_for(client, 10)

    assert outcome == "lease_unproven"
    assert lease.proven_until == 1.0 + TIMING.proof_window
    sent = [at for at, _ in client.sends]
    # A renewal that timed out is retried at once (its deadline already took
    # longer than renew_retry), and only on the endpoint in use.
    assert sent == [0.5, 1.0, 1.5, 2.0]
    assert {endpoint for _, endpoint in client.sends} == {FROZEN}


class RefusingClient(FreezingClient):
    """Refuses the first ``refusals`` renewals at once (``UNAVAILABLE``), then answers."""

    def __init__(self, refusals: int) -> None:
        super().__init__(answers=0, switch_takes=0, can_switch=False)
        self.refusals = refusals

    async def keep_alive_once(self, lease_id: int) -> int:
        self.sends.append((trio.current_time(), self.endpoint))
        if len(self.sends) <= self.refusals:
            raise CallFailed(FROZEN, "UNAVAILABLE", "connection refused", is_auth=False)
        return TIMING.ttl


def test_a_refused_renewal_is_retried_after_renew_retry_not_in_a_busy_loop() -> None:
    client = RefusingClient(refusals=3)
    outcome, lease = keep_alive_for(client, 1.0)

    assert outcome is None
    sent = [at for at, _ in client.sends]
    retry = TIMING.renew_retry
    assert sent[:4] == pytest.approx([0.5, 0.5 + retry, 0.5 + 2 * retry, 0.5 + 3 * retry])
    assert lease.last_acked_send == pytest.approx(0.5 + 3 * retry)
    assert client.leave_asked == []
