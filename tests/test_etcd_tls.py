"""The etcd driver and the CLI against a real etcd that serves clients over TLS only.

Certificates come from trustme: a test CA, a server certificate for
127.0.0.1, and a client certificate for the mutual-TLS server.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import anyio
import pytest
import trustme
from etcd_server import EtcdNotFound, EtcdServer, EtcdTLS, etcd_server, find_etcd

from leaderwatch.drivers.etcd import EtcdElectionDriver, EtcdUnavailable
from leaderwatch.state import Leader

pytestmark = pytest.mark.anyio

NODE = "127.0.0.1:7501"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_per_module() -> None:
    """Run every test of this module in one event loop (grpc.aio binds to its first loop)."""


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CA, the server's certificate and key, and a client's certificate and key."""
    directory = tmp_path_factory.mktemp("etcd-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("leaderwatch-client@example.com")
    paths = {
        name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key", "ccert", "ckey")
    }
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client.cert_chain_pems[0].write_to_path(paths["ccert"])
    client.private_key_pem.write_to_path(paths["ckey"])
    return paths


def _server(pems: dict[str, str], *, mutual: bool) -> Iterator[EtcdServer]:
    try:
        find_etcd()
    except EtcdNotFound as error:  # a failure, never a skip
        pytest.fail(f"these tests need a real etcd server: {error}")
    tls = EtcdTLS(
        pems["ca"],
        pems["cert"],
        pems["key"],
        client_cert_auth=mutual,
        client_cert=pems["ccert"] if mutual else None,
        client_key=pems["ckey"] if mutual else None,
    )
    with etcd_server(tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def tls_etcd(pems: dict[str, str]) -> Iterator[EtcdServer]:
    """etcd over TLS: clients verify the server."""
    yield from _server(pems, mutual=False)


@pytest.fixture(scope="module")
def mtls_etcd(pems: dict[str, str]) -> Iterator[EtcdServer]:
    """etcd over mutual TLS: the server also requires a client certificate from the CA."""
    yield from _server(pems, mutual=True)


@contextlib.asynccontextmanager
async def leading(driver: EtcdElectionDriver) -> AsyncIterator[Leader]:
    """Enter ``driver`` and wait (10 s at most) until it leads; yield its state."""
    async with driver:
        with anyio.fail_after(10):
            state = await driver.leadership().wait_for(lambda state: isinstance(state, Leader))
        assert isinstance(state, Leader)
        yield state


def mutual_tls_candidate(
    server: EtcdServer, election: str, pems: dict[str, str]
) -> EtcdElectionDriver:
    """A candidate presenting the client certificate, trusting the test CA."""
    return EtcdElectionDriver(
        server.endpoint,
        election=election,
        node_endpoint=NODE,
        ttl=2,
        ca_cert=pems["ca"],
        client_cert=pems["ccert"],
        client_key=pems["ckey"],
    )


async def test_a_candidate_leads_over_tls_when_it_trusts_the_ca(
    tls_etcd: EtcdServer, pems: dict[str, str]
) -> None:
    election = f"tls-{uuid.uuid4().hex[:8]}"
    driver = EtcdElectionDriver(
        tls_etcd.endpoint, election=election, node_endpoint=NODE, ttl=2, ca_cert=pems["ca"]
    )
    async with leading(driver) as state:
        # What etcd holds is the recipe's key, read back over TLS by etcdctl.
        (key,) = tls_etcd.keys(election + "/")
    assert (key.value, key.create_revision) == (NODE, state.epoch)


async def test_a_server_certificate_from_an_unknown_ca_fails_start_up_clearly(
    tls_etcd: EtcdServer,
) -> None:
    # tls=True trusts the system roots only: the test CA is not among them.
    driver = EtcdElectionDriver(tls_etcd.endpoint, election="e", tls=True, connect_timeout=2)
    with pytest.raises(EtcdUnavailable, match=tls_etcd.endpoint) as refused:
        async with driver:
            pass
    assert "ca_cert" in str(refused.value)


async def test_mutual_tls_needs_the_client_certificate(
    mtls_etcd: EtcdServer, pems: dict[str, str]
) -> None:
    election = f"mtls-{uuid.uuid4().hex[:8]}"
    without = EtcdElectionDriver(
        mtls_etcd.endpoint, election=election, ca_cert=pems["ca"], connect_timeout=2
    )
    with pytest.raises(EtcdUnavailable, match=mtls_etcd.endpoint):
        async with without:
            pass
    driver = mutual_tls_candidate(mtls_etcd, election, pems)
    async with leading(driver) as state:
        assert state.epoch > 0


async def test_the_cli_observes_an_etcds_url_over_mutual_tls(
    mtls_etcd: EtcdServer, pems: dict[str, str]
) -> None:
    election = f"cli-{uuid.uuid4().hex[:8]}"
    driver = mutual_tls_candidate(mtls_etcd, election, pems)
    query = "&".join(
        f"{name}={quote(pems[key], safe='')}"
        for name, key in (("ca_cert", "ca"), ("client_cert", "ccert"), ("client_key", "ckey"))
    )
    url = f"etcds://{mtls_etcd.endpoint}/{election}?{query}"
    async with leading(driver) as leader:
        observed = await anyio.run_process(
            [sys.executable, "-m", "leaderwatch", "observe", url, "--once", "--format", "json"],
            check=False,
        )
    assert observed.returncode == 0, observed.stderr.decode()
    (line,) = observed.stdout.decode().splitlines()
    assert json.loads(line)["state"] == {
        "kind": "follower",
        "leader_endpoint": NODE,
        "leader_epoch": leader.epoch,
    }
    # Without the client certificate the same URL is refused with a one-line error.
    ca_only = f"connect_timeout=2&ca_cert={quote(pems['ca'], safe='')}"
    bare = f"etcds://{mtls_etcd.endpoint}/{election}?{ca_only}"
    refused = await anyio.run_process(
        [sys.executable, "-m", "leaderwatch", "observe", bare, "--once"],
        check=False,
    )
    stderr = refused.stderr.decode()
    assert refused.returncode == 1, stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("leaderwatch observe: ")]
    assert mtls_etcd.endpoint in error
    assert "Traceback" not in stderr
