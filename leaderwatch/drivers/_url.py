"""One way to name an election: a URL that builds the right driver.

``local:///var/run/myapp``, ``etcd://h1:2379,h2:2379/myapp?ttl=10``,
``etcds://...?ca_cert=...`` and ``postgres://user@host/db?election=myapp``
name the same election in the library (:func:`driver_from_url`), in every
``leaderwatch`` command and in configuration files.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.local import LocalElectionDriver, LocalElectionError
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import InvalidEndpoint, parse_endpoint

__all__ = ["SCHEMES", "InvalidElectionURL", "driver_from_url"]

SCHEMES: Final = ("local", "etcd", "etcds", "postgres", "postgresql")
"""The URL schemes :func:`driver_from_url` knows."""

_FORMS: Final = {
    "local": "local:///path/to/directory[?poll_interval=SECONDS]",
    "etcd": "etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/ELECTION[?ttl=...]",
    "etcds": "etcds://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/ELECTION[?ca_cert=PATH&...]",
    "postgres": "postgres://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE?election=NAME[&ttl=...]",
}
_FORMS["postgresql"] = _FORMS["postgres"].replace("postgres:", "postgresql:", 1)

_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_WHOLE_NUMBER: Final = re.compile(r"[0-9]{1,9}")
_NUMBER: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")

_LOCAL_OPTIONS: Final = ("poll_interval",)
_LEASE_OPTIONS: Final = ("ttl", "margin")
_ETCD_OPTIONS: Final = (*_LEASE_OPTIONS, "connect_timeout")
_TLS_OPTIONS: Final = ("ca_cert", "client_cert", "client_key")
_POSTGRES_OPTIONS: Final = ("election", *_LEASE_OPTIONS, "schema")
# libpq's connection parameters: they stay in the DSN handed to the PostgreSQL driver.
_LIBPQ_PARAMETERS: Final = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "requiressl",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
    }
)

MAX_URL_LENGTH: Final = 4096
"""Longest accepted election URL, in characters."""

OBSERVER_ENDPOINT: Final = "observer.invalid:1"
"""The endpoint a local observer is built with; ``.invalid`` never names a real host."""


class InvalidElectionURL(LeaderwatchError, ValueError):
    """An election URL is malformed; the message names the part that is wrong.

    The URL is quoted with its password hidden.
    """


class _LocalObserver(LocalElectionDriver):
    """Follows a local election without ever campaigning: it never takes the lock.

    It publishes ``Follower(leader_endpoint, leader_epoch)`` while a process
    leads the directory and ``Unknown()`` otherwise. Like a candidate it
    creates the directory and its lock file when it can; a directory that
    exists but that it may not write to is observed read-only.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        poll_interval: float = 0.05,
        node_id: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(
            directory,
            node_endpoint=OBSERVER_ENDPOINT,
            poll_interval=poll_interval,
            node_id=node_id if node_id is not None else f"local-observer:{directory}",
            strict=strict,
        )
        # Off before the first probe on enter, so an observer never takes the lock.
        self._campaigning = False

    def _prepare_directory(self) -> None:
        try:
            super()._prepare_directory()
        except LocalElectionError:
            # Reading the leader's record needs no write access.
            if not (self.directory.is_dir() and os.access(self.directory, os.R_OK | os.X_OK)):
                raise


@dataclass(frozen=True)
class _ElectionSpec:
    """A parsed election URL: which driver, its first argument and its keyword options."""

    scheme: str
    target: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return {"etcds": "etcd", "postgresql": "postgres"}.get(self.scheme, self.scheme)

    def build(self, node_endpoint: str | None, overrides: Mapping[str, Any]) -> DriverBase:
        if node_endpoint is not None:
            parse_endpoint(node_endpoint)
        options = {**self.options, **overrides}
        if self.backend == "local":
            if node_endpoint is None:
                return _LocalObserver(self.target, **options)
            return LocalElectionDriver(self.target, node_endpoint=node_endpoint, **options)
        if self.backend == "etcd":
            factory = _driver_class("leaderwatch.drivers.etcd", "EtcdElectionDriver", "etcd")
        else:
            factory = _driver_class(
                "leaderwatch.drivers.postgres", "PostgresElectionDriver", "postgres"
            )
        driver = factory(self.target, node_endpoint=node_endpoint, **options)
        if not isinstance(driver, DriverBase):
            raise TypeError(f"{factory!r} did not build a driver")
        return driver


def driver_from_url(url: str, *, node_endpoint: str | None = None, **overrides: Any) -> DriverBase:
    """Build the driver an election URL names; not yet entered.

    - ``local:///path/to/dir`` (or ``local:relative/dir``):
      :class:`~leaderwatch.drivers.LocalElectionDriver`; option
      ``poll_interval`` (seconds). Without ``node_endpoint`` the driver only
      observes: it never takes the lock, it publishes ``Follower`` for the
      process that leads and ``Unknown()`` otherwise.
    - ``etcd://[user:password@]h1:2379[,h2:2379...]/ELECTION``:
      :class:`~leaderwatch.drivers.EtcdElectionDriver` on those endpoints
      (tried in order); the path without its leading ``/`` is the election
      name and may contain ``/``. Options ``ttl`` (whole seconds),
      ``margin`` and ``connect_timeout`` (seconds). ``etcds://`` uses TLS
      and adds ``ca_cert``, ``client_cert``, ``client_key`` (file paths).
      User and password are percent-decoded. Without ``node_endpoint`` the
      driver only observes.
    - ``postgres://...`` or ``postgresql://...``: the PostgreSQL driver
      (``pip install 'leaderwatch[postgres]'``); options ``election``
      (required), ``ttl``, ``margin``, ``schema``. Every other query option
      must be a libpq connection parameter and stays in the DSN the driver
      receives, as written; leaderwatch's own options are removed from it.

    ``overrides`` are passed to the driver's constructor and win over the
    URL's options (``node_id=``, ``strict=``, ...). Raises
    :class:`InvalidElectionURL` naming the part of the URL that is wrong,
    :class:`~leaderwatch.InvalidEndpoint` for a bad ``node_endpoint``, and
    ``ImportError`` with an install hint when the driver's extra is missing.
    """
    return _parse(url).build(node_endpoint, overrides)


def _parse(url: str) -> _ElectionSpec:
    """Check an election URL and say which driver it builds, without building it."""
    if not isinstance(url, str):
        raise InvalidElectionURL(f"an election URL must be a string (got {type(url).__name__})")
    if len(url) > MAX_URL_LENGTH:
        raise _bad(url, "URL", f"too long ({len(url)} characters; at most {MAX_URL_LENGTH})")
    for position, char in enumerate(url):
        if char.isspace() or not char.isprintable():
            raise _bad(
                url,
                "URL",
                f"must not contain whitespace or control characters "
                f"(found {char!r} at position {position}); percent-encode it",
            )
    found = _SCHEME.match(url)
    if found is None or found.group(1).lower() not in SCHEMES:
        known = ", ".join(f"{scheme}://" for scheme in SCHEMES)
        if found is None:
            raise _bad(url, "scheme", f"missing; an election URL starts with one of {known}")
        raise _bad(url, "scheme", f"{_shown(found.group(1))} is unknown; known schemes: {known}")
    scheme = found.group(1).lower()
    rest = url[found.end() :]
    if "#" in rest:
        raise _bad(url, "fragment", "an election URL has no '#fragment'; percent-encode '#'")
    rest, _, query = rest.partition("?")
    authority: str | None = None
    path = rest
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        path = slash + path
    if scheme == "local":
        return _parse_local(url, authority, path, query)
    if scheme in ("etcd", "etcds"):
        return _parse_etcd(url, scheme, authority, path, query)
    return _parse_postgres(url, scheme, query)


def _parse_local(url: str, authority: str | None, path: str, query: str) -> _ElectionSpec:
    if authority:
        hint = (
            f"; for the directory {_shown(f'/{authority}{path}')} "
            f"write {_shown(f'local:///{authority}{path}')}"
        )
        raise _bad(url, "host", f"a local election names no host (got {_shown(authority)}){hint}")
    directory = unquote(path)
    if not directory:
        raise _bad(url, "path", f"missing the election directory; expected {_FORMS['local']}")
    options: dict[str, Any] = {}
    for key, value in _query(url, query, _LOCAL_OPTIONS).items():
        options[key] = _seconds(url, key, value)
    return _ElectionSpec("local", directory, options)


def _parse_etcd(
    url: str, scheme: str, authority: str | None, path: str, query: str
) -> _ElectionSpec:
    if not authority:
        raise _bad(url, "endpoints", f"missing; expected {_FORMS[scheme]}")
    userinfo, at, hosts = authority.rpartition("@")
    options: dict[str, Any] = {"tls": scheme == "etcds"}
    if at:
        user, colon, password = userinfo.partition(":")
        if not colon or not user:
            raise _bad(url, "user-info", "etcd authentication needs both: USER:PASSWORD@")
        options["username"] = unquote(user)
        options["password"] = unquote(password)
    endpoints = []
    for host in hosts.split(","):
        try:
            endpoints.append(parse_endpoint(host))
        except InvalidEndpoint as error:
            raise _bad(url, f"etcd endpoint {_shown(host)}", str(error)) from None
    election = unquote(path[1:])
    if not election:
        raise _bad(url, "election", f"missing; the path names it: {_FORMS[scheme]}")
    if election.endswith("/"):
        raise _bad(
            url,
            "election",
            f"must not end with '/' (got {_shown(election)}); drop the trailing slash",
        )
    options["election"] = election
    if scheme == "etcds":
        given = _query(url, query, (*_ETCD_OPTIONS, *_TLS_OPTIONS))
    else:
        needs_tls = dict.fromkeys(_TLS_OPTIONS, "needs TLS: use an etcds:// URL")
        given = _query(url, query, _ETCD_OPTIONS, refused=needs_tls)
    options.update(_lease_options(url, given))
    if "connect_timeout" in given:
        options["connect_timeout"] = _seconds(url, "connect_timeout", given["connect_timeout"])
    for key in _TLS_OPTIONS:
        if key in given:
            if not given[key]:
                raise _bad(url, f"query option {_shown(key)}", "must name a file")
            options[key] = given[key]
    if ("client_cert" in given) != ("client_key" in given):
        raise _bad(url, "query options client_cert and client_key", "must be given together")
    return _ElectionSpec(scheme, ",".join(endpoints), options)


def _parse_postgres(url: str, scheme: str, query: str) -> _ElectionSpec:
    given: dict[str, str] = {}
    kept: list[str] = []
    for key, value, raw in _query_items(url, query):
        if key in _POSTGRES_OPTIONS:
            if key in given:
                raise _bad(url, f"query option {_shown(key)}", "given twice")
            given[key] = value
        elif key in _LIBPQ_PARAMETERS:
            kept.append(raw)
        else:
            raise _bad(
                url,
                f"query option {_shown(key)}",
                f"unknown; leaderwatch's options are {', '.join(_POSTGRES_OPTIONS)}, and any "
                "other option must be a libpq connection parameter (sslmode, connect_timeout, "
                "application_name, ...)",
            )
    election = given.get("election", "")
    if not election:
        raise _bad(
            url,
            "query option 'election'",
            f"missing; the path names the database, the election is ?election=NAME: "
            f"{_FORMS[scheme]}",
        )
    options: dict[str, Any] = {"election": election, **_lease_options(url, given)}
    if "schema" in given:
        if not given["schema"]:
            raise _bad(url, "query option 'schema'", "must not be empty")
        options["schema"] = given["schema"]
    base = url.partition("?")[0]
    dsn = base + ("?" + "&".join(kept) if kept else "")
    return _ElectionSpec(scheme, dsn, options)


def _lease_options(url: str, given: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "ttl" in given:
        text = given["ttl"]
        if not _WHOLE_NUMBER.fullmatch(text):
            raise _bad(
                url, "query option 'ttl'", f"must be a whole number of seconds (got {_shown(text)})"
            )
        options["ttl"] = int(text)
    if "margin" in given:
        options["margin"] = _seconds(url, "margin", given["margin"])
    if options:
        try:
            LeaseTiming.of(options.get("ttl", 10), options.get("margin"))
        except ValueError as error:
            key = "ttl" if str(error).startswith("ttl") else "margin"
            raise _bad(url, f"query option {_shown(key)}", str(error)) from None
    return options


def _seconds(url: str, key: str, text: str) -> float:
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise _bad(
            url,
            f"query option {_shown(key)}",
            f"must be a number of seconds > 0 (got {_shown(text)})",
        )
    return value


def _query_items(url: str, query: str) -> list[tuple[str, str, str]]:
    """``(key, value, raw item)`` for each ``key=value`` of ``query``, percent-decoded."""
    items = []
    for raw in query.split("&"):
        if not raw:
            continue
        key, equals, value = raw.partition("=")
        key = unquote(key)
        if not equals:
            raise _bad(url, f"query option {_shown(key)}", "has no value; write KEY=VALUE")
        items.append((key, unquote(value), raw))
    return items


def _query(
    url: str, query: str, allowed: tuple[str, ...], refused: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The options of ``query``; each must be in ``allowed``, ``refused`` says why one is not."""
    given: dict[str, str] = {}
    for key, value, _ in _query_items(url, query):
        if refused and key in refused:
            raise _bad(url, f"query option {_shown(key)}", refused[key])
        if key not in allowed:
            raise _bad(
                url,
                f"query option {_shown(key)}",
                f"unknown; allowed: {', '.join(allowed)}",
            )
        if key in given:
            raise _bad(url, f"query option {_shown(key)}", "given twice")
        given[key] = value
    return given


def _driver_class(module_name: str, name: str, extra: str) -> Callable[..., object]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{name} is unavailable ({error}); install its dependencies with "
            f"pip install 'leaderwatch[{extra}]'",
            name=error.name,
        ) from error
    factory: Callable[..., object] = getattr(module, name)
    return factory


def _bad(url: str, part: str, problem: str) -> InvalidElectionURL:
    return InvalidElectionURL(
        f"invalid election URL {_shown(redacted(url), 120)}: {part}: {problem}"
    )


def _shown(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut short: messages name what is wrong, they never echo a huge input."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def redacted(url: str) -> str:
    """``url`` with the password of its user-info and of a ``password=`` option hidden."""
    head, separator, rest = url.partition("://")
    if separator:
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        authority = rest[:end]
        userinfo, at, hosts = authority.rpartition("@")
        if at and ":" in userinfo:
            authority = f"{userinfo.partition(':')[0]}:***@{hosts}"
        url = f"{head}://{authority}{rest[end:]}"
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
