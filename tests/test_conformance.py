"""Every shipped driver passes the conformance kit, and the kit catches broken drivers."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import pytest

from leaderwatch.channel import WatchReceiver, WatchSender
from leaderwatch.drivers import (
    LeadershipDriver,
    LocalElectionDriver,
    ManualDriver,
    StaticDriver,
)
from leaderwatch.state import Follower, Leader, LeaderState, Unknown
from leaderwatch.testing import (
    CONTRACT_CHECKS,
    ContractViolated,
    assert_driver_contract,
    check_driver_contract,
)

MakeDriver = Callable[[str], LeadershipDriver]


@dataclass(frozen=True)
class Case:
    """One driver under the kit: how to build instances, its flags, the backends it runs on."""

    name: str
    factory: Callable[[pytest.FixtureRequest, Path], MakeDriver]
    backends: tuple[str, ...] = ("asyncio", "trio")
    flags: dict[str, Any] = field(default_factory=dict)


def static(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDriver:
    return lambda endpoint: StaticDriver(epoch=7)


def manual(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDriver:
    return lambda endpoint: ManualDriver()


def drive_manual(driver: ManualDriver, step: int) -> None:
    # Leader, then a follower hint at a higher epoch, then Leader again above it.
    if step % 2:
        driver.become_leader(step)
    else:
        driver.become_follower("10.0.0.9:9000", step)


def local(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDriver:
    return lambda endpoint: LocalElectionDriver(
        tmp_path, node_endpoint=endpoint, poll_interval=0.01
    )


def etcd(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDriver:
    from leaderwatch.drivers.etcd import EtcdElectionDriver

    server = request.getfixturevalue("etcd")
    election = f"conformance-{uuid.uuid4().hex[:10]}"
    return lambda endpoint: EtcdElectionDriver(
        server.endpoint, election=election, node_endpoint=endpoint, ttl=2
    )


def postgres(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDriver:
    from leaderwatch.drivers.postgres import PostgresElectionDriver

    server = request.getfixturevalue("postgres")
    election = f"conformance-{uuid.uuid4().hex[:10]}"
    return lambda endpoint: PostgresElectionDriver(
        server.dsn, election=election, node_endpoint=endpoint, ttl=2
    )


CASES = [
    Case("static", static, flags={"elects": False}),
    Case(
        "manual",
        manual,
        flags={"elects": False, "leads_alone": False, "drive": drive_manual},
    ),
    Case("local", local),
    # grpc.aio: asyncio only.
    Case("etcd", etcd, backends=("asyncio",)),
    # asyncpg: asyncio only. A new driver is one more line here.
    Case("postgres", postgres, backends=("asyncio",)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "anyio_backend"),
    [(case, backend) for case in CASES for backend in case.backends],
    ids=[f"{case.name}-{backend}" for case in CASES for backend in case.backends],
)
async def test_shipped_driver_keeps_the_contract(
    case: Case, anyio_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    report = await assert_driver_contract(case.factory(request, tmp_path), **case.flags)
    expected = set(CONTRACT_CHECKS)
    if not case.flags.get("elects", True):
        expected -= {"successor_takes_over"}
    if not case.flags.get("leads_alone", True):
        expected -= {"lone_instance_leads"}
    assert set(report.checks) == expected
    assert report.history.ok
    assert report.history.nodes == (9 if case.flags.get("elects", True) else 2)


# --- the kit catches broken drivers ----------------------------------------------------------


class SlowReceiver(WatchReceiver[LeaderState]):
    """A receiver whose iteration waits before its first value."""

    __slots__ = ()

    def __aiter__(self) -> Any:
        return self._slow()

    async def _slow(self) -> Any:
        await anyio.sleep(0.05)
        async for state in super().__aiter__():
            yield state


class RawDriver:
    """A driver written from scratch against the protocol (no DriverBase), with chosen bugs."""

    def __init__(self, *bugs: str) -> None:
        self.bugs = set(bugs)
        self.sender: WatchSender[LeaderState] = WatchSender(Unknown())
        self.leading = False

    def publish(self, state: LeaderState) -> None:
        if "repeats" in self.bugs:
            self.sender.send(state)
        else:
            self.sender.send_if_changed(state)

    def leadership(self) -> WatchReceiver[LeaderState]:
        receiver = self.sender.subscribe(distinct="repeats" not in self.bugs)
        if "slow_first" in self.bugs:
            receiver.__class__ = SlowReceiver
        return receiver

    @property
    def proven_until(self) -> float:
        if "proof_missing" in self.bugs:
            return -math.inf
        return math.inf if isinstance(self.sender.borrow(), Leader) else -math.inf

    async def resign(self) -> None:
        if "keeps_leading" not in self.bugs:
            self.publish(Unknown())

    async def __aenter__(self) -> Self:
        self.publish(Leader(epoch=1))
        if "repeats" in self.bugs:
            self.publish(Leader(epoch=1))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if "no_unknown_on_exit" not in self.bugs:
            self.publish(Unknown())
        self.sender.close()


def bad_hint(driver: RawDriver, step: int) -> None:
    driver.publish(Follower.model_construct(leader_endpoint="http://10.0.0.9:80", leader_epoch=9))


def going_back(driver: RawDriver, step: int) -> None:
    driver.publish(Leader(epoch=10 - step))


FAST: dict[str, Any] = {"settle_within": 1.0, "takeover_within": 0.5}


@pytest.mark.anyio
async def test_a_correct_raw_driver_passes() -> None:
    await assert_driver_contract(lambda endpoint: RawDriver(), elects=False, **FAST)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bugs", "drive", "broken"),
    [
        (("slow_first",), None, "first_value_immediate"),
        (("no_unknown_on_exit",), None, "exit_publishes_unknown_then_closes"),
        (("repeats",), None, "no_repeated_values"),
        (("keeps_leading",), None, "resign_gives_up_leadership"),
        (("proof_missing",), None, "proven_until"),
        ((), bad_hint, "valid_values"),
        ((), going_back, "epochs_never_decrease"),
    ],
)
async def test_each_broken_rule_is_reported(
    bugs: tuple[str, ...], drive: Callable[[RawDriver, int], None] | None, broken: str
) -> None:
    report = await check_driver_contract(
        lambda endpoint: RawDriver(*bugs), elects=False, drive=drive, **FAST
    )
    assert broken in {violation.check for violation in report.violations}, report.describe()
    with pytest.raises(ContractViolated, match=broken):
        report.raise_for_violations()


@pytest.mark.anyio
async def test_instances_that_all_lead_are_caught_as_an_election() -> None:
    report = await check_driver_contract(lambda endpoint: StaticDriver(epoch=3), **FAST)
    found = {violation.check for violation in report.violations}
    assert {"one_leader_per_epoch", "no_overlapping_leaders", "successor_takes_over"} <= found
    with pytest.raises(ContractViolated, match="one_leader_per_epoch"):
        await assert_driver_contract(lambda endpoint: StaticDriver(epoch=3), **FAST)


class Relapsing(LocalElectionDriver):
    """Resigns, then quietly campaigns again."""

    async def resign(self) -> None:
        await super().resign()
        self._campaigning = True


@pytest.mark.anyio
async def test_a_resigned_node_that_campaigns_again_is_caught(tmp_path: Path) -> None:
    report = await check_driver_contract(
        lambda endpoint: Relapsing(tmp_path, node_endpoint=endpoint, poll_interval=0.01), **FAST
    )
    messages = [v.message for v in report.violations if v.check == "resign_gives_up_leadership"]
    assert any("campaigning is still true" in message for message in messages), messages


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="settle_within"):
        anyio.run(lambda: check_driver_contract(lambda endpoint: StaticDriver(), settle_within=0))
