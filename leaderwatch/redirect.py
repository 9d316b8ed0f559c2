"""What a request handler does on this node, read from the serving gate (DESIGN contract 9).

:func:`decide` maps the current :class:`~leaderwatch.serving.Serving` /
:class:`~leaderwatch.serving.NotServing` value to :class:`Serve`,
:class:`Redirect` (with a :class:`LeaderHint` for the client) or
:class:`NoLeaderYet` (retry with backoff). It never names this node in a hint.
"""

from __future__ import annotations

from leaderwatch._value import FrozenValue
from leaderwatch.hint import LeaderHint, NoLeaderYet
from leaderwatch.serving import NotServing, Serving
from leaderwatch.state import Epoch, parse_endpoint, same_endpoint

__all__ = ["LeaderHint", "NoLeaderYet", "Redirect", "Serve", "decide"]


class Serve(FrozenValue):
    """Serve the request: this node leads at ``epoch`` and is fenced."""

    __match_args__ = ("epoch",)
    epoch: Epoch


class Redirect(FrozenValue):
    """Refuse the request and send the client ``hint`` (another node leads)."""

    __match_args__ = ("hint",)
    hint: LeaderHint


def decide(
    serving: Serving | NotServing, *, self_endpoint: str | None = None
) -> Serve | Redirect | NoLeaderYet:
    """The action for one request, given the gate value ``serving``.

    - ``Serving(e)`` gives ``Serve(epoch=e)``.
    - ``NotServing(ep, e)`` with an endpoint gives ``Redirect`` with
      ``LeaderHint(leader_endpoint=ep, leader_epoch=e)``, unless ``ep`` is
      ``self_endpoint`` (the same host and port however spelled: DNS names
      case-insensitively, IPv6 addresses by value), which gives
      ``NoLeaderYet(leader_epoch=e)``: never redirect to yourself.
    - ``NotServing`` without an endpoint gives ``NoLeaderYet(leader_epoch=e)``.

    ``self_endpoint`` must itself be a valid endpoint (raises
    :class:`~leaderwatch.state.InvalidEndpoint` otherwise), so a typo cannot
    silently let this node redirect to itself.

    Called again with the very same ``serving`` and ``self_endpoint`` objects
    (what a request handler reading ``task.current_gate`` does), it returns
    the previous decision without building anything.
    """
    global _last
    last = _last
    if last[0] is serving and last[1] is self_endpoint:
        return last[2]
    decision = _decide(serving, self_endpoint)
    _last = (serving, self_endpoint, decision)
    return decision


def _decide(
    serving: Serving | NotServing, self_endpoint: str | None
) -> Serve | Redirect | NoLeaderYet:
    if self_endpoint is not None:
        parse_endpoint(self_endpoint)
    match serving:
        case Serving(epoch=epoch):
            return Serve(epoch=epoch)
        case NotServing(leader_endpoint=None, leader_epoch=epoch):
            return NoLeaderYet(leader_epoch=epoch)
        case NotServing(leader_endpoint=str() as endpoint, leader_epoch=epoch):
            if self_endpoint is not None and same_endpoint(endpoint, self_endpoint):
                return NoLeaderYet(leader_epoch=epoch)
            return Redirect(hint=LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch))
    raise TypeError(f"decide() takes Serving or NotServing (got {type(serving).__name__})")


# The last decision and the very objects it was made from: request handlers pass the
# same gate value (and self endpoint) again and again, and a frozen result can be shared.
# One tuple, replaced whole, so concurrent readers never see a torn entry.
_last: tuple[object, object, Serve | Redirect | NoLeaderYet] = (
    object(),
    object(),
    NoLeaderYet(),
)
