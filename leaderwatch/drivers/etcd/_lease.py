"""An etcd lease: grant, keep-alive, the proof that it is alive, revoke.

The counterpart of ``session.go`` in etcd's Go ``client/v3/concurrency``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import anyio

from leaderwatch._log import get_logger
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient

__all__ = ["Lease"]

_log = get_logger("leaderwatch.drivers.etcd")


class Lease:
    """A lease etcd granted, and until when this node can prove it alive.

    Guarantees (durations from :class:`LeaseTiming`):

    - :attr:`proven_until` is ``proof_window`` after *sending* the last
      renewal etcd acknowledged (the grant counts as one), capped by the TTL
      etcd granted; it only moves forward, except that it drops to
      ``-math.inf`` when etcd reports the lease gone.
    - :meth:`keep_alive` renews every ``renew_interval`` and returns the
      moment :attr:`proven_until` passes or etcd reports the lease gone.
      A renewal that has had no answer for ``renewal_patience`` calls
      ``on_unanswered`` (the driver's chance to try another endpoint while
      the proof still holds) and keeps waiting until its own deadline.
      After a failed renewal the next one is sent ``renew_retry`` later, or
      as soon as the client has moved to another endpoint.
    - Each :meth:`revoke` attempt is shielded and bounded by ``resign_wait``;
      once etcd confirmed the lease gone, further attempts do nothing.
    """

    __slots__ = (
        "_client",
        "_last_acked_send",
        "_node_id",
        "_on_unanswered",
        "_proven_until",
        "_revoke_attempts",
        "_revoked",
        "_timing",
        "id",
    )

    def __init__(
        self,
        client: EtcdClient,
        timing: LeaseTiming,
        lease_id: int,
        *,
        acked_send: float,
        proven_until: float,
        node_id: str,
        on_unanswered: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._on_unanswered = on_unanswered
        self._timing = timing
        self.id = lease_id
        self._last_acked_send = acked_send
        self._proven_until = proven_until
        self._node_id = node_id
        self._revoked = False
        self._revoke_attempts = 0

    @classmethod
    async def grant(
        cls,
        client: EtcdClient,
        timing: LeaseTiming,
        *,
        node_id: str,
        on_unanswered: Callable[[], None] = lambda: None,
    ) -> Lease:
        """Ask etcd for a lease of ``timing.ttl`` seconds until it grants one."""
        backoff = timing.backoff()
        while True:
            sent = anyio.current_time()
            try:
                reply = await client.grant(timing.ttl)
            except CallFailed as failure:
                _log.debug("etcd_lease_grant_failed", node_id=node_id, error=str(failure))
                await backoff.wait()
                continue
            if reply.error or reply.TTL <= 0:
                _log.warning("etcd_lease_grant_refused", node_id=node_id, error=reply.error)
                await backoff.wait()
                continue
            _log.info(
                "etcd_lease_granted", node_id=node_id, lease_id=f"{reply.ID:x}", ttl=reply.TTL
            )
            return cls(
                client,
                timing,
                reply.ID,
                acked_send=sent,
                proven_until=timing.proven_until(sent, reply.TTL),
                node_id=node_id,
                on_unanswered=on_unanswered,
            )

    @property
    def hex_id(self) -> str:
        """The lease id as etcd's tools print it (lowercase hex)."""
        return f"{self.id:x}"

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()``) the lease is proven alive."""
        return self._proven_until

    @property
    def last_acked_send(self) -> float:
        """When the last renewal etcd acknowledged was sent."""
        return self._last_acked_send

    async def keep_alive(self) -> Literal["lease_expired", "lease_unproven"]:
        """Renew the lease until it stops counting; return why.

        ``"lease_unproven"`` the moment :attr:`proven_until` passes (a renewal
        still in flight then is abandoned); ``"lease_expired"`` when etcd
        reports the lease gone, after which it proves nothing.
        """
        timing = self._timing
        next_send = self._last_acked_send + timing.renew_interval
        while True:
            with anyio.move_on_at(self._proven_until):
                await anyio.sleep_until(next_send)
                sent = anyio.current_time()
                try:
                    ttl = await self._renew_once()
                except CallFailed as failure:
                    _log.debug("etcd_keepalive_failed", node_id=self._node_id, error=str(failure))
                    retry_at = sent + timing.renew_retry
                    if await self._client.moved_from(failure.endpoint):
                        retry_at = sent
                    next_send = max(anyio.current_time(), retry_at)
                    continue
                if ttl <= 0:
                    self._proven_until = -math.inf
                    return "lease_expired"
                until = timing.proven_until(sent, ttl)
                if until > self._proven_until:
                    self._last_acked_send = sent
                    self._proven_until = until
                next_send = sent + timing.renew_interval
                continue
            return "lease_unproven"

    async def _renew_once(self) -> int:
        """One renewal with its full deadline; ``on_unanswered`` if it is slow to answer."""

        async def call_when_unanswered() -> None:
            await anyio.sleep(self._timing.renewal_patience)
            self._on_unanswered()

        outcome: int | CallFailed
        async with anyio.create_task_group() as patience:
            patience.start_soon(call_when_unanswered)
            try:
                outcome = await self._client.keep_alive_once(self.id)
            except CallFailed as failure:
                outcome = failure  # raised below, outside the group, so never wrapped
            finally:
                patience.cancel_scope.cancel()
        if isinstance(outcome, CallFailed):
            raise outcome
        return outcome

    @property
    def revoked(self) -> bool:
        """Whether etcd confirmed that the lease is gone (revoked by this node, or already)."""
        return self._revoked

    async def revoke(self) -> bool:
        """Best effort, shielded, within ``resign_wait``: end the lease and its keys now.

        ``True`` once etcd confirmed the lease gone (then further calls do
        nothing); ``False`` when etcd did not answer or refused, so the caller
        may try again. The first failure is logged (``etcd_lease_revoke_failed``),
        a success always (``etcd_lease_revoked``, with the number of attempts).
        """
        if self._revoked:
            return True
        self._revoke_attempts += 1
        wait = self._timing.resign_wait
        error: str | None = f"no answer within {wait:g}s"  # unless etcd answers in time
        existed = False
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + wait):
            try:
                existed = await self._client.revoke(self.id, within=wait)
                error = None
            except CallFailed as failure:
                error = str(failure)
        if error is not None:
            if self._revoke_attempts == 1:
                _log.warning(
                    "etcd_lease_revoke_failed",
                    node_id=self._node_id,
                    lease_id=self.hex_id,
                    error=error,
                )
            return False
        self._revoked = True
        if existed:
            _log.info(
                "etcd_lease_revoked",
                node_id=self._node_id,
                lease_id=self.hex_id,
                attempts=self._revoke_attempts,
            )
        return True
