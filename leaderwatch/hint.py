"""Leader hints on the wire: the value a server sends with a redirect (DESIGN contract 9).

A :class:`LeaderHint` names the leader's scheme-less endpoint and its epoch,
each when known. It has two wire forms:

- JSON: ``{"leader_endpoint": "host:port", "leader_epoch": 7}`` (either
  field may be ``null`` or absent; the epoch is a JSON integer);
- headers: ``leader-endpoint: host:port`` and ``leader-epoch: 7`` (unsigned
  decimal, no sign, no whitespace), either header may be absent.

The parsers never raise on wire input: anything malformed comes back as a
:class:`MalformedHint` whose ``rule`` names the rule broken. They run in time
bounded by the limits below, whatever the input size.

This module imports only :mod:`leaderwatch.state`, so clients can use it
without the server side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Final

from pydantic import Field

from leaderwatch._value import FrozenValue
from leaderwatch.state import (
    EPOCH_LIMIT,
    MAX_ENDPOINT_LENGTH,
    Endpoint,
    Epoch,
    InvalidEndpoint,
    parse_endpoint,
)

__all__ = [
    "ENDPOINT_HEADER",
    "EPOCH_HEADER",
    "MALFORMED_HINT_RULES",
    "MAX_EPOCH_DIGITS",
    "MAX_HINT_JSON_LENGTH",
    "LeaderHint",
    "MalformedHint",
    "NoLeaderYet",
    "hint_from_wire",
    "parse_epoch_decimal",
    "parse_hint_headers",
    "parse_hint_json",
]

ENDPOINT_HEADER: Final = "leader-endpoint"
"""Header carrying the leader's scheme-less ``host:port``."""

EPOCH_HEADER: Final = "leader-epoch"
"""Header carrying the leader's epoch as unsigned decimal."""

MAX_EPOCH_DIGITS: Final = len(str(EPOCH_LIMIT - 1))
"""Longest accepted decimal epoch (39 digits: ``2**128 - 1``)."""

MAX_HINT_JSON_LENGTH: Final = 1024
"""Longest accepted JSON hint, in characters (or bytes)."""

MALFORMED_HINT_RULES: Final = (
    "duplicate_header",
    "endpoint_has_scheme",
    "endpoint_invalid",
    "endpoint_not_string",
    "endpoint_too_long",
    "epoch_empty",
    "epoch_not_decimal",
    "epoch_not_integer",
    "epoch_out_of_range",
    "epoch_too_long",
    "header_not_ascii",
    "header_not_text",
    "headers_not_container",
    "headers_not_pairs",
    "json_duplicate_field",
    "json_invalid",
    "json_not_object",
    "json_too_long",
    "json_unknown_field",
)
"""Every :attr:`MalformedHint.rule` the parsers here return (stable names, for counting)."""

_DECIMAL: Final = re.compile(r"[0-9]+")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_FIELDS: Final = frozenset({"leader_endpoint", "leader_epoch"})
_HEADER_NAME_LENGTHS: Final = frozenset({len(ENDPOINT_HEADER), len(EPOCH_HEADER)})


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


class LeaderHint(FrozenValue):
    """Where the leader is, as far as the replying node knows.

    ``leader_endpoint`` follows the core's endpoint rules (scheme-less
    ``host:port``, refused at construction otherwise); ``leader_epoch`` is an
    epoch in ``[0, 2**128)``. Either may be ``None``.
    """

    __match_args__ = ("leader_endpoint", "leader_epoch")
    leader_endpoint: Endpoint | None = None
    leader_epoch: Epoch | None = None

    def to_json(self) -> str:
        """The JSON form; :func:`parse_hint_json` reads it back to an equal hint."""
        return self.model_dump_json()

    def to_headers(self) -> dict[str, str]:
        """The header form, with a header only for each field that is known."""
        headers: dict[str, str] = {}
        if self.leader_endpoint is not None:
            headers[ENDPOINT_HEADER] = self.leader_endpoint
        if self.leader_epoch is not None:
            headers[EPOCH_HEADER] = str(self.leader_epoch)
        return headers


class MalformedHint(FrozenValue):
    """A wire hint that breaks a rule; never raised, always returned.

    ``rule`` is a stable snake_case name of the rule broken (for counting),
    ``reason`` says what was wrong in words. When the only fault is that the
    endpoint carries a scheme (``https://host:port``), ``wire_endpoint`` keeps
    the endpoint as received and ``leader_epoch`` the epoch, which was valid,
    so a client can apply its own transport policy.
    """

    __match_args__ = ("rule", "reason")
    rule: str
    reason: str
    wire_endpoint: str | None = Field(default=None, max_length=MAX_ENDPOINT_LENGTH)
    leader_epoch: Epoch | None = None


class NoLeaderYet(FrozenValue):
    """No leader can be named yet (an election is under way): retry with backoff.

    ``leader_epoch`` is the newest epoch known to the replying node, if any.
    """

    __match_args__ = ("leader_epoch",)
    leader_epoch: Epoch | None = None


def parse_epoch_decimal(text: str) -> int | MalformedHint:
    """Read an unsigned decimal epoch (the header form), or say which rule it breaks.

    Only ASCII digits are accepted: no sign, whitespace, underscores or
    exponent; at most :data:`MAX_EPOCH_DIGITS` digits; value below ``2**128``.
    Leading zeros are accepted.
    """
    if not isinstance(text, str):
        return MalformedHint(
            rule="epoch_not_decimal",
            reason=f"epoch must be a decimal string (got {type(text).__name__})",
        )
    if not text:
        return MalformedHint(rule="epoch_empty", reason="epoch must not be empty")
    if len(text) > MAX_EPOCH_DIGITS:
        return MalformedHint(
            rule="epoch_too_long",
            reason=f"epoch has {len(text)} characters; at most {MAX_EPOCH_DIGITS} digits",
        )
    if not _DECIMAL.fullmatch(text):
        return MalformedHint(
            rule="epoch_not_decimal",
            reason=(
                "epoch must be unsigned ASCII decimal digits, without sign or whitespace "
                f"(got {_shown(text)})"
            ),
        )
    value = int(text)
    if value >= EPOCH_LIMIT:
        return MalformedHint(
            rule="epoch_out_of_range", reason=f"epoch must be below 2**128 (got {text})"
        )
    return value


def _check_epoch(epoch: object) -> int | MalformedHint | None:
    if epoch is None:
        return None
    if isinstance(epoch, str):
        return parse_epoch_decimal(epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return MalformedHint(
            rule="epoch_not_integer",
            reason=f"epoch must be an integer (got {type(epoch).__name__})",
        )
    if not 0 <= epoch < EPOCH_LIMIT:
        return MalformedHint(
            rule="epoch_out_of_range",
            reason="epoch must be in [0, 2**128) (got a value outside it)",
        )
    return epoch


def hint_from_wire(endpoint: object, epoch: object) -> LeaderHint | MalformedHint:
    """Build a hint from raw wire fields, or say which rule they break.

    ``endpoint`` is a string or ``None``; ``epoch`` an ``int``, a decimal
    string (see :func:`parse_epoch_decimal`) or ``None``. The epoch is checked
    first. An endpoint carrying a scheme gives ``rule="endpoint_has_scheme"``
    with the raw endpoint in ``wire_endpoint``.
    """
    checked_epoch = _check_epoch(epoch)
    if isinstance(checked_epoch, MalformedHint):
        return checked_epoch
    if endpoint is None:
        return LeaderHint(leader_epoch=checked_epoch)
    if not isinstance(endpoint, str):
        return MalformedHint(
            rule="endpoint_not_string",
            reason=f"endpoint must be a string (got {type(endpoint).__name__})",
        )
    if len(endpoint) > MAX_ENDPOINT_LENGTH:
        return MalformedHint(
            rule="endpoint_too_long",
            reason=f"endpoint has {len(endpoint)} characters; at most {MAX_ENDPOINT_LENGTH}",
        )
    if _SCHEME.match(endpoint):
        return MalformedHint(
            rule="endpoint_has_scheme",
            reason=f"endpoint must be a scheme-less host:port (got {_shown(endpoint)})",
            wire_endpoint=endpoint,
            leader_epoch=checked_epoch,
        )
    try:
        parse_endpoint(endpoint)
    except InvalidEndpoint as exc:
        return MalformedHint(rule="endpoint_invalid", reason=str(exc))
    return LeaderHint(leader_endpoint=endpoint, leader_epoch=checked_epoch)


def parse_hint_json(text: str | bytes) -> LeaderHint | MalformedHint:
    """Read the JSON form, or say which rule it breaks.

    Accepts an object with at most the fields ``leader_endpoint`` (string or
    ``null``) and ``leader_epoch`` (integer or ``null``); an unknown or
    repeated field, any other JSON, or input longer than
    :data:`MAX_HINT_JSON_LENGTH` is malformed.
    """
    if not isinstance(text, str | bytes):
        return MalformedHint(
            rule="json_invalid", reason=f"hint must be str or bytes (got {type(text).__name__})"
        )
    if len(text) > MAX_HINT_JSON_LENGTH:
        return MalformedHint(
            rule="json_too_long",
            reason=f"hint JSON has {len(text)} characters; at most {MAX_HINT_JSON_LENGTH}",
        )
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        document = json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError) as exc:
        return MalformedHint(rule="json_invalid", reason=f"hint is not valid JSON ({exc})")
    if not isinstance(document, dict):
        return MalformedHint(
            rule="json_not_object",
            reason=f"hint JSON must be an object (got {type(document).__name__})",
        )
    if duplicates:
        return MalformedHint(
            rule="json_duplicate_field",
            reason=f"hint JSON repeats field {_shown(duplicates[0])}",
        )
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        return MalformedHint(
            rule="json_unknown_field",
            reason=f"hint JSON has unknown field {_shown(unknown[0])}; "
            "expected only leader_endpoint and leader_epoch",
        )
    epoch = document.get("leader_epoch")
    if isinstance(epoch, str):
        return MalformedHint(
            rule="epoch_not_integer",
            reason="leader_epoch in JSON must be an integer, not a string",
        )
    return hint_from_wire(document.get("leader_endpoint"), epoch)


def _header_text(value: object, name: str) -> str | MalformedHint:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return MalformedHint(rule="header_not_ascii", reason=f"header {name!r} must be ASCII")
    if isinstance(value, str):
        return value
    return MalformedHint(
        rule="header_not_text",
        reason=f"header {name!r} must be str or bytes (got {type(value).__name__})",
    )


def parse_hint_headers(
    headers: Mapping[str, str | bytes]
    | Mapping[bytes, str | bytes]
    | Iterable[tuple[str | bytes, str | bytes]],
) -> LeaderHint | MalformedHint | None:
    """Read the header form, or say which rule it breaks; ``None`` if neither header is present.

    ``headers`` is a mapping or an iterable of ``(name, value)`` pairs (tuples
    or lists of two; names and values as ``str`` or ASCII ``bytes``); names
    match case-insensitively. A header given twice is malformed, and so is a
    container that is none of these (``headers_not_container``), an item that
    is not a pair (``headers_not_pairs``) or a name that is not text
    (``header_not_text``), whatever header it belongs to.
    """
    if isinstance(headers, Mapping):
        items: Iterable[object] = headers.items()
    elif isinstance(headers, str | bytes | bytearray) or not isinstance(headers, Iterable):
        return MalformedHint(
            rule="headers_not_container",
            reason="headers must be a mapping or an iterable of (name, value) pairs "
            f"(got {type(headers).__name__})",
        )
    else:
        items = headers
    found: dict[str, object] = {}
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            size = f" of {len(item)}" if isinstance(item, tuple | list) else ""
            return MalformedHint(
                rule="headers_not_pairs",
                reason=f"headers must be (name, value) pairs (got a {type(item).__name__}{size})",
            )
        raw_name, value = item
        if isinstance(raw_name, bytes):
            name = raw_name.decode("latin-1")
        elif isinstance(raw_name, str):
            name = raw_name
        else:
            return MalformedHint(
                rule="header_not_text",
                reason=f"header names must be str or bytes (got {type(raw_name).__name__})",
            )
        if len(name) not in _HEADER_NAME_LENGTHS or not name.isascii():
            continue
        name = name.lower()
        if name not in (ENDPOINT_HEADER, EPOCH_HEADER):
            continue
        if name in found:
            return MalformedHint(rule="duplicate_header", reason=f"header {name!r} is repeated")
        found[name] = value
    if not found:
        return None
    fields: dict[str, str | None] = {ENDPOINT_HEADER: None, EPOCH_HEADER: None}
    for name, value in found.items():
        text = _header_text(value, name)
        if isinstance(text, MalformedHint):
            return text
        fields[name] = text
    endpoint = fields[ENDPOINT_HEADER]
    if endpoint == "":
        return MalformedHint(
            rule="endpoint_invalid", reason=f"header {ENDPOINT_HEADER!r} must not be empty"
        )
    return hint_from_wire(endpoint, fields[EPOCH_HEADER])
