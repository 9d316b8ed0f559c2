"""The public etcd election driver: composes the client, lease, campaign and observer parts."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import sniffio
from aetcd import rpc
from anyio.abc import TaskGroup

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._campaign import Campaign
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient, parse_endpoints
from leaderwatch.drivers.etcd._decision import decide, own_key_gone
from leaderwatch.drivers.etcd._errors import EtcdElectionError, EtcdUnavailable
from leaderwatch.drivers.etcd._floor import RevisionFloor
from leaderwatch.drivers.etcd._keys import ElectionKeys
from leaderwatch.drivers.etcd._lease import Lease
from leaderwatch.drivers.etcd._observer import LeaderObserver, LeaderRead
from leaderwatch.state import parse_endpoint

__all__ = ["EtcdElectionDriver"]

_log = get_logger("leaderwatch.drivers.etcd")


_EndReason = Literal["lease_expired", "lease_unproven", "campaign_key_deleted", "store_went_back"]


class _SessionEnded(FrozenValue):
    """Why a session (one lease and the campaign on it) ended, and when."""

    reason: _EndReason
    at: float
    was_leader: bool
    lease_id: str
    last_acked_send: float
    proven_until: float


class EtcdElectionDriver(DriverBase):
    """Elects one leader among the nodes that campaign in ``election`` on an etcd v3 cluster.

    With ``node_endpoint`` this node campaigns; without, it only observes.

    Guarantees:

    - Key layout of etcd's election recipe: a candidate writes
      ``<election>/<lease id, lowercase hex>`` holding ``node_endpoint``,
      attached to its lease of ``ttl`` seconds; the candidate key with the
      lowest create revision leads, and ``Leader.epoch`` /
      ``Follower.leader_epoch`` is that key's create revision, so epochs
      strictly increase across leaders. Only keys of exactly that shape are
      candidates: any other key under ``<election>/`` (a nested election
      ``<election>/sub``, anything else) is ignored. A waiting candidate
      watches only its predecessor key (the one next in line also its own
      key, in the same watch); a candidate whose key is gone never leads on
      it. ``etcdctl elect`` candidates and observers interoperate.
    - One epoch never names two leaders, even across an etcd that went back
      in time (data wiped, restored from an older snapshot, another cluster
      behind the address): a reply at a revision below one already seen, or
      from another cluster id, is logged once as ``etcd_store_went_back``
      (error); the node then never leads nor follows a key created at or
      below the highest revision it had seen (the *revision floor*, shared
      through the key ``<election>.revision-floor``), moves etcd's revision
      past that floor by rewriting that key, and campaigns only ``ttl``
      after it saw the store go back (every lease of the old store ran out
      by then), so the group elects a leader at a fresh, higher epoch.
    - Lease safety: ``Leader`` is published only while the lease is proven
      alive, i.e. until ``ttl - margin`` seconds after sending the last
      keep-alive etcd acknowledged (monotonic clock, measured from the
      send; :attr:`proven_until`). At that instant, if no newer keep-alive
      was acknowledged, the node publishes ``Unknown()``, abandons the lease
      and its key (a best-effort revoke), and campaigns again with a fresh
      lease once etcd answers; a revoke that failed is retried as soon as
      etcd answers again (for at most ``ttl``). A lease etcd reports
      expired, or a deleted campaign key, ends the campaign the same way
      (``etcd_campaign_abandoned`` with its ``reason``); the watch event of
      the key's deletion steps the leader down before any re-read.
    - Non-leaders publish ``Follower(endpoint, epoch)`` for the current
      leader key, ``Follower(None, epoch)`` plus an error log
      (``etcd_leader_endpoint_invalid``) when its value is not a scheme-less
      ``host:port``, and ``Unknown()`` when no candidate exists. A node
      that cannot reach etcd publishes ``Unknown()`` at most ``ttl - margin``
      seconds after the last request etcd answered was sent. A leader key
      created below an epoch this node already published (etcd restored
      from an older snapshot) gives ``Unknown()`` and one error log
      (``etcd_epoch_behind``) per key.
    - :meth:`resign` publishes the step-down, deletes this node's key (which
      wakes the successor at once), revokes the lease, and never campaigns
      again; the node keeps observing and follows its successor. Leaving
      ``async with`` publishes ``Unknown()`` and resigns the same way. Both
      are bounded: each etcd request gets at most ``min(1, (ttl - margin) / 3)``
      seconds.
    - Start-up raises :class:`EtcdUnavailable` when no endpoint answers
      (connection refused, TLS failure, or no answer within
      ``connect_timeout`` seconds; each endpoint gets that long, in turn)
      and :class:`EtcdAuthError` when credentials or permissions are
      refused; both name the endpoint. Once started, the first value
      subscribers see reflects the leader key etcd held at start-up.

    ``endpoints`` are scheme-less ``host:port`` strings (one string may hold
    several, comma-separated): they are tried in order at start-up and again,
    in turn, as soon as the one in use refuses or resets a request
    (``UNAVAILABLE``), when a leader's keep-alive gets no answer in time,
    and when it stays silent for ``ttl - margin``; the lease lives on the
    cluster, so a leader keeps leading through another member. TLS is used when
    ``tls=True`` or any of ``ca_cert``, ``client_cert``, ``client_key`` is
    given; ``username`` and ``password`` use etcd's authentication.
    ``margin`` defaults to ``max(0.5, ttl / 5)`` seconds and must be in
    ``(0, ttl)``; every other duration derives from ``ttl`` and ``margin``
    (see :class:`~leaderwatch.drivers.LeaseTiming`). Runs on the asyncio
    backend only (``grpc.aio``); entering it under trio raises
    :class:`EtcdElectionError`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        election: str,
        node_endpoint: str | None = None,
        ttl: int = 10,
        margin: float | None = None,
        node_id: str | None = None,
        connect_timeout: float = 5.0,
        tls: bool | None = None,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        strict: bool = False,
    ) -> None:
        etcd_endpoints = parse_endpoints(endpoints)
        if not isinstance(election, str) or not election:
            raise ValueError(f"election must be a non-empty string (got {election!r})")
        own = None if node_endpoint is None else parse_endpoint(node_endpoint)
        timing = LeaseTiming.of(ttl, margin)
        super().__init__(
            node_id if node_id is not None else (own or f"etcd-observer:{election}"),
            strict=strict,
            self_endpoint=own,
        )
        self._election = election
        self._node_endpoint = own
        self._timing = timing
        self._keys = ElectionKeys(election)
        self._client = EtcdClient(
            etcd_endpoints,
            election=election,
            probe=self._keys.leader_query,
            timing=timing,
            node_id=self.node_id,
            connect_timeout=connect_timeout,
            tls=tls,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            username=username,
            password=password,
        )
        self._floor = RevisionFloor(self._client, self._keys, timing, node_id=self.node_id)
        self._observer = LeaderObserver(
            self._client, self._keys, self._floor, timing, node_id=self.node_id
        )
        self._tasks: TaskGroup | None = None
        self._read: LeaderRead | None = None
        self._campaign: Campaign | None = None
        self._candidacy: anyio.CancelScope | None = None
        self._candidacy_over: anyio.Event | None = None
        self._reported_behind: tuple[bytes, int] | None = None
        self._high_water_at = -math.inf

    @property
    def election(self) -> str:
        """The election name; candidate keys live under ``election + "/"``."""
        return self._election

    @property
    def node_endpoint(self) -> str | None:
        """The endpoint this node campaigns with, ``None`` for an observer."""
        return self._node_endpoint

    @property
    def ttl(self) -> int:
        """Lease time-to-live requested from etcd, in seconds."""
        return self._timing.ttl

    @property
    def margin(self) -> float:
        """Seconds before ``ttl`` at which an unconfirmed leader steps down."""
        return self._timing.margin

    @property
    def etcd_endpoint(self) -> str | None:
        """The etcd endpoint in use, ``None`` before start-up."""
        return self._client.endpoint

    @property
    def reconnects(self) -> int:
        """Times contact with etcd was re-established: endpoints switched to, plus
        answers after ``etcd_unreachable`` (each logged as ``etcd_reconnected``)."""
        return self._client.reconnects

    @property
    def lease_id(self) -> int | None:
        """The lease of the current campaign, ``None`` when not campaigning."""
        campaign = self._campaign
        return None if campaign is None else campaign.lease.id

    @property
    def campaign_revision(self) -> int | None:
        """The create revision of this node's key (its epoch if it leads), if campaigning."""
        campaign = self._campaign
        return None if campaign is None else campaign.create_revision

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()``) this node's leadership is proven; see the class."""
        campaign = self._campaign
        if campaign is None or campaign.won_at is None or campaign.key_gone.is_set():
            return -math.inf
        return campaign.lease.proven_until

    # -- lifecycle (DriverBase hooks) ------------------------------------------------

    async def _start(self, task_group: TaskGroup) -> None:
        if sniffio.current_async_library() != "asyncio":
            raise EtcdElectionError(
                "EtcdElectionDriver runs on anyio's asyncio backend only (its gRPC client is "
                "grpc.aio); run the application with backend='asyncio'"
            )
        await self._client.connect()
        try:
            # The first value subscribers see is what etcd holds, not a placeholder.
            self._note_read(await self._observer.read())
        except CallFailed as failure:
            raise EtcdUnavailable(
                f"etcd at {failure.endpoint} answered, then failed to read election "
                f"{self._election!r}: {failure.code}: {failure.details}; check its health"
            ) from failure
        self._tasks = task_group
        task_group.start_soon(
            self._observer.run, self._note_read, self._note_events, self._let_campaign_react
        )
        task_group.start_soon(self._client.keep_contact, self._publish_state)
        task_group.start_soon(self._floor.keep)
        if self._node_endpoint is not None:
            self._candidacy = anyio.CancelScope()
            self._candidacy_over = anyio.Event()
            task_group.start_soon(self._campaign_loop)

    async def _resign(self) -> None:
        """Step down and delete the key now, then stop the campaign loop (which revokes)."""
        if self._candidacy is None or self._candidacy_over is None:
            return
        # Handing over here rather than after the loop unwinds saves the
        # successor the cancellation round (a few hundred microseconds).
        await self._step_down()
        self._candidacy.cancel()
        await self._candidacy_over.wait()

    async def _release(self) -> None:
        await self._client.close()

    # -- what is published -----------------------------------------------------------

    def _publish_state(self) -> None:
        """Publish what :func:`decide` makes of what the parts know now."""
        read = self._read
        if read is None or self._watch.is_closed:
            return
        campaign = self._campaign
        decision = decide(
            now=anyio.current_time(),
            read=read,
            contact_until=self._client.contact_until,
            campaign=None if campaign is None else campaign.standing,
            proven_until=-math.inf if campaign is None else campaign.lease.proven_until,
            own_endpoint=self._node_endpoint,
            high_water=self._watch.high_water,
            high_water_at=self._high_water_at,
            floor=self._client.history.floor,
        )
        if decision.reason == "epoch_behind":
            self._report_epoch_behind(read)
        high_water = self._watch.high_water
        self._publish(decision.state)
        if self._watch.high_water != high_water:
            self._high_water_at = anyio.current_time()

    def _report_epoch_behind(self, read: LeaderRead) -> None:
        leader = read.leader
        assert leader is not None
        seen = (leader.key, leader.create_revision)
        if seen != self._reported_behind:
            self._reported_behind = seen
            _log.error(
                "etcd_epoch_behind",
                node_id=self.node_id,
                key=leader.key.decode("utf-8", "replace"),
                create_revision=leader.create_revision,
                high_water=self._watch.high_water,
            )

    def _note_read(self, read: LeaderRead) -> None:
        """A new read of the leader key: publish; tell a campaign that won if its key is gone."""
        self._read = read
        campaign = self._campaign
        if campaign is not None and own_key_gone(campaign.standing, read):
            campaign.key_gone.set()
        self._publish_state()

    def _note_events(self, events: list[Any]) -> None:
        """Events of the watched leader key: step down at once when it is this node's, deleted.

        The successor learns from the same event (the deletion of its
        predecessor), so the old leader steps down without waiting for a read.
        """
        campaign = self._campaign
        if campaign is None or campaign.won_at is None:
            return
        if any(event.type == rpc.Event.DELETE and event.kv.key == campaign.key for event in events):
            campaign.key_gone.set()
            self._publish_state()

    async def _let_campaign_react(self, changed_key: bytes) -> None:
        # When the leader key that changed is this node's predecessor, the
        # campaign decides first, so a hand-over is not slowed by the re-read.
        campaign = self._campaign
        if campaign is not None:
            await campaign.wait_reacted(changed_key, self._timing.call_timeout)

    # -- campaigning: one owner for every session ------------------------------------

    async def _campaign_loop(self) -> None:
        """Own every session: grant a lease, campaign on it until the session ends, repeat.

        Runs until :meth:`_resign` cancels it. This task alone starts and ends
        sessions: whatever ended one, it steps down (unless :meth:`_resign`
        already did) and revokes the lease.
        """
        assert self._candidacy is not None
        assert self._candidacy_over is not None
        backoff = self._timing.backoff()
        try:
            with self._candidacy:
                while self.campaigning:
                    lease = await Lease.grant(
                        self._client,
                        self._timing,
                        node_id=self.node_id,
                        on_unanswered=self._renewal_unanswered,
                    )
                    started = anyio.current_time()
                    try:
                        self._log_abandoned(await self._hold_session(lease))
                    finally:
                        if not await lease.revoke() and self._tasks is not None:
                            self._tasks.start_soon(self._revoke_when_etcd_answers, lease)
                    if anyio.current_time() - started > self._timing.proof_window:
                        backoff.reset()
                    await backoff.wait()
        finally:
            self._candidacy_over.set()

    async def _hold_session(self, lease: Lease) -> _SessionEnded:
        """Keep ``lease`` alive and campaign on it until the first reason to stop; return it.

        The session's two tasks only report why they stopped. On the first
        report, or when cancelled (resign), this task steps down at once,
        before those tasks unwind.
        """
        endings: list[_SessionEnded] = []
        ended = anyio.Event()

        async def report(stops: Callable[[], Awaitable[_EndReason]]) -> None:
            reason = await stops()
            campaign = self._campaign
            endings.append(
                _SessionEnded(
                    reason=reason,
                    at=anyio.current_time(),
                    was_leader=campaign is not None and campaign.won_at is not None,
                    lease_id=lease.hex_id,
                    last_acked_send=lease.last_acked_send,
                    proven_until=lease.proven_until,
                )
            )
            ended.set()

        async with anyio.create_task_group() as session:
            session.start_soon(report, lease.keep_alive)
            session.start_soon(report, partial(self._campaign_on, lease))
            session.start_soon(report, self._until_below_floor)
            try:
                await ended.wait()
            finally:
                session.cancel_scope.cancel()
                await self._step_down()
        return endings[0]

    def _renewal_unanswered(self) -> None:
        # A leader's lease is at stake: try another endpoint while the proof
        # still holds, rather than after a proof window of silence.
        campaign = self._campaign
        if campaign is not None and campaign.won_at is not None:
            self._client.leave_endpoint("renewal_unanswered")

    async def _until_below_floor(self) -> Literal["store_went_back"]:
        """Return once this session's key is at or below the revision floor (etcd went back)."""
        history = self._client.history
        while True:
            campaign = self._campaign
            if campaign is not None and campaign.create_revision <= history.floor:
                return "store_went_back"
            await history.wait_changed()

    async def _revoke_when_etcd_answers(self, lease: Lease) -> None:
        """Retry revoking an abandoned lease whenever etcd answers again, for a bounded time.

        Its key would otherwise lead, or stand in line, until etcd expires the
        lease, ``ttl`` after etcd last heard of it, which may be after etcd
        restarts (etcd renews every lease when it restarts). Gives up ``ttl``
        after etcd first answered again, and when the driver exits.
        """
        backoff = self._timing.backoff()
        await self._client.wait_answer(anyio.current_time())
        with anyio.move_on_after(self._timing.ttl):
            while True:
                attempted = anyio.current_time()
                if await lease.revoke():
                    break
                await backoff.wait()
                await self._client.wait_answer(attempted)
        if not lease.revoked:
            _log.warning(
                "etcd_lease_revoke_abandoned",
                node_id=self.node_id,
                lease_id=lease.hex_id,
                reason=f"etcd answered but did not revoke it within ttl={self._timing.ttl}s",
            )

    async def _campaign_on(
        self, lease: Lease
    ) -> Literal["campaign_key_deleted", "store_went_back"]:
        """Campaign with this node's key on ``lease``; return once that key is gone."""
        assert self._node_endpoint is not None
        campaign = await Campaign.create(
            self._client,
            self._keys,
            self._timing,
            lease,
            floor=self._floor,
            endpoint=self._node_endpoint,
            node_id=self.node_id,
        )
        if campaign is not None and campaign.create_revision <= self._client.history.floor:
            return "store_went_back"  # an earlier attempt's key, created before the floor rose
        # Not campaigning any more: resign() stepped down while the key was being
        # created; the lease's revoke deletes it.
        if campaign is not None and self.campaigning:
            self._campaign = campaign
            if await campaign.wait_until_first(on_won=self._publish_state):
                _log.info(
                    "etcd_campaign_won",
                    node_id=self.node_id,
                    key=campaign.key.decode("utf-8", "replace"),
                    epoch=campaign.create_revision,
                )
                await campaign.key_gone.wait()
        return "campaign_key_deleted"

    async def _step_down(self) -> None:
        """Forget the campaign and publish that; when resigning, also delete its key.

        Idempotent. Deleting the key (shielded, bounded) wakes the successor at
        once; the lease is revoked after, off the hand-over's path.
        """
        campaign, self._campaign = self._campaign, None
        self._publish_state()
        if campaign is not None and not self.campaigning:
            await campaign.delete_key()

    def _log_abandoned(self, ended: _SessionEnded) -> None:
        if not self.campaigning:
            return  # resigning: not a failure
        proof = (
            {"last_acked_send": ended.last_acked_send, "proven_until": ended.proven_until}
            if ended.reason == "lease_unproven"
            else {}
        )
        _log.warning(
            "etcd_campaign_abandoned",
            node_id=self.node_id,
            reason=ended.reason,
            was_leader=ended.was_leader,
            at=ended.at,
            lease_id=ended.lease_id,
            **proof,
        )
