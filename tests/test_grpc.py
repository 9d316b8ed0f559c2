"""leaderwatch.grpc against real grpc.aio servers on loopback, in this process.

The interceptor runs in front of a scripted node (any object with
``decide()`` and ``admit()``); hint-sending servers are plain grpc.aio
servers whose trailers are written by hand. The multi-process cluster tests
(LocalElectionDriver, kill -9, graceful drain) are in test_grpc_cluster.py.

grpc.aio runs on asyncio only and binds process-wide state to the first
event loop it sees, so this module pins asyncio and runs in one loop.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpc
import grpc.aio
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_service import COUNT, WHO, TicketStub, decode, identity, ticket_handler

from leaderwatch.client import LeaderCache
from leaderwatch.errors import LeaderwatchError
from leaderwatch.grpc import (
    HINT_TRAILER,
    IDEMPOTENCY_KEY_METADATA,
    TSORACLE_HINT_TRAILER,
    LeaderChannelPool,
    LeaderInterceptor,
    LeaderUnavailable,
    NotAdmitted,
    PoolClosed,
    current_epoch,
)
from leaderwatch.hint import LeaderHint, NoLeaderYet
from leaderwatch.node import NotLeader
from leaderwatch.redirect import Redirect, Serve
from leaderwatch.retry import GaveUpError, RetryPolicy
from leaderwatch.testing import capture_events

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(
    deadline=2.0, attempt_timeout=1.0, backoff_initial=0.01, backoff_maximum=0.05, jitter=0.0
)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_per_module() -> None:
    """Run every test of this module in one event loop (grpc.aio binds to its first loop)."""


# --- scripted nodes and servers ------------------------------------------------------------------


class ScriptedNode:
    """A node whose decision the test sets; ``admit()`` follows it, as LeaderNode's does."""

    def __init__(self, decision: Serve | Redirect | NoLeaderYet) -> None:
        self.decision = decision
        self.admitted = 0
        self.in_flight = 0
        self.cancel_inside: anyio.CancelScope | None = None
        self.entered = anyio.Event()

    def decide(self) -> Serve | Redirect | NoLeaderYet:
        return self.decision

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[int]:
        decision = self.decision
        if not isinstance(decision, Serve):
            raise NotLeader(decision)
        self.admitted += 1
        self.in_flight += 1
        try:
            with anyio.CancelScope() as scope:
                self.cancel_inside = scope
                self.entered.set()
                yield decision.epoch
            if scope.cancelled_caught:
                raise NotLeader(self.decision, "admitted work was cancelled")
        finally:
            self.in_flight -= 1


class Server:
    """A grpc.aio server on a free loopback port; ``calls`` counts calls that reached it."""

    def __init__(self, server: grpc.aio.Server, endpoint: str) -> None:
        self.server = server
        self.endpoint = endpoint
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, **fields: Any) -> None:
        self.calls.append((kind, fields))


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[grpc.aio.Server] = []

    async def start(
        node: Any = None,
        *,
        handlers: Callable[[Server], list[grpc.GenericRpcHandler]] | None = None,
        tls: tuple[bytes, bytes] | None = None,
        health_status: bool = False,
        **interceptor_options: Any,
    ) -> Server:
        interceptors = [] if node is None else [LeaderInterceptor(node, **interceptor_options)]
        server = grpc.aio.server(interceptors=interceptors)
        if tls is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([tls])
            port = server.add_secure_port("127.0.0.1:0", credentials)
        wrapper = Server(server, f"127.0.0.1:{port}")
        server.add_generic_rpc_handlers(
            handlers(wrapper) if handlers else [ticket_handler(wrapper.endpoint, wrapper.record)]
        )
        if health_status:
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        started.append(server)
        return wrapper

    yield start
    with anyio.CancelScope(shield=True):
        for server in started:
            await server.stop(None)


def hinting(trailers: Callable[[], tuple[tuple[str, Any], ...]]) -> Callable[..., Any]:
    """Handlers answering every Ticket call FAILED_PRECONDITION with ``trailers()``."""

    def handlers(server: Server) -> list[grpc.GenericRpcHandler]:
        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            server.record("refused")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not leader", trailers())
            raise AssertionError("unreachable")

        async def refuse_stream(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            server.record("refused")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not leader", trailers())
            yield b""

        return [
            grpc.method_handlers_generic_handler(
                "leaderwatch.test.Ticket",
                {
                    "Who": grpc.unary_unary_rpc_method_handler(refuse),
                    "Count": grpc.unary_stream_rpc_method_handler(refuse_stream),
                },
            )
        ]

    return handlers


def raw_call(endpoint: str, method: str = WHO) -> Any:
    channel = grpc.aio.insecure_channel(endpoint)
    return channel, channel.unary_unary(method, identity, identity)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the interceptor ---------------------------------------------------------------------------


async def test_follower_answers_failed_precondition_with_text_and_binary_hint(
    servers: Callable[..., Any],
) -> None:
    node = ScriptedNode(
        Redirect(hint=LeaderHint(leader_endpoint="10.0.0.7:50551", leader_epoch=42))
    )
    follower = await servers(node)
    channel, call = raw_call(follower.endpoint)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
    error = caught.value
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    trailers = dict(error.trailing_metadata())
    assert trailers["leader-endpoint"] == "10.0.0.7:50551"
    assert trailers["leader-epoch"] == "42"
    # Written by hand: 0a 0e "10.0.0.7:50551" 12 02 10 2a.
    assert trailers[HINT_TRAILER] == b"\x0a\x0e10.0.0.7:50551\x12\x02\x10\x2a"
    assert TSORACLE_HINT_TRAILER not in trailers
    assert follower.calls == []  # the handler never ran
    assert node.admitted == 0


async def test_tsoracle_compatible_server_also_writes_the_tsoracle_trailer(
    servers: Callable[..., Any],
) -> None:
    node = ScriptedNode(Redirect(hint=LeaderHint(leader_endpoint="a:1", leader_epoch=2**64 + 5)))
    follower = await servers(node, tsoracle_compatible=True)
    channel, call = raw_call(follower.endpoint)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
    trailers = dict(caught.value.trailing_metadata())
    expected = bytes.fromhex("0a 03 61 3a 31 12 04 08 01 10 05")
    assert trailers[HINT_TRAILER] == expected
    assert trailers[TSORACLE_HINT_TRAILER] == expected


async def test_no_leader_yet_is_failed_precondition_without_any_hint(
    servers: Callable[..., Any],
) -> None:
    follower = await servers(ScriptedNode(NoLeaderYet(leader_epoch=3)), tsoracle_compatible=True)
    channel, call = raw_call(follower.endpoint)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    keys = {key for key, _ in caught.value.trailing_metadata()}
    assert not keys & {"leader-endpoint", "leader-epoch", HINT_TRAILER, TSORACLE_HINT_TRAILER}
    assert "no leader yet" in (caught.value.details() or "")


async def test_leader_runs_the_call_inside_admission_with_the_epoch(
    servers: Callable[..., Any],
) -> None:
    node = ScriptedNode(Serve(epoch=9))
    leader = await servers(node)
    channel = grpc.aio.insecure_channel(leader.endpoint)
    async with channel:
        call = channel.unary_unary(WHO, identity, decode)(b"")
        reply = await call
        assert reply["epoch"] == 9  # current_epoch() inside the handler
        # A unary reply carries it in its initial metadata and with its status.
        assert dict(await call.trailing_metadata())["leader-epoch"] == "9"
        assert dict(await call.initial_metadata())["leader-epoch"] == "9"
        stream = channel.unary_stream(COUNT, identity, decode)(b"2")
        replies = [reply async for reply in stream]
        assert [r["epoch"] for r in replies] == [9, 9]
        # A stream carries it before its first message, and with its status.
        assert dict(await stream.initial_metadata())["leader-epoch"] == "9"
        assert dict(await stream.trailing_metadata())["leader-epoch"] == "9"
        # A handler sending its own initial metadata keeps it, with ours added.
        own = channel.unary_unary("/leaderwatch.test.Ticket/Metadata", identity, decode)(b"")
        await own
        metadata = dict(await own.initial_metadata())
        assert metadata["x-handler"] == "yes"
        assert metadata["leader-epoch"] == "9"
    assert node.admitted == 3
    assert node.in_flight == 0


async def test_epoch_only_in_trailers_of_unary_replies_on_request(
    servers: Callable[..., Any],
) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=4)), epoch_in_initial_metadata=False)
    async with grpc.aio.insecure_channel(leader.endpoint) as channel:
        call = channel.unary_unary(WHO, identity, decode)(b"")
        await call
        assert "leader-epoch" not in dict(await call.initial_metadata())
        assert dict(await call.trailing_metadata())["leader-epoch"] == "4"


async def test_handler_trailing_metadata_keeps_the_epoch(servers: Callable[..., Any]) -> None:
    def handlers(server: Server) -> list[grpc.GenericRpcHandler]:
        async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            context.set_trailing_metadata((("x-own", "1"),))
            return b"{}"

        return [
            grpc.method_handlers_generic_handler(
                "leaderwatch.test.Ticket", {"Who": grpc.unary_unary_rpc_method_handler(who)}
            )
        ]

    leader = await servers(ScriptedNode(Serve(epoch=6)), handlers=handlers)
    async with grpc.aio.insecure_channel(leader.endpoint) as channel:
        call = channel.unary_unary(WHO, identity, decode)(b"")
        await call
        trailers = dict(await call.trailing_metadata())
    assert (trailers["x-own"], trailers["leader-epoch"]) == ("1", "6")


async def test_stream_request_methods_are_admitted_too(servers: Callable[..., Any]) -> None:
    node = ScriptedNode(Serve(epoch=4))
    leader = await servers(node)
    async with LeaderChannelPool([leader.endpoint], policy=FAST) as pool:
        stub = pool.stub(TicketStub)
        assert (await stub.Sum(iter([1, 2, 3])))["sum"] == 6
        echoed = [reply async for reply in stub.Echo(iter([7, 8]))]
        assert [(r["value"], r["epoch"]) for r in echoed] == [(7, 4), (8, 4)]
        dead = f"127.0.0.1:{free_port()}"
        node.decision = Redirect(hint=LeaderHint(leader_endpoint=dead, leader_epoch=5))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Sum(iter([1]))
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        # Not retried (a request stream cannot be replayed), but the cache learnt the hint.
        assert pool.cache.cached_leader == (dead, 5)
        # Stream-stream calls too go to the cached leader only (here unreachable).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(iter([1])).read()
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert node.admitted == 2


async def test_exempt_services_and_methods_run_on_every_node(servers: Callable[..., Any]) -> None:
    node = ScriptedNode(NoLeaderYet())
    follower = await servers(node, health_status=True, exempt=("grpc.health.v1.Health", WHO))
    async with grpc.aio.insecure_channel(follower.endpoint) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        answer = await health_stub.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reply = await channel.unary_unary(WHO, identity, decode)(b"")
        assert reply["epoch"] is None  # exempt: not admitted, no epoch
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_stream(COUNT, identity, decode)(b"1").read()
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert node.admitted == 0


async def test_health_service_is_exempt_by_default(servers: Callable[..., Any]) -> None:
    follower = await servers(ScriptedNode(NoLeaderYet()), health_status=True)
    async with grpc.aio.insecure_channel(follower.endpoint) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_cancelled_admitted_call_ends_unavailable_not_failed_precondition(
    servers: Callable[..., Any],
) -> None:
    node = ScriptedNode(Serve(epoch=1))
    leader = await servers(node)
    async with grpc.aio.insecure_channel(leader.endpoint) as channel:
        call = channel.unary_unary("/leaderwatch.test.Ticket/Slow", identity, decode)(b"5000")
        with anyio.fail_after(5):
            await node.entered.wait()
        node.decision = Redirect(hint=LeaderHint(leader_endpoint="b:1", leader_epoch=2))
        assert node.cancel_inside is not None
        node.cancel_inside.cancel()  # the node cancels admitted work (drain timeout passed)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    # May have been partly done: a client must not re-send it as if refused.
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert HINT_TRAILER not in dict(caught.value.trailing_metadata())


async def test_current_epoch_outside_an_admitted_call_raises() -> None:
    with pytest.raises(NotAdmitted, match="LeaderInterceptor") as caught:
        current_epoch()
    assert isinstance(caught.value, LeaderwatchError)
    assert isinstance(caught.value, LookupError)


def test_interceptor_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="LeaderNode"):
        LeaderInterceptor(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one string"):
        LeaderInterceptor(ScriptedNode(NoLeaderYet()), exempt="grpc.health.v1.Health")
    with pytest.raises(ValueError, match="service names"):
        LeaderInterceptor(ScriptedNode(NoLeaderYet()), exempt=("bad name",))


async def test_sync_handlers_are_refused_not_served_on_a_follower(
    servers: Callable[..., Any],
) -> None:
    def handlers(server: Server) -> list[grpc.GenericRpcHandler]:
        def sync_who(request: bytes, context: Any) -> bytes:
            return b"served"

        return [
            grpc.method_handlers_generic_handler(
                "leaderwatch.test.Ticket", {"Who": grpc.unary_unary_rpc_method_handler(sync_who)}
            )
        ]

    with capture_events() as logs:
        leader = await servers(ScriptedNode(Serve(epoch=1)), handlers=handlers)
        channel, call = raw_call(leader.endpoint)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"")
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert any(log["event"] == "grpc_handler_not_async" for log in logs)


# --- the channel pool --------------------------------------------------------------------------


async def test_calls_follow_the_hint_to_the_leader_and_stay_there(
    servers: Callable[..., Any],
) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=7)))
    follower = await servers(
        ScriptedNode(Redirect(hint=LeaderHint(leader_endpoint=leader.endpoint, leader_epoch=7)))
    )
    # Only the follower is configured: the hint carries an epoch, so it is followed.
    async with LeaderChannelPool([follower.endpoint], policy=FAST) as pool:
        stub = pool.stub(TicketStub)
        first = await stub.Who(b"")
        assert (first["endpoint"], first["epoch"]) == (leader.endpoint, 7)
        assert pool.cache.cached_leader == (leader.endpoint, 7)
        for _ in range(3):
            assert (await stub.Who(b""))["endpoint"] == leader.endpoint
        streamed = [reply async for reply in stub.Count(b"2")]
        assert [r["endpoint"] for r in streamed] == [leader.endpoint] * 2
    assert [kind for kind, _ in leader.calls] == ["call"] * 5
    assert follower.calls == []


async def test_unary_stream_follows_a_redirect_before_its_first_message(
    servers: Callable[..., Any],
) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=3)))
    follower = await servers(
        ScriptedNode(Redirect(hint=LeaderHint(leader_endpoint=leader.endpoint, leader_epoch=3)))
    )
    async with LeaderChannelPool([follower.endpoint], policy=FAST) as pool:
        call = pool.unary_stream(COUNT, identity, decode)(b"3")
        replies = [reply async for reply in call]
        assert [r["index"] for r in replies] == [0, 1, 2]
        assert (call.endpoint, call.epoch) == (leader.endpoint, 3)


async def test_unary_stream_is_not_retried_after_its_first_message(
    servers: Callable[..., Any],
) -> None:
    def handlers(server: Server) -> list[grpc.GenericRpcHandler]:
        async def two_then_fail(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            server.record("call")
            yield b'{"index": 0}'
            yield b'{"index": 1}'
            await context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")

        return [
            grpc.method_handlers_generic_handler(
                "leaderwatch.test.Ticket",
                {"Count": grpc.unary_stream_rpc_method_handler(two_then_fail)},
            )
        ]

    server = await servers(handlers=handlers)
    async with LeaderChannelPool([server.endpoint], policy=FAST) as pool:
        got: list[int] = []

        async def read_all() -> None:
            async for reply in pool.unary_stream(COUNT, identity, decode, idempotent=True)(b""):
                got.append(reply["index"])

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
    assert got == [0, 1]
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert not isinstance(caught.value, LeaderwatchError)  # grpc's own error, untouched
    assert len(server.calls) == 1


async def test_other_status_codes_are_raised_untouched(servers: Callable[..., Any]) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=1)))
    async with LeaderChannelPool([leader.endpoint], policy=FAST) as pool:
        stub = pool.stub(TicketStub, idempotent=True)
        for code in ("NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED", "INTERNAL", "ABORTED"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Fail(code.encode())
            assert type(caught.value) is grpc.aio.AioRpcError
            assert caught.value.code() is grpc.StatusCode[code]
            assert dict(caught.value.trailing_metadata())["x-test"] == "1"
    assert len([kind for kind, _ in leader.calls if kind == "call"]) == 0  # Fail records nothing


async def test_no_leader_yet_is_retried_with_backoff_until_a_leader_serves(
    servers: Callable[..., Any],
) -> None:
    node = ScriptedNode(NoLeaderYet())
    server = await servers(node)

    async def elect_later() -> None:
        await anyio.sleep(0.3)
        node.decision = Serve(epoch=2)

    async with (
        LeaderChannelPool([server.endpoint], policy=FAST) as pool,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(elect_later)
        reply = await pool.stub(TicketStub).Who(b"", timeout=3)
    assert reply["epoch"] == 2


async def test_giving_up_raises_a_leaderwatch_error_carrying_the_last_grpc_error(
    servers: Callable[..., Any],
) -> None:
    server = await servers(ScriptedNode(NoLeaderYet(leader_epoch=4)))
    async with LeaderChannelPool([server.endpoint], policy=FAST) as pool:
        started = anyio.current_time()
        with pytest.raises(LeaderUnavailable) as caught:
            await pool.stub(TicketStub).Who(b"", timeout=0.4)
        elapsed = anyio.current_time() - started
    error = caught.value
    assert isinstance(error, LeaderwatchError)
    assert isinstance(error, GaveUpError)
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.reason == "deadline_exceeded"
    assert isinstance(error.last_error, grpc.aio.AioRpcError)
    assert error.last_error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "deadline" in (error.details() or "")
    assert len(error.attempts) >= 2
    assert elapsed < 0.4 + 0.3


async def test_unreachable_endpoints_are_retried_through_the_worklist(
    servers: Callable[..., Any],
) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=1)))
    dead = f"127.0.0.1:{free_port()}"
    async with LeaderChannelPool([dead, leader.endpoint], policy=FAST) as pool:
        pool.cache.compare_and_set_leader(dead, 0)  # the dead node is tried first
        # Nothing reached the dead node, so even a non-idempotent call moves on.
        reply = await pool.stub(TicketStub).Who(b"")
    assert reply["endpoint"] == leader.endpoint
    assert pool.cache.stats.failures >= 1


async def test_unavailable_after_sending_is_retried_only_when_safe(
    servers: Callable[..., Any],
) -> None:
    answers = iter(["UNAVAILABLE", "OK"] * 4)

    def handlers(server: Server) -> list[grpc.GenericRpcHandler]:
        async def flaky(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            server.record("call", key=dict(context.invocation_metadata()).get("idempotency-key"))
            if next(answers) == "UNAVAILABLE":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            return b'{"ok": true}'

        return [
            grpc.method_handlers_generic_handler(
                "leaderwatch.test.Ticket", {"Who": grpc.unary_unary_rpc_method_handler(flaky)}
            )
        ]

    server = await servers(handlers=handlers)
    async with LeaderChannelPool([server.endpoint], policy=FAST) as pool:
        who = pool.unary_unary(WHO, identity, decode)
        with pytest.raises(LeaderUnavailable) as caught:
            await who(b"")
        assert caught.value.reason == "outcome_unknown"
        assert caught.value.last_error is not None
        assert caught.value.last_error.code() is grpc.StatusCode.UNAVAILABLE
        next(answers)  # the server's OK for that call was never asked for
        assert await pool.unary_unary(WHO, identity, decode, idempotent=True)(b"") == {"ok": True}
        keyed = await who(b"", metadata=((IDEMPOTENCY_KEY_METADATA, "k-1"),))
        assert keyed == {"ok": True}
    async with LeaderChannelPool([server.endpoint], policy=FAST, idempotency_keys=True) as pool:
        assert await pool.unary_unary(WHO, identity, decode)(b"") == {"ok": True}
    keys = [fields["key"] for _, fields in server.calls]
    assert keys[:5] == [None, None, None, "k-1", "k-1"]
    assert keys[5] is not None
    assert keys[5] == keys[6]  # one generated key, on both attempts


async def test_served_epoch_seats_the_cache(servers: Callable[..., Any]) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=12)))
    other = await servers(ScriptedNode(NoLeaderYet()))
    cache = LeaderCache([other.endpoint, leader.endpoint])
    async with LeaderChannelPool([other.endpoint, leader.endpoint], cache=cache) as pool:
        await pool.stub(TicketStub).Who(b"", timeout=2)
    assert cache.cached_leader == (leader.endpoint, 12)


async def test_a_stale_hint_is_ignored(servers: Callable[..., Any]) -> None:
    decoy = await servers(ScriptedNode(Serve(epoch=99)))  # must never be called
    node = ScriptedNode(Serve(epoch=10))
    leader = await servers(node)
    stale = await servers(
        ScriptedNode(Redirect(hint=LeaderHint(leader_endpoint=decoy.endpoint, leader_epoch=3)))
    )
    async with LeaderChannelPool([leader.endpoint, stale.endpoint], policy=FAST) as pool:
        stub = pool.stub(TicketStub)
        pool.cache.record_success(leader.endpoint, 10)  # the client knows the leader at 10
        assert (await stub.Who(b""))["epoch"] == 10
        node.decision = NoLeaderYet(leader_epoch=10)  # an election: the client asks around

        async def elect_again() -> None:
            await anyio.sleep(0.3)
            node.decision = Serve(epoch=11)

        async with anyio.create_task_group() as tg:
            tg.start_soon(elect_again)
            reply = await stub.Who(b"", timeout=3)
        assert (reply["endpoint"], reply["epoch"]) == (leader.endpoint, 11)
        assert pool.cache.stats.refused.get("epoch_below_cached", 0) >= 1
        assert decoy.endpoint not in pool.open_endpoints
    assert decoy.calls == []
    assert stale.calls == []  # refused by its interceptor before any handler


async def test_a_tsoracle_trailer_alone_is_followed(servers: Callable[..., Any]) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=5)))
    encoded_endpoint = leader.endpoint.encode()
    # tsoracle.v1.LeaderHint{leader_endpoint, leader_epoch{lo: 5}}, by hand.
    trailer = bytes([0x0A, len(encoded_endpoint)]) + encoded_endpoint + bytes.fromhex("12021005")
    tsoracle = await servers(handlers=hinting(lambda: ((TSORACLE_HINT_TRAILER, trailer),)))
    async with LeaderChannelPool([tsoracle.endpoint], policy=FAST) as pool:
        reply = await pool.stub(TicketStub).Who(b"")
    assert reply["endpoint"] == leader.endpoint
    assert pool.cache.cached_leader == (leader.endpoint, 5)
    assert [kind for kind, _ in tsoracle.calls] == ["refused"]


async def test_text_trailers_alone_are_followed(servers: Callable[..., Any]) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=5)))
    hinter = await servers(
        handlers=hinting(lambda: (("leader-endpoint", leader.endpoint), ("leader-epoch", "5")))
    )
    async with LeaderChannelPool([hinter.endpoint], policy=FAST) as pool:
        assert (await pool.stub(TicketStub).Who(b""))["endpoint"] == leader.endpoint


async def test_a_malformed_hint_is_rejected_not_followed(servers: Callable[..., Any]) -> None:
    hinter = await servers(handlers=hinting(lambda: ((HINT_TRAILER, b"\x0a\x05a:1"),)))
    async with LeaderChannelPool([hinter.endpoint], policy=FAST) as pool:
        with pytest.raises(LeaderUnavailable):
            await pool.stub(TicketStub).Who(b"", timeout=0.3)
        assert pool.cache.stats.rejected.get("binary_truncated", 0) >= 1
        assert pool.open_endpoints == (hinter.endpoint,)


@pytest.fixture(scope="module")
def tls() -> tuple[trustme.CA, tuple[bytes, bytes]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return ca, (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())


async def test_plaintext_hint_under_tls_is_refused_and_https_hint_followed(
    servers: Callable[..., Any], tls: tuple[trustme.CA, tuple[bytes, bytes]]
) -> None:
    ca, key_and_cert = tls
    plaintext = await servers(ScriptedNode(Serve(epoch=50)))  # would serve, if reached
    secure_leader = await servers(ScriptedNode(Serve(epoch=51)), tls=key_and_cert)

    def hint_to(url: str, epoch: int) -> tuple[tuple[str, Any], ...]:
        raw = url.encode()
        binary = bytes([0x0A, len(raw)]) + raw + bytes([0x12, 0x02, 0x10, epoch])
        return ((HINT_TRAILER, binary), ("leader-endpoint", url), ("leader-epoch", str(epoch)))

    downgrade = await servers(
        handlers=hinting(lambda: hint_to(f"http://{plaintext.endpoint}", 50)), tls=key_and_cert
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    with capture_events() as logs:
        async with LeaderChannelPool(
            [downgrade.endpoint], credentials=credentials, policy=FAST
        ) as pool:
            assert pool.cache.tls_required
            with pytest.raises(LeaderUnavailable) as caught:
                await pool.stub(TicketStub).Who(b"", timeout=0.5)
            assert pool.cache.stats.rejected.get("plaintext_downgrade", 0) >= 1
            assert plaintext.endpoint not in pool.open_endpoints
    assert plaintext.calls == []
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert any(
        log["event"] == "leader_hint_rejected" and log["rule"] == "plaintext_downgrade"
        for log in logs
    )
    upgrade = await servers(
        handlers=hinting(lambda: hint_to(f"https://{secure_leader.endpoint}", 51)),
        tls=key_and_cert,
    )
    async with LeaderChannelPool([upgrade.endpoint], credentials=credentials, policy=FAST) as pool:
        reply = await pool.stub(TicketStub).Who(b"")
    assert (reply["endpoint"], reply["epoch"]) == (secure_leader.endpoint, 51)


async def test_decoy_hints_do_not_grow_channels_beyond_the_cap(
    servers: Callable[..., Any],
) -> None:
    decoys = iter(range(1, 10_000))
    cap = 3

    def next_decoy() -> tuple[tuple[str, Any], ...]:
        epoch = next(decoys)
        # A distinct, higher-epoch endpoint each time: each one is followed, none answers.
        return tuple(
            LeaderHint(
                leader_endpoint=f"127.0.0.{1 + epoch % 250}:{free_port()}", leader_epoch=epoch
            )
            .to_headers()
            .items()
        )

    hinter = await servers(handlers=hinting(next_decoy))
    policy = RetryPolicy(
        deadline=1.0, attempt_timeout=0.5, max_redirects=1000, backoff_initial=0.001,
        backoff_maximum=0.005, jitter=0.0,
    )  # fmt: skip
    async with LeaderChannelPool([hinter.endpoint], policy=policy, max_hint_channels=cap) as pool:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                hinted = [e for e in pool.open_endpoints if e != hinter.endpoint]
                peak = max(peak, len(hinted))
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for _ in range(3):
                with pytest.raises(LeaderUnavailable):
                    await pool.stub(TicketStub).Who(b"")
            tg.cancel_scope.cancel()
        followed = len(hinter.calls)
        assert followed > 3 * cap  # many decoys were followed...
        assert pool.channels_opened > 3 * cap
        assert pool.channels_evicted >= pool.channels_opened - 1 - cap - 1
        hinted = [e for e in pool.open_endpoints if e != hinter.endpoint]
        assert len(hinted) <= cap  # ...yet at most `cap` hint-only channels stay open
        assert peak <= cap + 1  # the one being called may briefly be the cap's +1
    assert pool.open_endpoints == ()


async def test_pool_closes_its_channels_and_refuses_calls_after(
    servers: Callable[..., Any],
) -> None:
    leader = await servers(ScriptedNode(Serve(epoch=1)))
    pool = LeaderChannelPool([leader.endpoint])
    async with pool:
        stub = pool.stub(TicketStub)
        await stub.Who(b"")
        assert pool.open_endpoints == (leader.endpoint,)
    assert pool.open_endpoints == ()
    with pytest.raises(PoolClosed):
        await stub.Who(b"")
    await pool.close()  # idempotent


def test_pool_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="not one string"):
        LeaderChannelPool("a:1")
    with pytest.raises(ValueError, match="differ"):
        LeaderChannelPool(["a:1"], cache=LeaderCache(["b:1"]))
    credentials = grpc.ssl_channel_credentials()
    with pytest.raises(ValueError, match="tls_required"):
        LeaderChannelPool(["a:1"], credentials=credentials, cache=LeaderCache(["a:1"]))
    with pytest.raises(ValueError, match="max_hint_channels"):
        LeaderChannelPool(["a:1"], max_hint_channels=0)
    with pytest.raises(TypeError, match="RetryPolicy"):
        LeaderChannelPool(["a:1"], policy={"deadline": 1})  # type: ignore[arg-type]


def test_import_without_grpcio_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["grpc"] = None
        try:
            import leaderwatch.grpc
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'leaderwatch[grpc]'" in result.stdout


async def test_followers_pointing_at_a_draining_leader_do_not_use_up_redirects(
    servers: Callable[..., Any],
) -> None:
    draining = ScriptedNode(NoLeaderYet(leader_epoch=5))  # stepping down: refuses new calls
    successor = ScriptedNode(NoLeaderYet(leader_epoch=5))
    old = await servers(draining)
    new = await servers(successor)
    to_old = Redirect(hint=LeaderHint(leader_endpoint=old.endpoint, leader_epoch=5))
    follower_nodes = [ScriptedNode(to_old), ScriptedNode(to_old)]
    followers = [await servers(node) for node in follower_nodes]
    policy = FAST.model_copy(update={"max_redirects": 2})
    endpoints = [old.endpoint, new.endpoint, *(f.endpoint for f in followers)]
    async with LeaderChannelPool(endpoints, policy=policy) as pool:
        pool.cache.record_success(old.endpoint, 5)

        async def elect() -> None:
            await anyio.sleep(0.4)  # followers point at the old leader all this time
            successor.decision = Serve(epoch=6)
            for node in follower_nodes:
                node.decision = Redirect(
                    hint=LeaderHint(leader_endpoint=new.endpoint, leader_epoch=6)
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(elect)
            reply = await pool.stub(TicketStub).Who(b"", timeout=3)
    assert (reply["endpoint"], reply["epoch"]) == (new.endpoint, 6)
