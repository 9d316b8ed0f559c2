"""Leadership values: who leads, at which epoch (DESIGN contracts 1-3).

Every value here is immutable, hashable, compares by variant *and* payload,
matches with ``match`` keyword patterns, and round-trips through JSON with a
``kind`` discriminator.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from leaderwatch._value import FrozenValue
from leaderwatch.errors import LeaderwatchError

__all__ = [
    "EPOCH_LIMIT",
    "MAX_ENDPOINT_LENGTH",
    "MAX_LEADER_STATE_JSON_LENGTH",
    "Endpoint",
    "Epoch",
    "Follower",
    "InvalidEndpoint",
    "InvalidEpoch",
    "InvalidLeaderState",
    "Leader",
    "LeaderState",
    "Unknown",
    "check_epoch",
    "epoch_from_wire",
    "epoch_to_wire",
    "leader_state_from_json",
    "observed_epoch",
    "parse_endpoint",
    "same_endpoint",
]

EPOCH_LIMIT: Final = 2**128
"""Epochs are integers in ``[0, EPOCH_LIMIT)``."""

_HALF: Final = 2**64

MAX_ENDPOINT_LENGTH: Final = 259
"""Longest accepted endpoint: a 253-character DNS name, ``:`` and a 5-digit port."""

_MAX_DNS_NAME: Final = 253
_DNS_LABEL: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# What WHATWG URL parsers (browsers, and the HTTP stacks that follow them) take
# for a number: a host whose last label is one is parsed as an IPv4 address.
_IPV4_NUMBER: Final = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_SHOWN_INT_BITS: Final = 256

MAX_LEADER_STATE_JSON_LENGTH: Final = 1024
"""Longest accepted JSON form of a leadership value, in characters (or bytes).

The longest value ``model_dump_json()`` writes (a follower with a 259-character
endpoint and a 39-digit epoch) is under 350 characters.
"""


class InvalidEndpoint(LeaderwatchError, ValueError):
    """An endpoint is not a scheme-less ``host:port``; the message names the rule."""


class InvalidEpoch(LeaderwatchError, ValueError):
    """An epoch (or one of its wire halves) is outside its range."""


class InvalidLeaderState(LeaderwatchError, ValidationError):
    """The JSON form of a leadership value is refused; ``errors()`` names each rule broken.

    It is also a ``pydantic.ValidationError`` (hence a ``ValueError``), so
    handlers written for pydantic's error keep working. Rules of its own:
    ``json_too_long`` (over :data:`MAX_LEADER_STATE_JSON_LENGTH`),
    ``json_duplicate_field`` (a key repeated in any object), ``json_type`` (not
    ``str`` or ``bytes``); every other error type is pydantic's.
    """


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _shown_int(value: int) -> str:
    # str() of a huge int is slow, and refused past 4300 digits: show its size instead.
    bits = value.bit_length()
    if bits <= _SHOWN_INT_BITS:
        return str(value)
    return f"{'a negative' if value < 0 else 'an'} integer of {bits} bits"


def parse_endpoint(text: str) -> str:
    """Return ``text`` if it is a scheme-less ``host:port``, else raise.

    Accepted hosts are DNS names, dotted IPv4 addresses and bracketed IPv6
    addresses (``[::1]:9000``); the port is 1-65535. Raises
    :class:`InvalidEndpoint` naming the first rule broken. Runs in time
    bounded by :data:`MAX_ENDPOINT_LENGTH`, whatever the input size.
    """
    if not isinstance(text, str):
        raise InvalidEndpoint(f"endpoint must be a string (got {type(text).__name__})")
    if len(text) > MAX_ENDPOINT_LENGTH:
        raise InvalidEndpoint(
            f"endpoint is too long ({len(text)} characters; at most {MAX_ENDPOINT_LENGTH})"
        )
    if not text:
        raise InvalidEndpoint("endpoint must not be empty; expected host:port")
    scheme = _SCHEME.match(text)
    if scheme is not None:
        bare = text[scheme.end() :].split("/", 1)[0]
        raise InvalidEndpoint(
            f"endpoint must not carry a scheme (got {_shown(text)}); use {_shown(bare)}"
        )
    for position, char in enumerate(text):
        if char.isspace() or not char.isprintable():
            raise InvalidEndpoint(
                "endpoint must not contain whitespace or control characters "
                f"(found {char!r} at position {position} in {_shown(text)})"
            )
    if "@" in text:
        raise InvalidEndpoint(f"endpoint must not carry user-info (got {_shown(text)})")
    if "/" in text:
        raise InvalidEndpoint(f"endpoint must not carry a path (got {_shown(text)})")
    if "?" in text or "#" in text:
        raise InvalidEndpoint(f"endpoint must not carry a query or fragment (got {_shown(text)})")
    _, port = _split_host_port(text)
    _check_port(port, text)
    return text


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise InvalidEndpoint(
                f"endpoint has an unclosed '[' (got {_shown(text)}); expected '[ipv6]:port'"
            )
        address, rest = text[1:close], text[close + 1 :]
        if not rest.startswith(":"):
            raise InvalidEndpoint(
                f"endpoint is missing its port after ']' (got {_shown(text)}); "
                "expected '[ipv6]:port'"
            )
        if "%" in address:
            raise InvalidEndpoint(
                f"endpoint must not carry an IPv6 zone identifier (got {_shown(text)})"
            )
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise InvalidEndpoint(
                f"endpoint has an invalid IPv6 address in brackets (got {_shown(text)})"
            ) from None
        return address, rest[1:]
    if "]" in text:
        raise InvalidEndpoint(f"endpoint has an unmatched ']' (got {_shown(text)})")
    colons = text.count(":")
    if colons == 0:
        raise InvalidEndpoint(
            f"endpoint is missing its port (got {_shown(text)}); expected host:port"
        )
    if colons > 1:
        raise InvalidEndpoint(
            f"an IPv6 endpoint must be bracketed (got {_shown(text)}); expected e.g. '[::1]:9000'"
        )
    host, port = text.split(":")
    _check_host(host, text)
    return host, port


def _check_host(host: str, text: str) -> None:
    if not host:
        raise InvalidEndpoint(f"endpoint host must not be empty (got {_shown(text)})")
    labels = host.split(".")
    last = labels[-2] if len(labels) > 1 and not labels[-1] else labels[-1]
    if _IPV4_NUMBER.fullmatch(last):
        if not _is_canonical_ipv4(host):
            raise InvalidEndpoint(
                "endpoint host ends in a number, so URL parsers read it as an IPv4 address: "
                "write it as a canonical dotted-quad IPv4 address (four decimal numbers "
                "0-255 without leading zeros or trailing dot, e.g. '127.0.0.1') "
                f"(got {_shown(text)})"
            )
        return
    if len(host) > _MAX_DNS_NAME:
        raise InvalidEndpoint(
            f"endpoint host is longer than {_MAX_DNS_NAME} characters (got {_shown(text)})"
        )
    for label in host.split("."):
        if not _DNS_LABEL.fullmatch(label):
            raise InvalidEndpoint(
                "endpoint host must be a DNS name of labels of 1-63 letters, digits, "
                f"'-' or '_', not starting or ending with '-' (got {_shown(text)})"
            )


def _is_canonical_ipv4(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _check_port(port: str, text: str) -> None:
    if not _PORT.fullmatch(port):
        raise InvalidEndpoint(
            "endpoint port must be a decimal number 1-65535 without leading zeros "
            f"(got {_shown(text)})"
        )
    if not 1 <= int(port) <= 65535:
        raise InvalidEndpoint(
            f"endpoint port must be in 1-65535 (got {int(port)} in {_shown(text)})"
        )


def same_endpoint(first: str, second: str) -> bool:
    """Whether two valid endpoints name the same host and port.

    DNS names compare case-insensitively, IPv6 addresses by value
    (``[0:0::1]:9000`` is ``[::1]:9000``) and an IPv4-mapped IPv6 address as
    its IPv4 address (``[::ffff:127.0.0.1]:9000`` is ``127.0.0.1:9000``).
    Raises :class:`InvalidEndpoint` if either is not a valid endpoint.
    """
    return _canonical(parse_endpoint(first)) == _canonical(parse_endpoint(second))


def _canonical(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if host.startswith("["):
        address = ipaddress.IPv6Address(host[1:-1])
        mapped = address.ipv4_mapped
        return (address.compressed if mapped is None else str(mapped)), int(port)
    return host.lower(), int(port)


Endpoint = Annotated[str, Strict(), AfterValidator(parse_endpoint)]
"""A scheme-less ``host:port`` string, validated by :func:`parse_endpoint`."""

Epoch = Annotated[int, Strict(), Field(ge=0, lt=EPOCH_LIMIT)]
"""An integer in ``[0, 2**128)``; strictly an ``int`` (no strings, floats or bools)."""


def check_epoch(epoch: int) -> int:
    """Return ``epoch`` if it is an ``int`` in ``[0, 2**128)``, else raise :class:`InvalidEpoch`."""
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise InvalidEpoch(f"epoch must be an int (got {type(epoch).__name__})")
    if not 0 <= epoch < EPOCH_LIMIT:
        raise InvalidEpoch(f"epoch must be in [0, 2**128) (got {_shown_int(epoch)})")
    return epoch


def epoch_to_wire(epoch: int) -> tuple[int, int]:
    """Split an epoch into unsigned 64-bit halves ``(hi, lo)``.

    Tuple order of the halves equals numeric order of the epochs.
    """
    check_epoch(epoch)
    return epoch >> 64, epoch & (_HALF - 1)


def epoch_from_wire(hi: int, lo: int) -> int:
    """Join unsigned 64-bit halves back into the epoch they encode."""
    for name, half in (("hi", hi), ("lo", lo)):
        if isinstance(half, bool) or not isinstance(half, int):
            raise InvalidEpoch(f"epoch half {name} must be an int (got {type(half).__name__})")
        if not 0 <= half < _HALF:
            raise InvalidEpoch(f"epoch half {name} must be in [0, 2**64) (got {_shown_int(half)})")
    return (hi << 64) | lo


class Leader(FrozenValue):
    """This node is the elected leader at ``epoch``."""

    __match_args__ = ("epoch",)
    kind: Literal["leader"] = Field(default="leader", repr=False)
    epoch: Epoch


class Follower(FrozenValue):
    """This node follows; the leader's endpoint and epoch, each when known.

    ``leader_endpoint`` is refused at construction unless it is a scheme-less
    ``host:port`` (see :func:`parse_endpoint`).
    """

    __match_args__ = ("leader_endpoint", "leader_epoch")
    kind: Literal["follower"] = Field(default="follower", repr=False)
    leader_endpoint: Endpoint | None = None
    leader_epoch: Epoch | None = None


class Unknown(FrozenValue):
    """No leader is currently known (election in progress, partition, ...)."""

    __match_args__ = ()
    kind: Literal["unknown"] = Field(default="unknown", repr=False)


LeaderState = Annotated[Leader | Follower | Unknown, Field(discriminator="kind")]
"""One of :class:`Leader`, :class:`Follower`, :class:`Unknown`."""

_STATE_ADAPTER: TypeAdapter[Leader | Follower | Unknown] = TypeAdapter(LeaderState)


def leader_state_from_json(text: str | bytes) -> Leader | Follower | Unknown:
    """Parse the JSON form written by ``model_dump_json()``.

    Raises :class:`InvalidLeaderState` (a ``pydantic.ValidationError``) for
    input longer than :data:`MAX_LEADER_STATE_JSON_LENGTH` (checked before
    anything is parsed), a key repeated in any object, malformed JSON, an
    unknown ``kind``, extra fields, or a field that breaks its rule. Runs in
    time bounded by that length, whatever the input size.
    """
    if not isinstance(text, str | bytes | bytearray):
        raise _invalid_state(
            "json_type",
            f"leader state JSON must be str or bytes (got {type(text).__name__})",
            type(text).__name__,
        )
    if len(text) > MAX_LEADER_STATE_JSON_LENGTH:
        raise _invalid_state(
            "json_too_long",
            f"leader state JSON has {len(text)} characters; at most "
            f"{MAX_LEADER_STATE_JSON_LENGTH} (model_dump_json() writes far fewer): "
            "this is not a leadership value",
            text[:40],
        )
    duplicate = _repeated_key(text)
    if duplicate is not None:
        raise _invalid_state(
            "json_duplicate_field",
            f"leader state JSON repeats field {_shown(duplicate)}: "
            "each field must appear once, as model_dump_json() writes it",
            text,
        )
    try:
        return _STATE_ADAPTER.validate_json(text)
    except ValidationError as error:
        raise InvalidLeaderState.from_exception_data(
            "LeaderState",
            [
                InitErrorDetails(
                    type=PydanticCustomError(line["type"], line["msg"]),
                    loc=line["loc"],
                    input=line["input"],
                )
                for line in error.errors(include_url=False)
            ],
            input_type="json",
        ) from None


def _invalid_state(rule: str, message: str, shown: object) -> InvalidLeaderState:
    return InvalidLeaderState.from_exception_data(
        "LeaderState",
        [InitErrorDetails(type=PydanticCustomError(rule, message), loc=(), input=shown)],
        input_type="json",
    )


def _repeated_key(text: str | bytes | bytearray) -> str | None:
    """The first key repeated in any object of ``text``; ``None`` if none is (or if not JSON)."""
    repeated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        document = dict(pairs)
        if len(document) != len(pairs) and not repeated:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                    break
                seen.add(key)
        return document

    try:
        json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return None  # Not JSON: the validator names the fault.
    return repeated[0] if repeated else None


def observed_epoch(state: Leader | Follower | Unknown) -> int | None:
    """The epoch a state carries (``Leader.epoch`` or ``Follower.leader_epoch``)."""
    if isinstance(state, Leader):
        return state.epoch
    if isinstance(state, Follower):
        return state.leader_epoch
    return None
