"""Leader election across machines on an etcd v3 cluster (``pip install 'leaderwatch[etcd]'``).

Candidates follow etcd's own election recipe, the one behind ``etcdctl elect``
and Go's ``concurrency.Election``: each writes ``<election>/<lease id in hex>``
holding its endpoint, attached to its lease; the key with the lowest create
revision leads and its create revision is the epoch. ``etcdctl elect`` peers
and leaderwatch nodes therefore elect and observe each other.

The gRPC client is ``grpc.aio``, so this driver runs on anyio's asyncio
backend only.

One job per module:

- ``_client``: the connection to etcd (TLS, auth, deadlines, watches,
  endpoint switching, when etcd last answered); the only module that knows
  gRPC and maps its errors.
- ``_keys``: the recipe's key layout and the queries that find keys in line.
- ``_lease``: grant, keep-alive, the proof that the lease is alive, revoke.
- ``_campaign``: create this node's key, wait to be first in line, resign.
- ``_observer``: read and watch the current leader key.
- ``_decision``: the one pure function that turns all of that into the
  ``LeaderState`` to publish.
- ``driver``: :class:`EtcdElectionDriver`, which composes them and owns the
  lifecycle; durations come from :class:`~leaderwatch.drivers.LeaseTiming`.
"""

from __future__ import annotations

from leaderwatch.drivers.etcd._errors import EtcdAuthError, EtcdElectionError, EtcdUnavailable
from leaderwatch.drivers.etcd.driver import EtcdElectionDriver

__all__ = [
    "EtcdAuthError",
    "EtcdElectionDriver",
    "EtcdElectionError",
    "EtcdUnavailable",
]
