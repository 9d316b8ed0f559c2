"""Leader election between processes on one host through an OS file lock.

Candidates sharing a directory compete for an exclusive ``flock`` on
``leader.lock``; the holder leads. The kernel drops the lock when its holder
exits or dies, so failover waits for no lease: within one poll interval a
candidate takes it. Each new leader persists a strictly higher epoch
(``epoch.json``) and its record (``leader.json``), which followers trust
only while its writer still holds a lock on it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Final, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel, ConfigDict, ValidationError

from leaderwatch._log import get_logger
from leaderwatch.drivers._base import DriverBase
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    EPOCH_LIMIT,
    Endpoint,
    Epoch,
    Follower,
    Leader,
    LeaderState,
    Unknown,
    parse_endpoint,
)

if sys.platform != "win32":
    import fcntl

__all__ = [
    "EPOCH_FILE",
    "LOCK_FILE",
    "RECORD_FILE",
    "ElectionStateCorrupt",
    "LocalElectionDriver",
    "LocalElectionError",
    "LocalEpochCounter",
    "LocalLeaderRecord",
]

_log = get_logger("leaderwatch.drivers.local")

LOCK_FILE: Final = "leader.lock"
"""The file candidates lock; never written, never deleted."""
RECORD_FILE: Final = "leader.json"
"""The current leader's :class:`LocalLeaderRecord`."""
EPOCH_FILE: Final = "epoch.json"
"""The highest epoch ever taken in the directory (:class:`LocalEpochCounter`)."""

_MAX_FILE_SIZE: Final = 64 * 1024

_Model = TypeVar("_Model", bound=BaseModel)


class LocalElectionError(LeaderwatchError, RuntimeError):
    """The election directory cannot be used; the message says why and what to do."""


class ElectionStateCorrupt(LocalElectionError):
    """A new leader cannot tell which epochs were already used, so it refuses to lead."""


class LocalLeaderRecord(BaseModel):
    """Who leads the directory, at which epoch: what followers publish."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: Epoch
    leader_endpoint: Endpoint
    node_id: str
    pid: int


class LocalEpochCounter(BaseModel):
    """The highest epoch any leader of the directory has taken."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: Epoch


class _Missing:
    __slots__ = ()


_MISSING: Final = _Missing()


class _Unheld:
    __slots__ = ()


_UNHELD: Final = _Unheld()


class _Corrupt:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _nobody_holds(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        # Cannot tell (no lock support): trust the record rather than hide a live leader.
        return False
    return True  # released when the caller closes the file


def _read(
    path: Path, model: type[_Model], *, held_only: bool = False
) -> _Model | _Missing | _Corrupt | _Unheld:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE_SIZE + 1)
            unheld = held_only and _nobody_holds(file.fileno())
    except FileNotFoundError:
        return _MISSING
    except OSError as error:
        return _Corrupt(f"unreadable: {error.strerror or error}")
    if len(data) > _MAX_FILE_SIZE:
        return _Corrupt(f"larger than {_MAX_FILE_SIZE} bytes")
    if not data:
        return _Corrupt("empty (truncated?)")
    try:
        found = model.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        return _Corrupt(f"invalid {model.__name__}: {where}: {first['msg']}")
    return _UNHELD if unheld else found


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(
    directory: Path, files: dict[str, bytes], *, hold: str | None = None
) -> int | None:
    """Replace each named file of ``directory`` with its bytes, in the order given.

    Each file is replaced atomically: a reader sees the old bytes or the new
    ones, never a mix, and a later file never appears before an earlier one.
    On return every new file survives a crash of the host. With ``hold``,
    the new file of that name is exclusively ``flock``-ed before anyone can
    see it, and the open descriptor holding that lock is returned. On error
    an ``OSError`` is raised, no temporary file is left behind and no lock
    is held; files already replaced stay replaced.
    """
    staged: list[tuple[Path, Path]] = []
    held: int | None = None
    try:
        for name, data in files.items():
            temp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            staged.append((temp, directory / name))
            keep = name == hold
            try:
                if keep:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            if keep:
                held = fd
            else:
                os.close(fd)
        # Renamed only once all are written, in order: the epoch counter
        # before the record, so a record never names an epoch the counter lacks.
        for temp, target in staged:
            os.replace(temp, target)
        _fsync_directory(directory)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        if held is not None:
            os.close(held)
        raise
    return held


# Every lock this process holds, so a forked child (which shares the open
# file description, hence the lock) can drop its reference at once.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if sys.platform != "win32":
    os.register_at_fork(after_in_child=_close_inherited_locks)


class LocalElectionDriver(DriverBase):
    """Elects one leader among the processes that share ``directory`` on this host.

    Guarantees:

    - At most one driver holds the lock on ``directory/leader.lock`` at a
      time, and only the holder publishes ``Leader``. It publishes
      ``Leader(epoch)`` only after the epoch and its record are durable.
    - Each new leader takes an epoch strictly above every epoch published
      from the directory and every epoch this node published, so epochs
      increase across leaders and restarts. If the record and the epoch
      counter are both unreadable it raises :class:`ElectionStateCorrupt`
      instead of guessing (the lock is released first).
    - The kernel releases the lock when the holder exits or dies: a
      candidate takes over within one ``poll_interval`` plus the durable
      write, with no lease timeout. Leaving ``async with`` publishes
      ``Unknown()`` and then releases the lock.
    - Non-leaders publish ``Follower(leader_endpoint, leader_epoch)`` from
      the record only while the process that wrote it still leads, never a
      record naming this node's own endpoint, and ``Unknown()`` otherwise:
      while the record is missing, corrupt (logged once as
      ``local_election_record_corrupt``), left by a leader that exited or
      died, or older than an epoch this node already published (logged once
      as ``local_election_epoch_behind``).
    - A leader whose lock file is deleted or replaced steps down
      (``local_election_lock_lost``); a leader whose record or epoch counter
      was damaged, deleted or replaced rewrites it; a leader that finds a
      higher epoch in either file steps down and the election runs again.
    - The event loop is never blocked waiting for the lock or for the disk;
      a candidate notices a free lock within ``poll_interval`` seconds.

    Raises ``InvalidEndpoint`` for a ``node_endpoint`` that is not a
    scheme-less ``host:port``, ``ValueError`` for a non-positive
    ``poll_interval``, and :class:`LocalElectionError` when ``directory``
    cannot be created or written. POSIX only; the directory must be on a
    local file system (``flock`` over NFS is not reliable).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        node_endpoint: str,
        poll_interval: float = 0.05,
        node_id: str | None = None,
        strict: bool = False,
    ) -> None:
        endpoint = parse_endpoint(node_endpoint)
        if not (isinstance(poll_interval, int | float) and math.isfinite(poll_interval)):
            raise ValueError(f"poll_interval must be a finite number (got {poll_interval!r})")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds (got {poll_interval!r})")
        if sys.platform == "win32":
            raise LocalElectionError("LocalElectionDriver needs POSIX flock(2); not on Windows")
        super().__init__(endpoint if node_id is None else node_id, strict=strict)
        self._endpoint = endpoint
        self._poll_interval = float(poll_interval)
        self._directory = Path(directory).absolute()
        self._lock_path = self._directory / LOCK_FILE
        self._record_path = self._directory / RECORD_FILE
        self._epoch_path = self._directory / EPOCH_FILE
        self._prepare_directory()
        self._lock_fd: int | None = None
        self._lock_identity: tuple[int, int] | None = None
        self._record: LocalLeaderRecord | None = None
        # The leader's open, locked record: followers trust the record only while it is locked.
        self._record_fd: int | None = None
        self._reported: dict[str, str] = {}

    @property
    def directory(self) -> Path:
        """The election directory (absolute)."""
        return self._directory

    @property
    def node_endpoint(self) -> str:
        """The endpoint this node advertises when it leads."""
        return self._endpoint

    @property
    def is_leader(self) -> bool:
        """Whether this driver holds the lock and has published its epoch."""
        return self._record is not None

    def _prepare_directory(self) -> None:
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
            probe = self._directory / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as error:
            raise LocalElectionError(
                f"election directory {str(self._directory)!r} is not usable: "
                f"{error.strerror or error}; it must be a writable directory on a local file system"
            ) from error

    async def _start(self, task_group: TaskGroup) -> None:
        await task_group.start(self._campaign)

    async def _campaign(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._step()
            task_status.started()
            while True:
                await anyio.sleep(self._poll_interval)
                await self._step()
        finally:
            self._step_down()

    async def _resign(self) -> None:
        if self._lock_fd is not None:
            _log.info("local_election_resigned", node_id=self.node_id)
        self._step_down()

    async def _step(self) -> None:
        if self._lock_fd is not None:
            await self._keep_office()
        elif self.campaigning and self._try_lock():
            await self._take_office()
        else:
            self._follow()

    def _report(self, event: str, **fields: object) -> None:
        """Log an error once per event until its fields change or the node recovers."""
        key = repr(fields)
        if self._reported.get(event) != key:
            self._reported[event] = key
            _log.error(event, node_id=self.node_id, **fields)

    def _try_lock(self) -> bool:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            self._report("local_election_directory_missing", directory=str(self._directory))
            with contextlib.suppress(OSError):
                self._directory.mkdir(parents=True, exist_ok=True)
            return False
        except OSError as error:
            self._report(
                "local_election_lock_unavailable", path=str(self._lock_path), reason=str(error)
            )
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as error:
            os.close(fd)
            self._report(
                "local_election_lock_unavailable", path=str(self._lock_path), reason=str(error)
            )
            return False
        held = os.fstat(fd)
        self._lock_fd = fd
        self._lock_identity = (held.st_dev, held.st_ino)
        _HELD_LOCKS.add(fd)
        if not self._lock_is_current():
            # Locked a file that was unlinked or replaced meanwhile: it guards nothing.
            self._release_lock()
            return False
        return True

    def _lock_is_current(self) -> bool:
        try:
            now = os.stat(self._lock_path)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == self._lock_identity

    def _holds_record(self) -> bool:
        fd = self._record_fd
        if fd is None:
            return False
        try:
            now = os.stat(self._record_path)
        except OSError:
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _hold_record(self, fd: int | None) -> None:
        previous = self._record_fd
        self._record_fd = fd
        if fd is not None:
            _HELD_LOCKS.add(fd)
        if previous is not None:
            _HELD_LOCKS.discard(previous)
            os.close(previous)

    def _release_lock(self) -> None:
        self._hold_record(None)
        fd = self._lock_fd
        self._lock_fd = None
        self._lock_identity = None
        if fd is not None:
            _HELD_LOCKS.discard(fd)
            os.close(fd)

    def _step_down(self) -> None:
        """Stop leading: tell subscribers first, then let a successor take the lock."""
        if not self._watch.is_closed:
            self._publish(Unknown())
        self._record = None
        self._release_lock()

    def _next_epoch(self) -> int:
        record = _read(self._record_path, LocalLeaderRecord)
        counter = _read(self._epoch_path, LocalEpochCounter)
        known = [source.epoch for source in (record, counter) if isinstance(source, BaseModel)]
        corrupt = [source.reason for source in (record, counter) if isinstance(source, _Corrupt)]
        if corrupt and not known:
            raise ElectionStateCorrupt(
                f"{RECORD_FILE} and {EPOCH_FILE} in {str(self._directory)!r} are both unreadable "
                f"({'; '.join(corrupt)}), so the next epoch cannot be proven higher than every "
                f'epoch already used; restore {EPOCH_FILE} as {{"epoch": N}} with N at least '
                "the highest epoch clients may have seen"
            )
        if isinstance(counter, _Corrupt):
            # The record alone bounds every published epoch: a leader publishes
            # only once its record is durable, and the record's epoch never decreases.
            self._report(
                "local_election_epoch_corrupt", path=str(self._epoch_path), reason=counter.reason
            )
        high_water = self._watch.high_water
        if high_water is not None:
            known.append(high_water)
        epoch = max(known, default=0) + 1
        if epoch >= EPOCH_LIMIT:
            raise ElectionStateCorrupt(f"epochs in {str(self._directory)!r} are exhausted")
        return epoch

    async def _take_office(self) -> None:
        try:
            epoch = self._next_epoch()
        except ElectionStateCorrupt as error:
            _log.error("local_election_state_corrupt", node_id=self.node_id, reason=str(error))
            self._step_down()
            raise
        record = LocalLeaderRecord(
            epoch=epoch, leader_endpoint=self._endpoint, node_id=self.node_id, pid=os.getpid()
        )
        files = {
            EPOCH_FILE: LocalEpochCounter(epoch=epoch).model_dump_json().encode(),
            RECORD_FILE: record.model_dump_json().encode(),
        }
        if not await self._write(files):
            return
        self._record = record
        self._reported.clear()
        _log.info(
            "local_election_won", node_id=self.node_id, epoch=epoch, directory=str(self._directory)
        )
        self._publish(Leader(epoch=epoch))

    async def _write(self, files: dict[str, bytes]) -> bool:
        """Write ``files`` durably, holding the new record; on failure step down."""
        hold = RECORD_FILE if RECORD_FILE in files else None
        try:
            fd = await anyio.to_thread.run_sync(
                functools.partial(_write_durably, self._directory, files, hold=hold)
            )
        except OSError as error:
            self._report(
                "local_election_write_failed", directory=str(self._directory), reason=str(error)
            )
            self._step_down()
            return False
        if fd is not None:
            self._hold_record(fd)
        return True

    async def _keep_office(self) -> None:
        own = self._record
        if own is None or not self._lock_is_current():
            self._report("local_election_lock_lost", path=str(self._lock_path))
            self._step_down()
            return
        record = _read(self._record_path, LocalLeaderRecord)
        counter = _read(self._epoch_path, LocalEpochCounter)
        for path, found in ((self._record_path, record), (self._epoch_path, counter)):
            if isinstance(found, BaseModel) and found.epoch > own.epoch:
                # Someone else claims a newer term; re-run the election rather than argue.
                self._report(
                    "local_election_record_conflict",
                    path=str(path),
                    epoch=found.epoch,
                    own_epoch=own.epoch,
                )
                self._step_down()
                return
        repairs: dict[str, bytes] = {}
        if not (isinstance(counter, LocalEpochCounter) and counter.epoch == own.epoch):
            _log.warning(
                "local_election_epoch_restored",
                node_id=self.node_id,
                path=str(self._epoch_path),
                reason=_damage(counter),
            )
            repairs[EPOCH_FILE] = LocalEpochCounter(epoch=own.epoch).model_dump_json().encode()
        if record != own or not self._holds_record():
            _log.warning(
                "local_election_record_restored",
                node_id=self.node_id,
                path=str(self._record_path),
                reason=_damage(record) if record != own else "replaced",
            )
            repairs[RECORD_FILE] = own.model_dump_json().encode()
        if repairs:
            await self._write(repairs)

    def _follow(self) -> None:
        found = _read(self._record_path, LocalLeaderRecord, held_only=True)
        high_water = self._watch.high_water
        state: LeaderState = Unknown()
        if isinstance(found, _Corrupt):
            self._report(
                "local_election_record_corrupt", path=str(self._record_path), reason=found.reason
            )
        elif not isinstance(found, LocalLeaderRecord) or found.leader_endpoint == self._endpoint:
            # No record yet, or its writer no longer leads, or it names this node although
            # another holds the lock: the holder has not written its own record yet.
            pass
        elif high_water is not None and found.epoch < high_water:
            # The directory went back in time (wiped, restored from a backup).
            self._report(
                "local_election_epoch_behind",
                path=str(self._record_path),
                record_epoch=found.epoch,
                high_water=high_water,
            )
        else:
            self._reported.clear()
            state = Follower(leader_endpoint=found.leader_endpoint, leader_epoch=found.epoch)
        self._publish(state)


def _damage(found: LocalLeaderRecord | LocalEpochCounter | _Missing | _Corrupt | _Unheld) -> str:
    if isinstance(found, _Corrupt):
        return found.reason
    if isinstance(found, LocalLeaderRecord | LocalEpochCounter):
        return f"overwritten with epoch {found.epoch}"
    return "missing"
