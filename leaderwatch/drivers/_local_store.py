"""The on-disk state of a local election directory: file names, formats, reads and durable writes.

A directory holds three files:

- :data:`LOCK_FILE`, the file candidates ``flock``; never written, never deleted;
- :data:`EPOCH_FILE`, a :class:`LocalEpochCounter`: the highest epoch ever taken;
- :data:`RECORD_FILE`, a :class:`LocalLeaderRecord`: who leads, at which epoch.
  Its writer keeps an exclusive ``flock`` on it while it leads, so readers
  can tell a live leader's record from one left by a process that is gone.

The crash contract, which :func:`write_durably` keeps:

- Files are never modified in place, only replaced whole by ``rename``: a
  reader sees the old bytes or the new ones, never a mix, whenever the
  writer crashes.
- When both files are written together, the counter is replaced before the
  record, so a record never names an epoch the counter has not reached.
- Once a write returns, it survives a crash of the host (file and directory
  are fsync-ed). A writer killed mid-write may leave a hidden ``.NAME.*.tmp``
  file behind; nothing reads it.

The formats are private to the local driver and are not API.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path
from typing import Final, TypeVar

from pydantic import ValidationError

from leaderwatch._value import FrozenValue
from leaderwatch.state import Endpoint, Epoch

if sys.platform != "win32":
    import fcntl

__all__ = [
    "EPOCH_FILE",
    "LOCK_FILE",
    "MISSING",
    "RECORD_FILE",
    "UNHELD",
    "Corrupt",
    "LocalEpochCounter",
    "LocalLeaderRecord",
    "Missing",
    "Unheld",
    "close_lock",
    "damage",
    "is_open_at",
    "lock_exclusively",
    "prepare",
    "read",
    "track_lock",
    "write_durably",
]

LOCK_FILE: Final = "leader.lock"
"""The file candidates lock; never written, never deleted."""
RECORD_FILE: Final = "leader.json"
"""The current leader's :class:`LocalLeaderRecord`."""
EPOCH_FILE: Final = "epoch.json"
"""The highest epoch ever taken in the directory (:class:`LocalEpochCounter`)."""

MAX_FILE_SIZE: Final = 64 * 1024
"""A record or counter larger than this is corrupt (and is not read further)."""

_Model = TypeVar("_Model", bound=FrozenValue)


class LocalLeaderRecord(FrozenValue):
    """Who leads the directory, at which epoch: what followers publish."""

    epoch: Epoch
    leader_endpoint: Endpoint
    node_id: str
    pid: int


class LocalEpochCounter(FrozenValue):
    """The highest epoch any leader of the directory has taken."""

    epoch: Epoch


class Missing:
    """:func:`read` found no file."""

    __slots__ = ()


MISSING: Final = Missing()


class Unheld:
    """:func:`read` found a valid file that nobody holds a lock on: its writer is gone."""

    __slots__ = ()


UNHELD: Final = Unheld()


class Corrupt:
    """:func:`read` found a file it cannot trust; ``reason`` says why (for logs)."""

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


def read(
    path: Path, model: type[_Model], *, held_only: bool = False
) -> _Model | Missing | Corrupt | Unheld:
    """The ``model`` stored at ``path``, or why there is none.

    :data:`MISSING` when no file exists; :class:`Corrupt` when it cannot be
    read, is empty, is larger than :data:`MAX_FILE_SIZE` or does not
    validate as ``model``; with ``held_only``, :data:`UNHELD` when it is
    valid but no process holds a lock on it. Never raises ``OSError``.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_SIZE + 1)
            unheld = held_only and _nobody_holds(file.fileno())
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        return Corrupt(f"unreadable: {error.strerror or error}")
    if len(data) > MAX_FILE_SIZE:
        return Corrupt(f"larger than {MAX_FILE_SIZE} bytes")
    if not data:
        return Corrupt("empty (truncated?)")
    try:
        found = model.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        return Corrupt(f"invalid {model.__name__}: {where}: {first['msg']}")
    return UNHELD if unheld else found


def damage(found: LocalLeaderRecord | LocalEpochCounter | Missing | Corrupt | Unheld) -> str:
    """Why ``found`` is not what its writer last wrote (for logs)."""
    if isinstance(found, Corrupt):
        return found.reason
    if isinstance(found, LocalLeaderRecord | LocalEpochCounter):
        return f"overwritten with epoch {found.epoch}"
    return "missing"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
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


def prepare(directory: Path) -> None:
    """Create ``directory`` and its lock file if missing, and check files can be created there.

    Raises ``OSError`` when the directory is not usable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.close(os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    probe = directory / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    probe.touch(exist_ok=False)
    probe.unlink()


def lock_exclusively(path: Path) -> int | None:
    """Open ``path`` (creating it) and take an exclusive ``flock`` on it without waiting.

    Returns the descriptor holding the lock (tracked as by :func:`track_lock`;
    release it with :func:`close_lock`), or ``None`` when another open file
    holds a lock on it. Raises ``OSError`` when the lock cannot be tried
    (``FileNotFoundError`` when the directory is gone); nothing stays open then.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    track_lock(fd)
    return fd


def is_open_at(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked, not replaced)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


# Every lock this process holds, so a forked child (which shares the open
# file description, hence the lock) can drop its reference at once.
_HELD_LOCKS: set[int] = set()


def track_lock(fd: int) -> None:
    """Remember that ``fd`` holds a lock: a child forked later closes its copy at once.

    Without this a child that outlives its parent would keep the parent's
    election lock (or record lock), and with it the leadership, alive.
    """
    _HELD_LOCKS.add(fd)


def close_lock(fd: int) -> None:
    """Close ``fd``, a descriptor given to :func:`track_lock`, releasing its lock."""
    _HELD_LOCKS.discard(fd)
    os.close(fd)


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if sys.platform != "win32":
    os.register_at_fork(after_in_child=_close_inherited_locks)
