"""An etcd lease: grant, keep-alive, the proof that it is alive, revoke.

The counterpart of ``session.go`` in etcd's Go ``client/v3/concurrency``.
"""

from __future__ import annotations

import math
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
    - :meth:`keep_alive` renews every ``renew_interval`` (``renew_retry``
      after a failure) and returns the moment :attr:`proven_until` passes or
      etcd reports the lease gone.
    - :meth:`revoke` runs at most once, shielded, within ``resign_wait``.
    """

    __slots__ = (
        "_client",
        "_last_acked_send",
        "_node_id",
        "_proven_until",
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
    ) -> None:
        self._client = client
        self._timing = timing
        self.id = lease_id
        self._last_acked_send = acked_send
        self._proven_until = proven_until
        self._node_id = node_id
        self._revoked = False

    @classmethod
    async def grant(cls, client: EtcdClient, timing: LeaseTiming, *, node_id: str) -> Lease:
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
                    ttl = await self._client.keep_alive_once(self.id)
                except CallFailed as failure:
                    _log.debug("etcd_keepalive_failed", node_id=self._node_id, error=str(failure))
                    next_send = max(anyio.current_time(), sent + timing.renew_retry)
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

    async def revoke(self) -> None:
        """Best effort, once, shielded, within ``resign_wait``: end the lease and its keys now."""
        if self._revoked:
            return
        self._revoked = True
        wait = self._timing.resign_wait
        error: str | None = f"no answer within {wait:g}s"  # unless etcd answers in time
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + wait):
            try:
                if not await self._client.revoke(self.id, within=wait):
                    return  # etcd had already dropped it
                error = None
            except CallFailed as failure:
                error = str(failure)
        if error is not None:
            _log.warning(
                "etcd_lease_revoke_failed", node_id=self._node_id, lease_id=self.hex_id, error=error
            )
            return
        _log.info("etcd_lease_revoked", node_id=self._node_id, lease_id=self.hex_id)
