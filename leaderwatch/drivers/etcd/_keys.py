"""The key layout of etcd's election recipe (``etcdctl elect``, Go's ``concurrency.Election``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from aetcd import rpc

__all__ = ["PAGE", "ElectionKeys"]

PAGE: Final = 16
"""Keys per range request when looking for candidates among other keys under the prefix."""

_LEASE_ID: Final = re.compile(rb"[0-9a-f]{1,16}\Z")
_MAX_LEASE_ID: Final = 2**63


class ElectionKeys:
    """Where the candidates of one election live, and the queries that find them in line.

    A candidate's key is exactly ``<election>/<lease id>``, the lease id (a
    positive 64-bit integer) in lowercase hex, as etcd's recipe writes it
    (``etcdctl lease grant`` prints it zero-padded to 16 digits: also
    accepted); the order
    of the line is the keys' create revision, lowest first. Every other key
    under the prefix (a nested election ``<election>/sub/...``, anything else)
    is not a candidate and is skipped.

    The election's *revision floor* lives outside the prefix, at
    ``<election>.revision-floor``: a decimal revision at or below which no
    candidate key may lead (see :class:`~leaderwatch.drivers.etcd._floor.RevisionFloor`).
    """

    __slots__ = ("_end", "leader_query", "prefix", "revision_floor")

    def __init__(self, election: str) -> None:
        self.prefix = election.encode() + b"/"
        """Every candidate key starts with this."""
        self._end = self.prefix[:-1] + bytes([self.prefix[-1] + 1])
        self.revision_floor = election.encode() + b".revision-floor"
        """The key holding the election's revision floor."""
        self.leader_query = self.lowest()
        """The range request for the first page of keys in line, values included."""

    @property
    def prefix_end(self) -> bytes:
        """The range end that covers exactly the keys under :attr:`prefix`."""
        return self._end

    def candidate(self, lease_id: int) -> bytes:
        """The key of the candidate holding lease ``lease_id``."""
        return self.prefix + f"{lease_id:x}".encode()

    def is_candidate(self, key: bytes) -> bool:
        """Whether ``key`` has the recipe's exact shape ``<election>/<lease id in hex>``."""
        if not key.startswith(self.prefix):
            return False
        lease = key[len(self.prefix) :]
        return _LEASE_ID.match(lease) is not None and 0 < int(lease, 16) < _MAX_LEASE_ID

    def first_candidate(self, kvs: Iterable[Any]) -> Any | None:
        """The first key-value in ``kvs`` whose key is a candidate's, if any."""
        return next((kv for kv in kvs if self.is_candidate(kv.key)), None)

    def lowest(self, *, above: int = 0, **options: Any) -> Any:
        """A range request for the keys with the lowest create revisions above ``above``."""
        if above:
            options["min_create_revision"] = above + 1
        return self._page(rpc.RangeRequest.ASCEND, **options)

    def line_from(self, create_revision: int, **options: Any) -> Any:
        """A range request for the keys created at or before ``create_revision``, latest first."""
        return self._page(rpc.RangeRequest.DESCEND, max_create_revision=create_revision, **options)

    def _page(self, order: int, **options: Any) -> Any:
        return rpc.RangeRequest(
            key=self.prefix,
            range_end=self._end,
            limit=PAGE,
            sort_order=order,
            sort_target=rpc.RangeRequest.CREATE,
            **options,
        )
