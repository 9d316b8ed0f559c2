"""Shared test configuration.

Every anyio test runs on asyncio and on trio unless its module says
otherwise. The etcd tests share one real etcd server per session, the
PostgreSQL tests one real PostgreSQL server; a missing binary fails them, it
never skips them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from etcd_server import EtcdNotFound, EtcdServer, etcd_server, find_etcd
from pg_server import PostgresNotFound, PostgresServer, find_pg_bin, pg_server

SUMMARY_LINES = pytest.StashKey[list[str]]()
"""Lines a test module adds to the terminal summary (the fuzz module's case count)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The grpc.aio modules keep one event loop per module through an autouse async
    # fixture; their few synchronous tests must not request it (pytest refuses a sync
    # test that depends on an async fixture, which shows when such a test runs alone).
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and not inspect.iscoroutinefunction(item.obj)
            and "one_event_loop_per_module" in item.fixturenames
        ):
            item.fixturenames.remove("one_event_loop_per_module")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in terminalreporter.config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def _shared_etcd() -> Iterator[EtcdServer]:
    try:
        find_etcd()
    except EtcdNotFound as error:
        pytest.fail(f"these tests need a real etcd server: {error}")
    with etcd_server() as server:
        yield server


@pytest.fixture
def etcd(_shared_etcd: EtcdServer) -> Iterator[EtcdServer]:
    """The session's etcd server, checked alive before and after each test.

    An etcd that died during a test fails that test with etcd's own log, and
    is started again (same ports, same data) so later tests are not blamed.
    """
    server = _shared_etcd
    if server.process.poll() is not None:
        server.start()
    yield server
    code = server.process.poll()
    if code is not None:
        log = server.log_tail(60)
        server.start()
        pytest.fail(f"the shared etcd server died during this test (exit {code}); its log:\n{log}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        find_pg_bin()
    except PostgresNotFound as error:
        pytest.fail(f"these tests need a real PostgreSQL server: {error}")
    with pg_server() as server:
        yield server
