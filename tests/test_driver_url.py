"""``driver_from_url``: one URL names an election; a bad URL names the part that is wrong."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leaderwatch
from leaderwatch import Follower, InvalidEndpoint, Leader, LeaderwatchError, Unknown
from leaderwatch.drivers import (
    InvalidElectionURL,
    LocalElectionDriver,
    LocalElectionError,
    driver_from_url,
)
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._url import MAX_URL_LENGTH, OBSERVER_ENDPOINT, _parse, redacted


class _Recorded(DriverBase):
    """Stands in for a driver class: remembers how it was built."""

    def __init__(self, target: str, **options: Any) -> None:
        super().__init__("recorded")
        self.target = target
        self.options = options


@pytest.fixture
def fake_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the etcd and PostgreSQL driver modules by recorders (no client library needed)."""
    for module_name, class_name in (
        ("leaderwatch.drivers.etcd", "EtcdElectionDriver"),
        ("leaderwatch.drivers.postgres", "PostgresElectionDriver"),
    ):
        module = types.ModuleType(module_name)
        setattr(module, class_name, type(class_name, (_Recorded,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)


def built(url: str, **kwargs: Any) -> _Recorded:
    driver = driver_from_url(url, **kwargs)
    assert isinstance(driver, _Recorded)
    return driver


def test_is_exported_from_the_top_level_and_the_drivers_package() -> None:
    assert leaderwatch.driver_from_url is driver_from_url
    assert "driver_from_url" in leaderwatch.__all__
    assert issubclass(InvalidElectionURL, LeaderwatchError)
    assert issubclass(InvalidElectionURL, ValueError)


@pytest.mark.parametrize(
    ("url", "directory", "options"),
    [
        ("local:///var/run/myapp", "/var/run/myapp", {}),
        ("LOCAL:///var/run/my%20app?poll_interval=0.5", "/var/run/my app", {"poll_interval": 0.5}),
        ("local:/var/run/myapp", "/var/run/myapp", {}),
        ("local:relative/dir?poll_interval=2", "relative/dir", {"poll_interval": 2.0}),
    ],
)
def test_local_urls_name_a_directory(url: str, directory: str, options: dict[str, Any]) -> None:
    spec = _parse(url)
    assert (spec.backend, spec.target, dict(spec.options)) == ("local", directory, options)


def test_local_url_builds_a_candidate(tmp_path: Path) -> None:
    driver = driver_from_url(f"local://{tmp_path}/election", node_endpoint="10.0.0.7:9000")
    assert type(driver) is LocalElectionDriver
    assert driver.node_endpoint == "10.0.0.7:9000"
    assert driver.node_id == "10.0.0.7:9000"
    assert driver.campaigning
    assert driver.directory == tmp_path / "election"


def test_local_url_without_endpoint_builds_an_observer(tmp_path: Path) -> None:
    observer = driver_from_url(f"local://{tmp_path}")
    assert isinstance(observer, LocalElectionDriver)
    assert not observer.campaigning
    assert observer.node_endpoint == OBSERVER_ENDPOINT
    assert observer.node_id == f"local-observer:{tmp_path}"
    named = driver_from_url(f"local://{tmp_path}", node_id="watcher")
    assert named.node_id == "watcher"


@pytest.mark.usefixtures("fake_drivers")
def test_overrides_win_over_url_options() -> None:
    driver = built("etcd://h1:2379/myapp?ttl=3&margin=1", ttl=5, strict=True)
    assert driver.options == {
        "tls": False,
        "election": "myapp",
        "ttl": 5,
        "margin": 1.0,
        "strict": True,
        "node_endpoint": None,
    }


def test_etcd_url_builds_the_real_driver() -> None:
    from leaderwatch.drivers import EtcdElectionDriver

    driver = driver_from_url(
        "etcd://127.0.0.1:2379,[::1]:2380/services/my%20app?ttl=3&margin=1&connect_timeout=0.5",
        node_endpoint="127.0.0.1:7001",
    )
    assert isinstance(driver, EtcdElectionDriver)
    assert driver.election == "services/my app"
    assert driver.ttl == 3
    assert driver.margin == 1.0
    assert driver.node_endpoint == "127.0.0.1:7001"
    observer = driver_from_url("etcd://127.0.0.1:2379/myapp")
    assert isinstance(observer, EtcdElectionDriver)
    assert observer.node_endpoint is None


@pytest.mark.usefixtures("fake_drivers")
@pytest.mark.parametrize(
    ("url", "target", "options"),
    [
        (
            "etcd://h1:2379,h2:2379/myapp?ttl=10",
            "h1:2379,h2:2379",
            {"tls": False, "election": "myapp", "ttl": 10},
        ),
        (
            "etcd://h1:2379//rooted/name",
            "h1:2379",
            {"tls": False, "election": "/rooted/name"},
        ),
        (
            "etcds://alice:p%40ss%3Aw@etcd.example:2379/a/b"
            "?ca_cert=/etc/ca.pem&client_cert=/c.pem&client_key=/k.pem&connect_timeout=2",
            "etcd.example:2379",
            {
                "tls": True,
                "username": "alice",
                "password": "p@ss:w",
                "election": "a/b",
                "ca_cert": "/etc/ca.pem",
                "client_cert": "/c.pem",
                "client_key": "/k.pem",
                "connect_timeout": 2.0,
            },
        ),
        (
            "postgres://app@db.example/prod?election=myapp&ttl=10&sslmode=require&schema=lw",
            "postgres://app@db.example/prod?sslmode=require",
            {"election": "myapp", "ttl": 10, "schema": "lw"},
        ),
        (
            "postgresql://app:secret@db:5432/prod?sslmode=verify-full&election=a%2Fb&margin=1.5",
            "postgresql://app:secret@db:5432/prod?sslmode=verify-full",
            {"election": "a/b", "margin": 1.5},
        ),
        (
            "postgres:///prod?host=/var/run/postgresql&election=e",
            "postgres:///prod?host=/var/run/postgresql",
            {"election": "e"},
        ),
    ],
)
def test_lease_backend_urls(url: str, target: str, options: dict[str, Any]) -> None:
    driver = built(url, node_endpoint="10.0.0.7:9000", node_id="n1")
    assert driver.target == target
    assert driver.options == {**options, "node_endpoint": "10.0.0.7:9000", "node_id": "n1"}
    observer = built(url)
    assert observer.options["node_endpoint"] is None


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("", ["scheme: missing", "local://, etcd://, etcds://, postgres://, postgresql://"]),
        ("/var/run/myapp", ["scheme: missing"]),
        ("zookeeper://h:2181/x", ["scheme: 'zookeeper' is unknown", "known schemes: local://"]),
        ("http://h:1/x", ["'http' is unknown"]),
        (
            "local://var/run/myapp",
            ["host: a local election names no host", "local:///var/run/myapp"],
        ),
        ("local://", ["path: missing the election directory"]),
        ("local:///d?poll_interval=0", ["query option 'poll_interval'", "> 0 (got '0')"]),
        ("local:///d?poll_interval=fast", ["query option 'poll_interval'", "(got 'fast')"]),
        ("local:///d?ttl=3", ["query option 'ttl': unknown; allowed: poll_interval"]),
        ("local:///d#frag", ["fragment"]),
        ("local:///my dir", ["whitespace or control characters", "percent-encode"]),
        ("etcd:///myapp", ["endpoints: missing", "etcd://[USER:PASSWORD@]HOST:PORT"]),
        ("etcd://h1:2379", ["election: missing", "the path names it"]),
        ("etcd://h1:2379/", ["election: missing"]),
        ("etcd://h1:2379/myapp/", ["must not end with '/'"]),
        ("etcd://h1/myapp", ["etcd endpoint 'h1'", "missing its port"]),
        ("etcd://h1:99999/myapp", ["etcd endpoint 'h1:99999'", "port must be in 1-65535"]),
        ("etcd://h1:2379,,h2:2379/myapp", ["etcd endpoint ''", "must not be empty"]),
        ("etcd://::1:2379/myapp", ["must be bracketed"]),
        ("etcd://alice@h1:2379/myapp", ["user-info", "USER:PASSWORD@"]),
        ("etcd://h1:2379/myapp?ttl=ten", ["query option 'ttl'", "whole number", "'ten'"]),
        ("etcd://h1:2379/myapp?ttl=1.5", ["query option 'ttl'", "whole number"]),
        ("etcd://h1:2379/myapp?ttl=0", ["query option 'ttl'", ">= 1"]),
        ("etcd://h1:2379/myapp?ttl=3&margin=3", ["query option 'margin'", "(0, ttl=3)"]),
        ("etcd://h1:2379/myapp?margin=nan", ["query option 'margin'", "'nan'"]),
        ("etcd://h1:2379/myapp?tll=3", ["'tll': unknown; allowed: ttl, margin, connect_timeout"]),
        ("etcd://h1:2379/myapp?ttl=3&ttl=4", ["query option 'ttl': given twice"]),
        ("etcd://h1:2379/myapp?ttl", ["query option 'ttl': has no value"]),
        ("etcd://h1:2379/myapp?ca_cert=/ca.pem", ["'ca_cert': needs TLS: use an etcds:// URL"]),
        ("etcds://h1:2379/myapp?client_cert=/c.pem", ["client_cert and client_key"]),
        ("etcds://h1:2379/myapp?ca_cert=", ["'ca_cert': must name a file"]),
        ("postgres://h/db", ["query option 'election': missing", "?election=NAME"]),
        ("postgres://h/db?election=", ["query option 'election': missing"]),
        ("postgres://h/db?election=e&tll=3", ["'tll': unknown", "libpq connection parameter"]),
        ("postgres://h/db?election=e&ttl=x", ["query option 'ttl'", "whole number"]),
        ("postgres://h/db?election=e&schema=", ["query option 'schema'", "must not be empty"]),
        ("postgres://h/db?election=e&election=f", ["query option 'election': given twice"]),
    ],
)
def test_bad_urls_name_the_part_that_is_wrong(url: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidElectionURL) as caught:
        driver_from_url(url, node_endpoint="127.0.0.1:7001")
    message = str(caught.value)
    assert message.startswith(f"invalid election URL {url!r}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_passwords_never_appear_in_errors() -> None:
    for url in (
        "etcd://alice:s3cret@h1/myapp",
        "postgres://app:s3cret@db/prod?election=e&tll=1",
        "postgres://db/prod?password=s3cret&election=e&tll=1",
    ):
        with pytest.raises(InvalidElectionURL) as caught:
            driver_from_url(url)
        assert "s3cret" not in str(caught.value)
        assert "***" in str(caught.value)
    assert redacted("etcds://u:p@h:1/e?x=1") == "etcds://u:***@h:1/e?x=1"
    assert redacted("local:///d") == "local:///d"


def test_a_bad_node_endpoint_is_an_invalid_endpoint(tmp_path: Path) -> None:
    with pytest.raises(InvalidEndpoint, match="must not carry a scheme"):
        driver_from_url(f"local://{tmp_path}", node_endpoint="http://127.0.0.1:7001")
    with pytest.raises(InvalidEndpoint, match="missing its port"):
        driver_from_url("etcd://h1:2379/myapp", node_endpoint="127.0.0.1")


def test_non_string_url_is_refused() -> None:
    with pytest.raises(InvalidElectionURL, match="must be a string"):
        driver_from_url(42)  # type: ignore[arg-type]


def test_missing_driver_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "leaderwatch.drivers.postgres", None)
    with pytest.raises(ImportError, match=r"pip install 'leaderwatch\[postgres\]'"):
        driver_from_url("postgres://db/prod?election=e")


@pytest.mark.anyio
async def test_local_observer_follows_and_never_campaigns(tmp_path: Path) -> None:
    observer = driver_from_url(f"local://{tmp_path}?poll_interval=0.01")
    async with observer:
        assert observer.current == Unknown()
        # The lock is free the whole time, yet the observer never takes it.
        for _ in range(5):
            await anyio.sleep(0.02)
            assert observer.current == Unknown()
        candidate = driver_from_url(
            f"local://{tmp_path}?poll_interval=0.01", node_endpoint="127.0.0.1:7001"
        )
        async with candidate:
            # The first leader of the directory takes epoch 1: the observer never led.
            assert candidate.current == Leader(epoch=1)
            with anyio.fail_after(5):
                await observer.leadership().wait_for(
                    lambda state: (
                        state == Follower(leader_endpoint="127.0.0.1:7001", leader_epoch=1)
                    )
                )
        with anyio.fail_after(5):
            await observer.leadership().wait_for(lambda state: state == Unknown())


@pytest.mark.anyio
async def test_local_observer_of_a_directory_it_may_not_write_reads_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "election"
    url = f"local://{directory}?poll_interval=0.01"
    async with driver_from_url(url, node_endpoint="127.0.0.1:7001") as candidate:
        assert candidate.current == Leader(epoch=1)

        def read_only(path: Path) -> None:  # tests run as root: permissions cannot say no
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("leaderwatch.drivers._local_store.prepare", read_only)
        with pytest.raises(LocalElectionError, match="not usable"):
            driver_from_url(url, node_endpoint="127.0.0.1:7002")  # a candidate must write
        observer = driver_from_url(url)
        async with observer:
            with anyio.fail_after(5):
                await observer.leadership().wait_for(
                    lambda state: (
                        state == Follower(leader_endpoint="127.0.0.1:7001", leader_epoch=1)
                    )
                )
    with pytest.raises(LocalElectionError, match="not usable"):
        driver_from_url(f"local://{tmp_path / 'missing'}")  # nothing to read there either


URL_PIECES = st.sampled_from(
    [
        "local:",
        "etcd:",
        "etcds:",
        "postgres:",
        "postgresql:",
        "LOCAL:",
        "zk:",
        "//",
        "/",
        "@",
        ":",
        "::",
        "[",
        "]",
        "[::1]",
        ",",
        "?",
        "&",
        "=",
        "#",
        "%",
        "%2F",
        "%zz",
        "127.0.0.1",
        "h1",
        "2379",
        "99999",
        "0",
        "ttl",
        "margin",
        "connect_timeout",
        "poll_interval",
        "ca_cert",
        "client_cert",
        "client_key",
        "election",
        "schema",
        "sslmode",
        "password",
        "nan",
        "inf",
        "1e3",
        "-1",
        "1.5",
        " ",
        "\x00",
        "é",
        "\ud800",
    ]
)
URLS = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(URL_PIECES, st.text(max_size=3)), max_size=24).map("".join),
    st.integers(1, 3 * MAX_URL_LENGTH).map(lambda n: "etcd://h1:2379/" + "a" * n),
    st.integers(1, 1 << 20).map(lambda n: "local:///" + "%" * n),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=URLS)
def test_any_text_parses_or_raises_a_short_invalid_election_url(url: str) -> None:
    started = time.perf_counter()
    try:
        spec = _parse(url)
    except InvalidElectionURL as error:
        message = str(error)
        assert message.startswith("invalid election URL ")
        assert len(message) <= 1000
    else:
        assert spec.backend in ("local", "etcd", "postgres")
        assert spec.target
        assert len(url) <= MAX_URL_LENGTH
    assert time.perf_counter() - started < 1.0
