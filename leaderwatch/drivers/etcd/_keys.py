"""The key layout of etcd's election recipe (``etcdctl elect``, Go's ``concurrency.Election``)."""

from __future__ import annotations

from typing import Any

from aetcd import rpc

__all__ = ["ElectionKeys"]


class ElectionKeys:
    """Where the candidates of one election live, and the queries that find them in line.

    A candidate's key is ``<election>/<lease id, lowercase hex>``; the order of
    the line is the keys' create revision, lowest first.
    """

    __slots__ = ("_end", "leader_query", "prefix")

    def __init__(self, election: str) -> None:
        self.prefix = election.encode() + b"/"
        """Every candidate key starts with this."""
        self._end = self.prefix[:-1] + bytes([self.prefix[-1] + 1])
        self.leader_query = self.lowest()
        """The range request for the leader's key (the lowest), value included."""

    @property
    def prefix_end(self) -> bytes:
        """The range end that covers exactly the keys under :attr:`prefix`."""
        return self._end

    def candidate(self, lease_id: int) -> bytes:
        """The key of the candidate holding lease ``lease_id``."""
        return self.prefix + f"{lease_id:x}".encode()

    def lowest(self, **options: Any) -> Any:
        """A range request for the key with the lowest create revision."""
        return self._first(rpc.RangeRequest.ASCEND, **options)

    def highest_below(self, create_revision: int, **options: Any) -> Any:
        """A range request for the last key in line before one created at ``create_revision``."""
        return self._first(
            rpc.RangeRequest.DESCEND, max_create_revision=create_revision - 1, **options
        )

    def _first(self, order: int, **options: Any) -> Any:
        return rpc.RangeRequest(
            key=self.prefix,
            range_end=self._end,
            limit=1,
            sort_order=order,
            sort_target=rpc.RangeRequest.CREATE,
            **options,
        )
