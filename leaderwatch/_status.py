"""Ask running services who leads: the client side of ``leader_status_app``'s ``/status``.

Each service answers ``GET <base>/status`` with a JSON object; the keys read
here are ``state`` (a ``LeaderState`` JSON object, e.g. ``{"kind": "leader",
"epoch": 5}``), ``gate`` (``{"kind": "serving", ...}`` or ``"not_serving"``),
``epoch``, ``leader_endpoint`` and ``node_endpoint``. Any of them may be
missing and unknown keys are ignored, so older and newer services can be
asked alike. Uses the standard library's HTTP client only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError

from leaderwatch._value import FrozenValue
from leaderwatch.errors import LeaderwatchError

__all__ = ["InvalidServiceURL", "ServiceStatus", "fetch_statuses", "status_url"]

_MAX_REPLY: Final = 1024 * 1024


class InvalidServiceURL(LeaderwatchError, ValueError):
    """A service URL is not an ``http://`` or ``https://`` base URL; the message says why."""


class ServiceStatus(FrozenValue):
    """What one service reported, or why it could not be asked (``error``)."""

    url: str
    """The ``/status`` URL that was asked."""
    reachable: bool
    """Whether the service answered with a status report."""
    node: str | None = None
    """The service's own endpoint (``node_endpoint``), when it says."""
    role: str | None = None
    """``leader``, ``follower`` or ``unknown`` (the kind of its ``LeaderState``)."""
    epoch: int | None = None
    gate: str | None = None
    """``serving`` or ``not_serving``."""
    leader: str | None = None
    """The leader's endpoint as this service knows it."""
    error: str | None = None


class _StatusReply(BaseModel):
    """The subset of a ``/status`` reply that is read; everything else is ignored."""

    model_config = ConfigDict(extra="ignore")

    state: dict[str, Any] | str | None = None
    gate: dict[str, Any] | str | None = None
    epoch: int | None = None
    leader_endpoint: str | None = None
    node_endpoint: str | None = None


def status_url(base: str) -> str:
    """The ``/status`` URL of a service given by its base URL (``http://`` assumed).

    A URL whose path already ends in ``/status`` is kept as it is. Raises
    :class:`InvalidServiceURL` for another scheme or a URL without a host.
    """
    text = base.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as error:
        raise InvalidServiceURL(f"service URL {base!r} is malformed: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidServiceURL(
            f"service URL {base!r} must use http:// or https:// (got {parts.scheme}://)"
        )
    if not parts.hostname:
        raise InvalidServiceURL(f"service URL {base!r} names no host; expected http://HOST:PORT")
    if parts.query or parts.fragment:
        raise InvalidServiceURL(
            f"service URL {base!r} must not carry a query or fragment; give the base URL"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return parts._replace(path=path).geturl()


def _fetch(url: str, timeout: float) -> ServiceStatus:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            data = reply.read(_MAX_REPLY + 1)
    except urllib.error.HTTPError as error:
        hint = " (is leader_status_app mounted at this path?)" if error.code == 404 else ""
        return ServiceStatus(url=url, reachable=False, error=f"HTTP {error.code}{hint}")
    except urllib.error.URLError as error:
        return ServiceStatus(url=url, reachable=False, error=_reason(error.reason))
    except TimeoutError:
        return ServiceStatus(url=url, reachable=False, error=f"no answer within {timeout:g}s")
    except OSError as error:
        return ServiceStatus(url=url, reachable=False, error=_reason(error))
    if len(data) > _MAX_REPLY:
        return ServiceStatus(url=url, reachable=False, error="reply larger than 1 MiB")
    return _read_reply(url, data)


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "no answer (timed out)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _read_reply(url: str, data: bytes) -> ServiceStatus:
    try:
        body = json.loads(data)
        reply = _StatusReply.model_validate(body)
    except ValueError as error:
        if isinstance(error, ValidationError):
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "reply"
            detail = f"{where}: {first['msg']}"
        else:
            detail = "not JSON"
        return ServiceStatus(
            url=url, reachable=False, error=f"not a leaderwatch status reply ({detail})"
        )
    state = reply.state if isinstance(reply.state, dict) else {"kind": reply.state}
    role = state.get("kind")
    epoch = reply.epoch
    if epoch is None:
        found = state.get("epoch", state.get("leader_epoch"))
        epoch = found if isinstance(found, int) and not isinstance(found, bool) else None
    gate = reply.gate.get("kind") if isinstance(reply.gate, dict) else reply.gate
    leader = reply.leader_endpoint
    if leader is None:
        found = state.get("leader_endpoint")
        leader = found if isinstance(found, str) else None
    if leader is None and role == "leader":
        leader = reply.node_endpoint
    return ServiceStatus(
        url=url,
        reachable=True,
        node=reply.node_endpoint,
        role=role if isinstance(role, str) else None,
        epoch=epoch,
        gate=gate if isinstance(gate, str) else None,
        leader=leader,
    )


async def fetch_statuses(urls: Sequence[str], *, seconds_each: float) -> list[ServiceStatus]:
    """Ask every ``/status`` URL at once; one result per URL, in order.

    Each request gets ``seconds_each`` seconds; a service that fails is reported
    as unreachable with the reason, never raised.
    """
    results: list[ServiceStatus | None] = [None] * len(urls)

    async def ask(index: int, url: str) -> None:
        results[index] = await anyio.to_thread.run_sync(_fetch, url, seconds_each)

    async with anyio.create_task_group() as task_group:
        for index, url in enumerate(urls):
            task_group.start_soon(ask, index, url)
    return [result for result in results if result is not None]
