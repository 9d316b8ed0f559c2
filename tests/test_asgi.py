"""LeaderRedirectMiddleware and leader_status_app: in-process, raw ASGI and httpx.ASGITransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from leaderwatch import LeaderNode, ManualDriver, StaticDriver
from leaderwatch.asgi import (
    RETRY_AFTER_MS_HEADER,
    InvalidMiddlewareConfig,
    LeaderRedirectMiddleware,
    leader_status_app,
)
from leaderwatch.hint import LeaderHint, parse_hint_headers, parse_hint_json
from leaderwatch.serving import BaseLeadershipHandler, NotServing, Serving

pytestmark = pytest.mark.anyio

SELF = "node-a:9000"
B = "node-b:9000"

Scope = dict[str, Any]


class Recorder:
    """A raw ASGI app that records what it was called with and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.release: anyio.Event | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["type"] == "lifespan":
            return
        if self.release is not None:
            await self.release.wait()
        body = json.dumps({"epoch": scope.get("state", {}).get("leader_epoch")}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running(node: LeaderNode) -> AsyncIterator[LeaderNode]:
    async with node:
        yield node


async def gate_is(node: LeaderNode, predicate: Callable[[Serving | NotServing], bool]) -> None:
    with anyio.fail_after(5):
        await node.serving.wait_for(predicate)


def client(app: Any, base_url: str = "http://node-a:9000") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


async def call(app: Any, scope: Scope, incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call an ASGI app directly; returns every message it sent."""
    sent: list[dict[str, Any]] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(path: str = "/", **extra: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
    }
    scope.update(extra)
    return scope


# --- serve ---------------------------------------------------------------------------------


async def test_the_leader_serves_with_the_fencing_token_and_epoch_header() -> None:
    node = LeaderNode(StaticDriver(epoch=7))
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node)
    async with running(node), client(app) as http:
        await gate_is(node, lambda gate: gate == Serving(epoch=7))
        response = await http.post("/tickets?x=1", content=b"body")
    assert response.status_code == 200
    assert response.json() == {"epoch": 7}
    assert response.headers["leader-epoch"] == "7"
    assert inner.scopes[0]["state"]["leader_epoch"] == 7
    assert node.stats.admitted == {7: 1}


async def test_the_state_dict_of_the_server_is_copied_not_shared() -> None:
    node = LeaderNode(StaticDriver(epoch=2))
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node)
    shared = {"db": "pool"}
    async with running(node):
        await gate_is(node, lambda gate: gate == Serving(epoch=2))
        await call(app, http_scope(state=shared), [{"type": "http.request", "body": b""}])
    assert inner.scopes[0]["state"] == {"db": "pool", "leader_epoch": 2}
    assert shared == {"db": "pool"}


async def test_a_request_cancelled_by_the_node_gets_500_never_503() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    inner = Recorder()
    inner.release = anyio.Event()  # never set: the request waits until cancelled
    app = LeaderRedirectMiddleware(inner, node=node)
    async with running(node), client(app) as http, anyio.create_task_group() as tg:
        driver.become_leader(1)
        await gate_is(node, lambda gate: gate == Serving(epoch=1))
        responses: list[httpx.Response] = []

        async def request() -> None:
            responses.append(await http.post("/write", content=b"x"))

        tg.start_soon(request)
        with anyio.fail_after(5):
            while node.stats.in_flight != 1:  # noqa: ASYNC110 - a counter: poll
                await anyio.sleep(0.001)
        driver.become_follower(B, 2)
        with anyio.fail_after(5):
            while not responses:  # noqa: ASYNC110 - poll
                await anyio.sleep(0.001)
    assert responses[0].status_code == 500
    assert responses[0].json()["error"] == "leader_work_cancelled"
    assert parse_hint_headers(responses[0].headers) != parse_hint_headers({})  # epoch header
    assert responses[0].headers["leader-epoch"] == "1"
    assert "leader-endpoint" not in responses[0].headers


# --- redirect ------------------------------------------------------------------------------


async def test_a_follower_redirects_with_307_keeping_method_path_and_query() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node)
    async with running(node), client(app) as http:
        driver.become_follower(B, 4)
        await gate_is(node, lambda gate: gate.leader_endpoint == B)  # type: ignore[union-attr]
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            response = await http.request(
                method, "/a%2Fb/caf%C3%A9?q=1&x=a%20b&q=2", content=b"payload"
            )
            assert response.status_code == 307, method
            assert response.headers["location"] == (
                "http://node-b:9000/a%2Fb/caf%C3%A9?q=1&x=a%20b&q=2"
            )
            assert response.headers["leader-endpoint"] == B
            assert response.headers["leader-epoch"] == "4"
            assert response.headers["cache-control"] == "no-store"
            assert parse_hint_json(response.content) == LeaderHint(
                leader_endpoint=B, leader_epoch=4
            )
            assert parse_hint_headers(response.headers) == LeaderHint(
                leader_endpoint=B, leader_epoch=4
            )
    assert inner.scopes == []  # the app never saw a request it must not serve
    assert node.stats.redirected == 5


async def test_location_uses_the_request_scheme_or_the_configured_one() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    plain = LeaderRedirectMiddleware(Recorder(), node=node)
    forced = LeaderRedirectMiddleware(Recorder(), node=node, scheme="https")
    async with running(node):
        driver.become_follower("[::1]:9443", None)
        await gate_is(node, lambda gate: gate.leader_endpoint == "[::1]:9443")  # type: ignore[union-attr]
        secure = await call(plain, http_scope("/x", scheme="https"), [])
        assert dict(secure[0]["headers"])[b"location"] == b"https://[::1]:9443/x"
        assert b"leader-epoch" not in dict(secure[0]["headers"])  # unknown epoch: no header
        odd = await call(plain, http_scope("/x", scheme="weird"), [])
        assert dict(odd[0]["headers"])[b"location"] == b"http://[::1]:9443/x"
        overridden = await call(forced, http_scope("/x"), [])
        assert dict(overridden[0]["headers"])[b"location"] == b"https://[::1]:9443/x"


async def test_location_never_carries_raw_control_bytes_or_a_foreign_host() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    app = LeaderRedirectMiddleware(Recorder(), node=node)
    async with running(node):
        driver.become_follower(B, 1)
        await gate_is(node, lambda gate: gate.leader_endpoint == B)  # type: ignore[union-attr]
        cases = {
            b"/a b\r\nX: y": b"http://node-b:9000/a%20b%0D%0AX:%20y",
            b"//evil.example/x": b"http://node-b:9000//evil.example/x",
            b"*": b"http://node-b:9000/",
        }
        for raw, expected in cases.items():
            sent = await call(app, http_scope(raw.decode(), raw_path=raw), [])
            assert dict(sent[0]["headers"])[b"location"] == expected, raw
        # Without raw_path the decoded path is percent-encoded again.
        scope = http_scope("/é x", query_string=b"k=v")
        del scope["raw_path"]
        sent = await call(app, scope, [])
        assert dict(sent[0]["headers"])[b"location"] == b"http://node-b:9000/%C3%A9%20x?k=v"


# --- no leader yet -------------------------------------------------------------------------


async def test_no_leader_yet_is_503_with_retry_hints_and_the_known_epoch() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    app = LeaderRedirectMiddleware(Recorder(), node=node, retry_after=0.25)
    async with running(node), client(app) as http:
        first = await http.get("/x")
        assert first.status_code == 503
        assert first.headers["retry-after"] == "1"
        assert first.headers[RETRY_AFTER_MS_HEADER] == "250"
        assert "leader-epoch" not in first.headers
        assert "location" not in first.headers
        assert parse_hint_json(first.content) == LeaderHint()
        driver.become_follower(None, 9)
        await gate_is(node, lambda gate: gate.leader_epoch == 9)  # type: ignore[union-attr]
        second = await http.get("/x")
        assert second.status_code == 503
        assert second.headers["leader-epoch"] == "9"
        assert parse_hint_json(second.content) == LeaderHint(leader_epoch=9)
    slow = LeaderRedirectMiddleware(Recorder(), node=node, retry_after=2.5)
    sent = await call(slow, http_scope(), [])
    headers = dict(sent[0]["headers"])
    assert (headers[b"retry-after"], headers[RETRY_AFTER_MS_HEADER.encode()]) == (b"3", b"2500")


async def test_a_node_whose_fence_still_runs_answers_503_not_a_redirect_to_itself() -> None:
    class SlowFence(BaseLeadershipHandler):
        def __init__(self) -> None:
            self.release = anyio.Event()

        async def on_leader(self, epoch: int) -> None:
            await self.release.wait()

    driver = ManualDriver()
    fence = SlowFence()
    node = LeaderNode(driver, fence, self_endpoint=SELF)
    app = LeaderRedirectMiddleware(Recorder(), node=node)
    async with running(node), client(app) as http:
        driver.become_leader(3)
        await gate_is(node, lambda gate: gate == NotServing(leader_epoch=3))
        response = await http.get("/x")
        assert response.status_code == 503
        assert response.headers["leader-epoch"] == "3"
        assert "location" not in response.headers
        # A stale record naming this very node is no redirect target either.
        driver.become_follower(SELF, 4)
        await gate_is(node, lambda gate: gate.leader_epoch == 4)  # type: ignore[union-attr]
        response = await http.get("/x")
        assert response.status_code == 503
        assert "location" not in response.headers
        fence.release.set()


# --- exempt paths, websockets, lifespan ----------------------------------------------------


async def test_exempt_paths_are_served_on_every_node() -> None:
    node = LeaderNode(ManualDriver())
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node, exempt=("/healthz", "/metrics/"))
    async with running(node), client(app) as http:
        for path in ("/healthz", "/metrics", "/metrics/x/y", "/healthz/"):
            assert (await http.get(path)).status_code == 200, path
        for path in ("/metricsx", "/health", "/"):
            assert (await http.get(path)).status_code == 503, path
    assert all("leader_epoch" not in scope.get("state", {}) for scope in inner.scopes)


async def test_a_websocket_on_a_node_that_does_not_serve_is_closed_with_1013() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver)
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node)
    scope: Scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b""}
    async with running(node):
        driver.become_follower(B, 5)
        await gate_is(node, lambda gate: gate.leader_endpoint == B)  # type: ignore[union-attr]
        sent = await call(app, dict(scope), [{"type": "websocket.connect"}])
        assert [message["type"] for message in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == 1013
        assert parse_hint_json(sent[1]["reason"]) == LeaderHint(leader_endpoint=B, leader_epoch=5)
        assert inner.scopes == []
        driver.become_leader(6)
        await gate_is(node, lambda gate: gate == Serving(epoch=6))
        sent = await call(app, dict(scope), [{"type": "websocket.connect"}])
        assert sent[0]["type"] == "websocket.accept"
        assert (b"leader-epoch", b"6") in sent[0]["headers"]
        assert inner.scopes[0]["state"]["leader_epoch"] == 6


async def test_lifespan_and_unknown_scopes_pass_through() -> None:
    node = LeaderNode(ManualDriver())
    inner = Recorder()
    app = LeaderRedirectMiddleware(inner, node=node)
    await call(app, {"type": "lifespan"}, [])
    await call(app, {"type": "custom"}, [])
    assert [scope["type"] for scope in inner.scopes] == ["lifespan", "custom"]


async def test_middleware_arguments_are_checked() -> None:
    node = LeaderNode(StaticDriver())
    inner = Recorder()
    with pytest.raises(InvalidMiddlewareConfig, match="not one string"):
        LeaderRedirectMiddleware(inner, node=node, exempt="/healthz")
    with pytest.raises(InvalidMiddlewareConfig, match="starting with '/'"):
        LeaderRedirectMiddleware(inner, node=node, exempt=("healthz",))
    with pytest.raises(InvalidMiddlewareConfig, match="retry_after"):
        LeaderRedirectMiddleware(inner, node=node, retry_after=-1)
    with pytest.raises(InvalidMiddlewareConfig, match="scheme"):
        LeaderRedirectMiddleware(inner, node=node, scheme="ftp")
    with pytest.raises(TypeError, match="LeaderNode"):
        LeaderRedirectMiddleware(inner, node=object())  # type: ignore[arg-type]


# --- status app ----------------------------------------------------------------------------


async def test_status_app_reports_on_every_node_and_leader_only_on_the_leader() -> None:
    driver = ManualDriver()
    node = LeaderNode(driver, self_endpoint=SELF)
    status = leader_status_app(node)
    async with running(node), client(status) as http:
        driver.become_follower(B, 2)
        await gate_is(node, lambda gate: gate.leader_endpoint == B)  # type: ignore[union-attr]
        follower = await http.get("/leaderwatch/status")
        assert follower.status_code == 200
        assert follower.json() == {
            "state": "follower",
            "gate": "not_serving",
            "epoch": 2,
            "leader_endpoint": B,
            "node_endpoint": SELF,
        }
        assert (await http.get("/leaderwatch/leader")).status_code == 503
        driver.become_leader(3)
        await gate_is(node, lambda gate: gate == Serving(epoch=3))
        leader = await http.get("/status/")
        assert leader.json() == {
            "state": "leader",
            "gate": "serving",
            "epoch": 3,
            "leader_endpoint": SELF,
            "node_endpoint": SELF,
        }
        assert (await http.get("/leader")).status_code == 200
        head = await http.head("/leader")
        assert (head.status_code, head.content) == (200, b"")
        assert (await http.get("/other")).status_code == 404
        refused = await http.post("/status")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"


# --- Starlette and FastAPI -----------------------------------------------------------------


@asynccontextmanager
async def lifespan_of(app: Any) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan as a server does: startup, then shutdown on exit."""
    to_app_send, to_app = anyio.create_memory_object_stream[dict[str, Any]](2)
    from_app_send, from_app = anyio.create_memory_object_stream[dict[str, Any]](2)

    async def receive() -> dict[str, Any]:
        return await to_app.receive()

    async def send(message: dict[str, Any]) -> None:
        await from_app_send.send(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        await to_app_send.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        yield
        await to_app_send.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


async def post_until_served(http: httpx.AsyncClient, path: str) -> httpx.Response:
    """POST until the gate opened (the fence runs right after start-up)."""
    with anyio.fail_after(5):
        while True:
            response = await http.post(path)
            if response.status_code != 503:
                return response
            await anyio.sleep(0.005)


async def test_starlette_app_with_lifespan_middleware_and_mounted_status() -> None:
    node = LeaderNode(StaticDriver(epoch=11), exit_on_failure=False)

    async def ticket(request: Request) -> JSONResponse:
        return JSONResponse({"epoch": request.state.leader_epoch})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/ticket", ticket, methods=["POST"]),
            Route("/healthz", healthz),
            Mount("/leaderwatch", app=leader_status_app(node)),
        ],
        middleware=[
            Middleware(LeaderRedirectMiddleware, node=node, exempt=("/healthz", "/leaderwatch"))
        ],
        lifespan=node.lifespan,
    )
    async with client(app) as http:
        async with lifespan_of(app):
            response = await post_until_served(http, "/ticket")
            assert response.status_code == 200
            assert response.json() == {"epoch": 11}
            assert response.headers["leader-epoch"] == "11"
            assert (await http.get("/healthz")).text == "ok"
            assert (await http.get("/leaderwatch/leader")).json()["state"] == "leader"
        assert node.gate == NotServing()
        assert (await http.get("/healthz")).text == "ok"
        assert (await http.post("/ticket")).status_code == 503


async def test_fastapi_app_with_add_middleware() -> None:
    from fastapi import FastAPI

    node = LeaderNode(StaticDriver(epoch=12), exit_on_failure=False)
    app = FastAPI(lifespan=node.lifespan)
    app.add_middleware(LeaderRedirectMiddleware, node=node, exempt=("/healthz",))

    @app.post("/tickets")
    async def issue(request: Request) -> dict[str, int]:
        return {"epoch": request.state.leader_epoch}

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    async with client(app) as http:
        async with lifespan_of(app):
            response = await post_until_served(http, "/tickets")
            assert response.status_code == 200
            assert response.json() == {"epoch": 12}
            assert response.headers["leader-epoch"] == "12"
            assert (await http.get("/healthz")).status_code == 200
        assert (await http.post("/tickets")).status_code == 503
