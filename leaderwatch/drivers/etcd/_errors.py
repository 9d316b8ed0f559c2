"""The public errors of the etcd driver."""

from __future__ import annotations

from leaderwatch.errors import LeaderwatchError

__all__ = ["EtcdAuthError", "EtcdElectionError", "EtcdUnavailable"]


class EtcdElectionError(LeaderwatchError, RuntimeError):
    """The etcd election cannot start or run; the message says why and what to do."""


class EtcdUnavailable(EtcdElectionError):
    """No etcd endpoint answered at start-up (refused, timed out or TLS failure).

    The message names every endpoint tried and what each answered.
    """


class EtcdAuthError(EtcdElectionError):
    """etcd refused the credentials, or the user may not use the election's keys."""
