"""httpx transports that send every request to the leader (``pip install 'leaderwatch[http]'``).

:class:`LeaderAwareTransport` (for ``httpx.AsyncClient``) and
:class:`LeaderAwareSyncTransport` (for ``httpx.Client``) wrap an ordinary
httpx transport. For each request they pick an endpoint from a
:class:`~leaderwatch.client.LeaderCache`, put it in the request's URL, and
run the one attempt loop of :mod:`leaderwatch.retry`; this module only
translates between HTTP and the loop's outcomes (DESIGN contracts 9, 10, 12):

- ``307`` with ``leader-endpoint`` / ``leader-epoch`` headers: a redirect,
  judged by ``LeaderCache.classify`` (never followed through httpx's own
  redirect handling, which would bypass the epoch check). A ``307`` without
  those headers is an ordinary response and is returned as is.
- ``503`` with ``leader-retry-after-ms``: no leader yet; retried after that
  many milliseconds (or ``Retry-After`` seconds) or the backoff, whichever
  is longer. A ``503`` without that header is an ordinary response.
- Any other response is served; its ``leader-epoch`` header, when present,
  goes to ``LeaderCache.record_success``.
- Connection errors and timeouts move on to the next endpoint and demote
  the failed one (``LeaderCache.record_failure``).

A request is re-sent freely when nothing of it reached a server. A request
that may have reached one (the connection broke, or the attempt timed out,
after sending) is re-sent only if its method is idempotent or it carries an
``Idempotency-Key`` header (added per logical request with
``idempotency_keys=True``); otherwise the transport gives up with
:class:`LeaderUnavailable` saying so.
"""

from __future__ import annotations

from leaderwatch.errors import LeaderwatchError

try:
    import httpx
except ImportError as _missing:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "leaderwatch.httpx needs httpx, which is not installed: pip install 'leaderwatch[http]'"
    ) from _missing
if not hasattr(httpx, "AsyncBaseTransport"):  # pragma: no cover - a path mistake, not a state
    raise ImportError(
        f"'import httpx' found {getattr(httpx, '__file__', httpx)!r}, not the httpx package: "
        "do not run Python from inside the leaderwatch/ directory"
    )

import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Final, Literal, NamedTuple

import anyio

from leaderwatch._log import get_logger
from leaderwatch.client import LeaderCache
from leaderwatch.hint import (
    EPOCH_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    RETRY_AFTER_MS_HEADER,
    parse_epoch_decimal,
    parse_hint_headers,
)
from leaderwatch.retry import (
    Attempt,
    AttemptPlan,
    AttemptRecord,
    ConnectFailed,
    GaveUp,
    GaveUpError,
    NoLeader,
    Outcome,
    Redirected,
    RetryPolicy,
    SentButNoResponse,
    Served,
    TimedOut,
    error_text,
    run_attempts,
    run_attempts_sync,
)

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "IDEMPOTENT_METHODS",
    "RETRY_AFTER_MS_HEADER",
    "BodyNotReplayable",
    "LeaderAwareSyncTransport",
    "LeaderAwareTransport",
    "LeaderUnavailable",
]

_log = get_logger("leaderwatch.httpx")

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods re-sent after their bytes may have reached a server (idempotent per RFC 9110)."""

_MAX_DRAINED_BODY: Final = 64 * 1024
# A served body up to this size is read within its attempt, so a node that dies
# mid-body costs one attempt (retried when safe) instead of an error to the caller.
_MAX_BUFFERED_BODY: Final = 1024 * 1024
_PHASE_SHARE: Final = 0.9
_MAX_TARGETS: Final = 256


class LeaderUnavailable(GaveUpError, httpx.TransportError):
    """The transport gave up on a request; ``.attempts`` says what each attempt got.

    ``.reason`` is ``deadline_exceeded``, ``max_redirects_exceeded`` or
    ``outcome_unknown`` (the request may have been executed and was not
    re-sent: make it idempotent or send it with an ``Idempotency-Key``).
    An ``httpx.TransportError``, so code that handles httpx's transport
    errors handles this one too.
    """

    def __init__(self, gave_up: GaveUp, *, request: httpx.Request | None = None) -> None:
        message = gave_up.message
        if gave_up.reason == "outcome_unknown" and request is not None:
            message += (
                f". {request.method} is not idempotent: send it with an "
                f"{IDEMPOTENCY_KEY_HEADER} header (or build the transport with "
                "idempotency_keys=True) and deduplicate on the server"
            )
        super().__init__(gave_up, message)
        if request is not None:
            self.request = request


class BodyNotReplayable(LeaderwatchError, httpx.StreamError):
    """A retry needed the request body again, but it was a stream already sent once.

    Nothing was sent twice. Pass the body as bytes (``content=b"..."``,
    ``json=``, ``data=``, seekable files) or call ``request.read()`` before
    sending, so it can be replayed. ``.attempts`` holds the attempts made.
    """

    def __init__(self, message: str, attempts: tuple[AttemptRecord, ...]) -> None:
        super().__init__(message)
        self.attempts = attempts


# --- request bodies -------------------------------------------------------------------------


class _OnceStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A one-shot request stream that remembers whether anything read it."""

    __slots__ = ("started", "stream")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self.stream:
            yield chunk

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        yield from self.stream

    async def aclose(self) -> None:
        if isinstance(self.stream, httpx.AsyncByteStream):
            await self.stream.aclose()

    def close(self) -> None:
        if isinstance(self.stream, httpx.SyncByteStream):
            self.stream.close()


def _replayable(stream: object) -> bool:
    """Whether iterating ``stream`` again yields the same bytes (bytes, seekable multipart)."""
    if isinstance(stream, httpx.ByteStream):
        return True
    fields = getattr(stream, "fields", None)
    if type(stream).__name__ != "MultipartStream" or not isinstance(fields, list):
        return False
    for field in fields:
        file = getattr(field, "file", None)
        if file is None or isinstance(file, str | bytes):
            continue
        seekable = getattr(file, "seekable", None)
        if seekable is None or not seekable():
            return False
    return True


# --- the endpoint in the URL ----------------------------------------------------------------


class _Target:
    """What an endpoint puts into a request: URL parts and the ``Host`` header."""

    __slots__ = ("host_header", "scheme")

    def __init__(self, scheme: str, endpoint: str) -> None:
        url = httpx.URL(f"{scheme}://{endpoint}/")
        self.scheme = url.scheme
        self.host_header = url.netloc.decode("ascii")

    def url(self, original: httpx.URL) -> httpx.URL:
        return httpx.URL(f"{self.scheme}://{self.host_header}{original.raw_path.decode('ascii')}")


_URL_FIELDS: Final = ("scheme", "userinfo", "host", "port", "path", "query", "fragment")


def _fast_url_supported() -> bool:
    """Whether httpx's URL internals are the ones the fast path relies on (checked once)."""
    try:
        reference = httpx.URL("http://u@a:1/p?q=1#f")._uri_reference
        if getattr(type(reference), "_fields", None) != _URL_FIELDS:
            return False
        built = httpx.URL.__new__(httpx.URL)
        built._uri_reference = type(reference)("https", "", "b", 2, "/p", "q=1", None)
        return str(built) == "https://b:2/p?q=1" and built == httpx.URL("https://b:2/p?q=1")
    except Exception:
        return False


_FAST_URL: Final = _fast_url_supported()


class _FastTarget(_Target):
    """The same, swapping the endpoint into httpx's parsed URL instead of parsing again.

    Used only when :func:`_fast_url_supported` confirmed the internals; the
    parts come from a URL httpx itself parsed, so they are normalised.
    """

    __slots__ = ("_host", "_port", "_scheme")

    def __init__(self, scheme: str, endpoint: str) -> None:
        super().__init__(scheme, endpoint)
        reference = httpx.URL(f"{scheme}://{endpoint}/")._uri_reference
        self._scheme: str = reference.scheme
        self._host: str = reference.host
        self._port: int | None = reference.port

    def url(self, original: httpx.URL) -> httpx.URL:
        reference = original._uri_reference
        built = httpx.URL.__new__(httpx.URL)
        built._uri_reference = type(reference)(
            self._scheme, "", self._host, self._port, reference.path or "/", reference.query, None
        )
        return built


# --- shared between the async and the sync transport ----------------------------------------


class _Call(NamedTuple):
    """One logical request across its attempts."""

    request: httpx.Request
    plan: AttemptPlan
    stream: Any
    host_is_url: bool


class _Transport:
    """Configuration and the HTTP-to-outcome translation both transports share."""

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        scheme: str,
        cache: LeaderCache | None,
        policy: RetryPolicy | None,
        idempotency_keys: bool,
        clock: Callable[[], float],
        rng: random.Random | None,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https' (got {scheme!r})")
        tls_required = scheme == "https"
        if cache is None:
            cache = LeaderCache(endpoints, tls_required=tls_required)
        else:
            configured = LeaderCache(endpoints).endpoints  # validates them the same way
            if set(configured) != set(cache.endpoints):
                raise ValueError(
                    f"endpoints {list(configured)} differ from the cache's configured endpoints "
                    f"{list(cache.endpoints)}; pass the same list (or omit the cache)"
                )
            if tls_required and not cache.tls_required:
                raise ValueError(
                    "scheme='https' needs a cache built with tls_required=True, so plaintext "
                    "hints are refused; pass LeaderCache(endpoints, tls_required=True)"
                )
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy (got {type(policy).__name__})")
        self.cache = cache
        self.policy = RetryPolicy() if policy is None else policy
        self.scheme: Literal["http", "https"] = "https" if tls_required else "http"
        self.idempotency_keys = idempotency_keys
        self._clock = clock
        self._rng = rng
        self._targets: dict[str, _Target] = {}
        self._served = Served()

    # One per logical request.

    def call(self, request: httpx.Request) -> _Call:
        """One logical request: its plan, its body; adds its idempotency key if configured to."""
        safe_to_resend = request.method in IDEMPOTENT_METHODS
        if not safe_to_resend:
            safe_to_resend = IDEMPOTENCY_KEY_HEADER in request.headers
            if not safe_to_resend and self.idempotency_keys:
                # On the caller's request (as httpx's auth flows do): response.request shows it.
                request.headers[IDEMPOTENCY_KEY_HEADER] = str(uuid.uuid4())
                safe_to_resend = True
        plan = AttemptPlan(
            self.cache,
            self.policy,
            safe_to_resend=safe_to_resend,
            clock=self._clock,
            rng=self._rng,
        )
        stream = request.stream
        return _Call(
            request,
            plan,
            stream if _replayable(stream) else _OnceStream(stream),
            # The Host header httpx derived from the URL follows the endpoint; one set by
            # the caller (virtual hosting) is kept.
            request.headers.get("host") == request.url.netloc.decode("ascii"),
        )

    # One per attempt.

    def attempt_request(
        self, call: _Call, attempt: Attempt, phase_timeout: float
    ) -> tuple[httpx.Request, dict[str, float | None]]:
        """The request aimed at ``attempt.endpoint``; the timeouts to restore after its head.

        Raises :class:`BodyNotReplayable` if a re-send needs a one-shot body
        that was already read.
        """
        request = call.request
        stream = call.stream
        if stream.__class__ is _OnceStream and stream.started:
            raise BodyNotReplayable(
                f"the request body is a stream that was already sent to an earlier attempt, "
                f"and attempt #{attempt.number} to {attempt.endpoint} needs it again; nothing "
                "was sent twice. Send the body as bytes (content=..., json=..., data=...) or "
                "call request.read() first so it can be replayed",
                call.plan.attempts,
            )
        endpoint = attempt.endpoint
        target = self._targets.get(endpoint)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            target = self._targets[endpoint] = (_FastTarget if _FAST_URL else _Target)(
                self.scheme, endpoint
            )
        extensions = dict(request.extensions)
        given = extensions.get("timeout")
        timeouts: dict[str, float | None] = dict(given) if isinstance(given, dict) else {}
        if phase_timeout < math.inf:  # an infinite attempt_timeout leaves the caller's alone
            for phase in ("connect", "read", "write"):
                value = timeouts.get(phase)
                timeouts[phase] = phase_timeout if value is None else min(value, phase_timeout)
        extensions["timeout"] = timeouts
        restore = {"read": given.get("read") if isinstance(given, dict) else None}
        outgoing = httpx.Request(
            request.method,
            target.url(request.url),
            headers=request.headers,  # copied by httpx.Request
            stream=stream,
            extensions=extensions,
        )
        if call.host_is_url:
            outgoing.headers["Host"] = target.host_header
        return outgoing, restore

    def outcome(self, response: httpx.Response) -> Outcome:
        """What a response means for the plan."""
        status = response.status_code
        if status == 307:
            hint = parse_hint_headers(response.headers.raw)
            if hint is not None:
                return Redirected(hint=hint)
        elif status == 503:
            retry_ms = response.headers.get(RETRY_AFTER_MS_HEADER)
            if retry_ms is not None:
                return NoLeader(
                    retry_after=_retry_after(retry_ms, response.headers.get("retry-after")),
                    epoch=_epoch(response.headers.get(EPOCH_HEADER)),
                )
        epoch = _epoch(response.headers.get(EPOCH_HEADER))
        served = self._served
        if served.epoch != epoch:
            served = self._served = Served(epoch=epoch)
        return served


def _epoch(text: str | None) -> int | None:
    if text is None:
        return None
    epoch = parse_epoch_decimal(text)
    return epoch if isinstance(epoch, int) else None


def _retry_after(milliseconds: str, seconds: str | None) -> float | None:
    """The server's retry-after in seconds: the millisecond header if valid, else Retry-After."""
    for text, scale in ((milliseconds, 1000.0), (seconds, 1.0)):
        if text is not None and text.isascii() and text.isdigit() and len(text) <= 12:
            return int(text) / scale
    return None


def _failure(error: httpx.TransportError) -> Outcome | None:
    """The outcome of a transport error, or ``None`` if it is not the server's doing."""
    if isinstance(error, httpx.ConnectTimeout):
        return TimedOut(sent=False, error=error_text(error))
    if isinstance(error, httpx.ConnectError):
        return ConnectFailed(error=error_text(error))
    if isinstance(error, httpx.ReadTimeout | httpx.WriteTimeout):
        return TimedOut(sent=True, error=error_text(error))
    if isinstance(error, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError):
        return SentButNoResponse(error=error_text(error))
    return None


class LeaderAwareTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncClient`` transport that sends each request to the leader.

    ``endpoints`` are the operator-configured ``host:port`` of every node.
    ``scheme="https"`` requires TLS: the cache is built with
    ``tls_required=True`` and ``http://`` hints are refused; certificates
    must be valid for each endpoint's host, which is also the ``Host``
    header sent (unless the caller set its own). ``cache`` shares a
    :class:`~leaderwatch.client.LeaderCache` (its configured endpoints must
    be ``endpoints``); ``policy`` sets the deadline, per-attempt timeout,
    redirect limit and backoff (:class:`~leaderwatch.retry.RetryPolicy`);
    ``inner`` is the transport that sends each attempt (default
    ``httpx.AsyncHTTPTransport()``; closed with this one).
    ``idempotency_keys=True`` gives every request whose method is not
    idempotent one ``Idempotency-Key`` header, the same on all its attempts
    (a caller's own key is kept), so it may be re-sent safely.

    Each attempt's time (``attempt_timeout``, or what is left of the
    deadline) caps the connect, write and read timeouts the inner transport
    applies until the response head arrives, so a frozen or unreachable
    node costs one attempt and a timeout says whether the request left. A
    served reply with a ``content-length`` of at most 1 MiB is read within
    its attempt, under the same caps, so a reply cut off mid-body is a lost
    response (re-sent only when that is safe), never an error to the caller;
    a larger or unsized body is read later with the caller's own read
    timeout. An inner transport other than ``httpx.AsyncHTTPTransport``
    (which enforces those timeouts itself) is also bounded by one cancel
    scope around each attempt, head and bounded body together, with its
    phase timeouts capped at 90 % of it. ``sleep`` waits between
    attempts and ``clock`` measures the deadline (tests inject both).
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        scheme: Literal["http", "https"] = "http",
        cache: LeaderCache | None = None,
        policy: RetryPolicy | None = None,
        inner: httpx.AsyncBaseTransport | None = None,
        idempotency_keys: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._shared = _Transport(
            endpoints,
            scheme=scheme,
            cache=cache,
            policy=policy,
            idempotency_keys=idempotency_keys,
            clock=clock,
            rng=rng,
        )
        self._inner = httpx.AsyncHTTPTransport() if inner is None else inner
        self._sleep = sleep
        # httpx's own transport enforces the (capped) phase timeouts itself; any other
        # inner transport gets a cancel scope around each attempt.
        self._scoped = not isinstance(self._inner, httpx.AsyncHTTPTransport)

    @property
    def cache(self) -> LeaderCache:
        """The leader cache this transport reads and updates."""
        return self._shared.cache

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy of every request."""
        return self._shared.policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to the leader; raise :class:`LeaderUnavailable` on giving up."""
        shared = self._shared
        call = shared.call(request)
        inner = self._inner
        scoped = self._scoped

        async def send(attempt: Attempt) -> tuple[Outcome, httpx.Response | None]:
            budget = attempt.timeout
            response: httpx.Response | None = None
            outcome: Outcome | None = None  # set once the head and any bounded body are in
            try:
                if scoped:
                    outgoing, restore = shared.attempt_request(call, attempt, budget * _PHASE_SHARE)
                    with anyio.move_on_after(budget):
                        response = await inner.handle_async_request(outgoing)
                        outcome = await _read_served(shared.outcome(response), response)
                else:
                    # The phase timeouts, capped at the budget until restored, bound each read.
                    outgoing, restore = shared.attempt_request(call, attempt, budget)
                    response = await inner.handle_async_request(outgoing)
                    outcome = await _read_served(shared.outcome(response), response)
            except httpx.TransportError as error:
                if response is not None:  # the head came, the body was cut off: a lost reply
                    await response.aclose()
                    return _failure(error) or SentButNoResponse(error=error_text(error)), None
                failed = _failure(error)
                if failed is None:
                    raise
                return failed, None
            if response is None:
                return TimedOut(sent=True, error=f"no response within {budget:.3f} s"), None
            if outcome is None:
                await response.aclose()
                return TimedOut(
                    sent=True, error=f"reply body not complete within {budget:.3f} s"
                ), None
            if isinstance(outcome, Served):
                outgoing.extensions["timeout"].update(restore)
                response.extensions["leaderwatch.endpoint"] = attempt.endpoint
                return outcome, response
            await _release(response, budget)
            return outcome, None

        def gave_up(record: GaveUp) -> LeaderUnavailable:
            return LeaderUnavailable(record, request=request)

        return await run_attempts(call.plan, send, gave_up=gave_up, sleep=self._sleep)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()


def _buffered(response: httpx.Response) -> bool:
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= _MAX_BUFFERED_BODY


async def _read_served(outcome: Outcome, response: httpx.Response) -> Outcome:
    """Read a served body of known, bounded size now, within the attempt; return ``outcome``.

    A body cut off (the node died or froze mid-reply) then fails the attempt
    as a lost response: the request reached the server, so the plan retries
    it only when it is safe to resend. Bodies of unknown or large size
    stream to the caller as usual.
    """
    if isinstance(outcome, Served) and _buffered(response):
        await response.aread()
    return outcome


def _read_within_attempt_sync(response: httpx.Response) -> Outcome | None:
    """:func:`_read_served` for blocking code (the read timeout bounds it)."""
    if not _buffered(response):
        return None
    try:
        response.read()
    except httpx.TransportError as error:
        response.close()
        return _failure(error) or SentButNoResponse(error=error_text(error))
    return None


async def _release(response: httpx.Response, budget: float) -> None:
    """Read a small redirect / no-leader body (so the connection can be reused), then close."""
    try:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= _MAX_DRAINED_BODY:
            with anyio.move_on_after(budget):
                await response.aread()
    except httpx.HTTPError:
        pass  # The outcome is already known; the connection is simply not reused.
    finally:
        await response.aclose()


class LeaderAwareSyncTransport(httpx.BaseTransport):
    """The same for ``httpx.Client``: same plan, same rules, blocking waits.

    Without cancellation in blocking code, ``attempt_timeout`` bounds each
    connect, write and read of an attempt (the inner transport's timeouts
    are capped at the attempt's time), not their sum. ``inner`` defaults to
    ``httpx.HTTPTransport()``. The cache is thread-safe, so one transport
    (or one cache) may serve many threads.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        scheme: Literal["http", "https"] = "http",
        cache: LeaderCache | None = None,
        policy: RetryPolicy | None = None,
        inner: httpx.BaseTransport | None = None,
        idempotency_keys: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._shared = _Transport(
            endpoints,
            scheme=scheme,
            cache=cache,
            policy=policy,
            idempotency_keys=idempotency_keys,
            clock=clock,
            rng=rng,
        )
        self._inner = httpx.HTTPTransport() if inner is None else inner
        self._sleep = sleep

    @property
    def cache(self) -> LeaderCache:
        """The leader cache this transport reads and updates."""
        return self._shared.cache

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy of every request."""
        return self._shared.policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to the leader; raise :class:`LeaderUnavailable` on giving up."""
        shared = self._shared
        call = shared.call(request)
        inner = self._inner

        def send(attempt: Attempt) -> tuple[Outcome, httpx.Response | None]:
            outgoing, restore = shared.attempt_request(call, attempt, attempt.timeout)
            try:
                response = inner.handle_request(outgoing)
            except httpx.TransportError as error:
                outcome = _failure(error)
                if outcome is None:
                    raise
                return outcome, None
            outcome = shared.outcome(response)
            if isinstance(outcome, Served):
                cut = _read_within_attempt_sync(response)
                if cut is not None:
                    return cut, None
                outgoing.extensions["timeout"].update(restore)
                response.extensions["leaderwatch.endpoint"] = attempt.endpoint
                return outcome, response
            _release_sync(response)
            return outcome, None

        def gave_up(record: GaveUp) -> LeaderUnavailable:
            return LeaderUnavailable(record, request=request)

        return run_attempts_sync(call.plan, send, gave_up=gave_up, sleep=self._sleep)

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()


def _release_sync(response: httpx.Response) -> None:
    try:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= _MAX_DRAINED_BODY:
            response.read()
    except httpx.HTTPError:
        pass  # The outcome is already known; the connection is simply not reused.
    finally:
        response.close()
