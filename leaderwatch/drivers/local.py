"""Leader election between processes on one host through an OS file lock.

Candidates sharing a directory compete for an exclusive ``flock`` on
``leader.lock``; the holder leads. The kernel drops the lock when its holder
exits or dies, so failover waits for no lease: within one poll interval a
candidate takes it. Each new leader persists a strictly higher epoch
(``epoch.json``) and its record (``leader.json``), which followers trust
only while its writer still holds a lock on it.

This module is the election state machine (follow, take office, keep office,
step down); the files themselves — names, formats, reads that tell a live
record from a corrupt, missing or abandoned one, and durable writes — are
:mod:`leaderwatch.drivers._local_store`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import anyio
from anyio.abc import TaskGroup, TaskStatus

from leaderwatch._log import get_logger
from leaderwatch.drivers import _local_store as store
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._local_store import (
    EPOCH_FILE,
    LOCK_FILE,
    RECORD_FILE,
    Corrupt,
    LocalEpochCounter,
    LocalLeaderRecord,
)
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import EPOCH_LIMIT, Follower, Leader, LeaderState, Unknown, parse_endpoint

__all__ = [
    "EPOCH_FILE",
    "LOCK_FILE",
    "RECORD_FILE",
    "ElectionStateCorrupt",
    "LocalElectionDriver",
    "LocalElectionError",
]

_log = get_logger("leaderwatch.drivers.local")

# Reported once until the lock file is a regular file again (whoever leads meanwhile).
_LOCK_FILE_EVENTS: Final = (
    "local_election_directory_missing",
    "local_election_lock_damaged",
    "local_election_lock_unavailable",
)


class LocalElectionError(LeaderwatchError, RuntimeError):
    """The election directory cannot be used; the message says why and what to do."""


class ElectionStateCorrupt(LocalElectionError):
    """A new leader cannot tell which epochs were already used, so it refuses to lead."""


class LocalElectionDriver(DriverBase):
    """Elects one leader among the processes that share ``directory`` on this host.

    Guarantees:

    - Only a driver holding the lock on the file now at
      ``directory/leader.lock`` publishes ``Leader``, and only after the
      epoch and its record are durable. It takes office only once no live
      process holds the record it replaces: a leader whose lock file was
      deleted or replaced publishes ``Unknown()`` before it lets go of its
      record, so two nodes never show ``Leader`` at once. (Only when the
      record is deleted or replaced in the same instant as the lock file —
      the whole directory removed — can the old leader overlap its
      successor, for at most its own ``poll_interval``, at a lower epoch.)
    - Each new leader takes an epoch strictly above every epoch published
      from the directory and every epoch this node published, so epochs
      increase across leaders and restarts. If the record and the epoch
      counter are both unreadable it raises :class:`ElectionStateCorrupt`
      instead of guessing (the lock is released first). When no epoch is
      left (the counter or record holds ``2**128 - 1``) nobody takes office:
      each candidate logs ``local_election_epochs_exhausted`` once, keeps
      following, and campaigns again once an operator restored the counter.
    - The kernel releases the lock when the holder exits or dies: a
      candidate takes over within one ``poll_interval`` plus the durable
      write, with no lease timeout. Leaving ``async with`` publishes
      ``Unknown()`` and then releases the lock.
    - :meth:`resign` publishes ``Unknown()``, releases the lock and stops
      campaigning; a durable write in flight finishes first, so no
      ``Leader`` is published after it returns. The node keeps following.
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
    - Damage is logged once and never churns: a lock file that is not a
      regular file (a link, a FIFO, ...) is used by nobody
      (``local_election_lock_damaged``); a directory where the record or
      the counter belongs is never written over (``local_election_unrepairable``):
      a leader keeps its office, a candidate does not take one, and no epoch
      is used up; a failed write is logged once per distinct failure
      (``local_election_write_failed`` with ``step``, ``file``, ``reason``).
    - The event loop is never blocked waiting for the lock or for the disk,
      whatever stands in the directory: files are opened non-blocking
      without following links, and anything but a regular file is a corrupt
      file. A candidate notices a free lock within ``poll_interval`` seconds.

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
        super().__init__(
            endpoint if node_id is None else node_id, strict=strict, self_endpoint=endpoint
        )
        self._endpoint = endpoint
        self._poll_interval = float(poll_interval)
        self._directory = Path(directory).absolute()
        self._lock_path = self._directory / LOCK_FILE
        self._record_path = self._directory / RECORD_FILE
        self._epoch_path = self._directory / EPOCH_FILE
        self._prepare_directory()
        self._lock_fd: int | None = None
        self._record: LocalLeaderRecord | None = None
        # The leader's open, locked record: followers trust the record only while it is locked.
        self._record_fd: int | None = None
        self._reported: dict[str, str] = {}
        # Steps and resigning never interleave: a resign waits for a durable write in flight,
        # so a node that resigned never goes on to publish the term that write was for.
        self._office = anyio.Lock()

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
            store.prepare(self._directory)
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
        async with self._office:
            if self._lock_fd is not None:
                _log.info("local_election_resigned", node_id=self.node_id)
            self._step_down()

    async def _step(self) -> None:
        async with self._office:
            own = self._record
            if own is not None:
                await self._keep_office(own)
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

    def _forget(self, events: Iterable[str]) -> None:
        """The conditions ``events`` reported are over: report them again if they recur."""
        for event in tuple(events):
            self._reported.pop(event, None)

    def _try_lock(self) -> bool:
        """Whether this node holds the lock on the current lock file (taking it if free)."""
        if self._lock_fd is not None:
            # Won on an earlier poll, still waiting for the previous leader to let go.
            if self._lock_is_current():
                return True
            self._release_lock()
        try:
            fd = store.lock_exclusively(self._lock_path)
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
        if isinstance(fd, Corrupt):
            # Nobody can lead through it: a link may lead to a file that a rename replaces.
            self._report("local_election_lock_damaged", path=str(self._lock_path), reason=fd.reason)
            return False
        self._forget(_LOCK_FILE_EVENTS)
        if fd is None:
            return False
        self._lock_fd = fd
        if not self._lock_is_current():
            # Locked a file that was unlinked or replaced meanwhile: it guards nothing.
            self._release_lock()
            return False
        return True

    def _lock_is_current(self) -> bool:
        fd = self._lock_fd
        return fd is not None and store.is_open_at(self._lock_path, fd)

    def _holds_record(self) -> bool:
        fd = self._record_fd
        return fd is not None and store.is_open_at(self._record_path, fd)

    def _hold_record(self, fd: int | None) -> None:
        previous = self._record_fd
        self._record_fd = fd
        if fd is not None:
            store.track_lock(fd)
        if previous is not None:
            store.close_lock(previous)

    def _release_lock(self) -> None:
        self._hold_record(None)
        fd = self._lock_fd
        self._lock_fd = None
        if fd is not None:
            store.close_lock(fd)

    def _step_down(self) -> None:
        """Stop leading: tell subscribers first, then let a successor take the lock."""
        if not self._watch.is_closed:
            self._publish(Unknown())
        self._record = None
        self._release_lock()

    def _next_epoch(self) -> int | None:
        """The epoch a new leader takes; ``None`` (logged once) when every epoch was used."""
        record = store.read(self._record_path, LocalLeaderRecord)
        counter = store.read(self._epoch_path, LocalEpochCounter)
        known = [
            source.epoch
            for source in (record, counter)
            if isinstance(source, LocalLeaderRecord | LocalEpochCounter)
        ]
        corrupt = [source.reason for source in (record, counter) if isinstance(source, Corrupt)]
        if corrupt and not known:
            raise ElectionStateCorrupt(
                f"{RECORD_FILE} and {EPOCH_FILE} in {str(self._directory)!r} are both unreadable "
                f"({'; '.join(corrupt)}), so the next epoch cannot be proven higher than every "
                f'epoch already used; restore {EPOCH_FILE} as {{"epoch": N}} with N at least '
                "the highest epoch clients may have seen"
            )
        if isinstance(counter, Corrupt):
            # The record alone bounds every published epoch: a leader publishes
            # only once its record is durable, and the record's epoch never decreases.
            self._report(
                "local_election_epoch_corrupt", path=str(self._epoch_path), reason=counter.reason
            )
        high_water = self._watch.high_water
        if high_water is not None:
            known.append(high_water)
        used = max(known, default=0)
        if used + 1 >= EPOCH_LIMIT:
            # No fresh epoch exists, and reusing one could name two leaders: nobody leads
            # until an operator restores the counter; the process stays up to resume then.
            self._report(
                "local_election_epochs_exhausted", directory=str(self._directory), epoch=used
            )
            return None
        return used + 1

    async def _take_office(self) -> None:
        """Lead, once the lock is this node's and the previous leader is out of office."""
        if store.is_held(self._record_path):
            # The lock file was deleted or replaced under a leader that still holds its
            # record: it publishes Unknown() before letting go of the record, so waiting
            # for the record keeps two leaders from ever serving at once.
            self._follow()
            return
        for path in (self._epoch_path, self._record_path):
            obstruction = store.unreplaceable(path)
            if obstruction is not None:
                # Writing would fail at the rename and burn an epoch on every try.
                self._report("local_election_unrepairable", path=str(path), reason=obstruction)
                self._decline()
                return
        try:
            epoch = self._next_epoch()
        except ElectionStateCorrupt as error:
            _log.error("local_election_state_corrupt", node_id=self.node_id, reason=str(error))
            self._step_down()
            raise
        if epoch is None:
            self._decline()
            return
        record = LocalLeaderRecord(
            epoch=epoch, leader_endpoint=self._endpoint, node_id=self.node_id, pid=os.getpid()
        )
        files = {
            EPOCH_FILE: LocalEpochCounter(epoch=epoch).model_dump_json().encode(),
            RECORD_FILE: record.model_dump_json().encode(),
        }
        if not await self._write(files):
            return
        if not self._lock_is_current():
            # Replaced while writing: a node that locked the new file waits for the
            # record this node now holds, so stepping down unpublished is enough.
            self._report("local_election_lock_lost", path=str(self._lock_path))
            self._step_down()
            return
        self._record = record
        self._reported.clear()
        _log.info(
            "local_election_won", node_id=self.node_id, epoch=epoch, directory=str(self._directory)
        )
        self._publish(Leader(epoch=epoch))

    def _decline(self) -> None:
        """Give the lock back without having led, and keep following."""
        self._release_lock()
        self._follow()

    async def _write(self, files: dict[str, bytes]) -> bool:
        """Write ``files`` durably, holding the new record; on failure step down."""
        hold = RECORD_FILE if RECORD_FILE in files else None
        try:
            fd = await anyio.to_thread.run_sync(
                functools.partial(store.write_durably, self._directory, files, hold=hold)
            )
        except store.WriteFailed as error:
            self._report(
                "local_election_write_failed",
                directory=str(self._directory),
                step=error.step,
                file=error.name,
                reason=error.strerror,
            )
            self._step_down()
            return False
        if fd is not None:
            self._hold_record(fd)
        return True

    async def _keep_office(self, own: LocalLeaderRecord) -> None:
        if not self._lock_is_current():
            self._report("local_election_lock_lost", path=str(self._lock_path))
            self._step_down()
            return
        record = store.read(self._record_path, LocalLeaderRecord)
        counter = store.read(self._epoch_path, LocalEpochCounter)
        for path, found in ((self._record_path, record), (self._epoch_path, counter)):
            if isinstance(found, LocalLeaderRecord | LocalEpochCounter) and found.epoch > own.epoch:
                # Someone else claims a newer term; re-run the election rather than argue.
                self._report(
                    "local_election_record_conflict",
                    path=str(path),
                    epoch=found.epoch,
                    own_epoch=own.epoch,
                )
                self._step_down()
                return
        damaged: list[tuple[str, Path, str, bytes]] = []
        if not (isinstance(counter, LocalEpochCounter) and counter.epoch == own.epoch):
            damaged.append(
                (
                    EPOCH_FILE,
                    self._epoch_path,
                    store.damage(counter),
                    LocalEpochCounter(epoch=own.epoch).model_dump_json().encode(),
                )
            )
        if record != own or not self._holds_record():
            reason = store.damage(record) if record != own else "replaced"
            damaged.append((RECORD_FILE, self._record_path, reason, own.model_dump_json().encode()))
        if not damaged:
            self._forget(["local_election_unrepairable"])
        repairs: dict[str, bytes] = {}
        for name, path, reason, data in damaged:
            obstruction = store.unreplaceable(path)
            if obstruction is not None:
                # The lock is still this node's: keep leading, and repair once it can be.
                self._report("local_election_unrepairable", path=str(path), reason=obstruction)
                continue
            _log.warning(
                "local_election_epoch_restored"
                if name == EPOCH_FILE
                else "local_election_record_restored",
                node_id=self.node_id,
                path=str(path),
                reason=reason,
            )
            repairs[name] = data
        if repairs:
            await self._write(repairs)

    def _follow(self) -> None:
        found = store.read(self._record_path, LocalLeaderRecord, held_only=True)
        high_water = self._watch.high_water
        state: LeaderState = Unknown()
        if isinstance(found, Corrupt):
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
            self._forget(event for event in self._reported if event not in _LOCK_FILE_EVENTS)
            state = Follower(leader_endpoint=found.leader_endpoint, leader_epoch=found.epoch)
        self._publish(state)
