"""The on-disk state of a local election directory: file names, formats, reads and durable writes.

A directory holds three files:

- :data:`LOCK_FILE`, the file candidates ``flock``; never written, never deleted
  by the driver;
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

Every file of the directory is opened without following a symbolic link and
without blocking, and used only if it is a regular file: anything else (a
FIFO, a socket, a device, a directory, a link) is reported as
:class:`Corrupt`, so nothing an outsider puts in the directory can block the
event loop.

The formats are private to the local driver and are not API.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Final, TypeVar

from pydantic import ValidationError

from leaderwatch._value import FrozenValue
from leaderwatch.errors import LeaderwatchError
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
    "WriteFailed",
    "close_lock",
    "damage",
    "is_held",
    "is_open_at",
    "lock_exclusively",
    "parse",
    "prepare",
    "read",
    "track_lock",
    "unreplaceable",
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


_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)

# What open(2) says when O_NOFOLLOW meets a link (ELOOP; EMLINK on FreeBSD), or the
# path names a directory, a socket or a device without a driver.
_NOT_REGULAR_ERRORS: Final = {
    errno.ELOOP: "a symbolic link",
    errno.EMLINK: "a symbolic link",
    errno.EISDIR: "a directory",
    errno.ENXIO: "a socket or device",
    errno.ENODEV: "a device",
}

_MAX_REASON_PART: Final = 120


def _not_regular(kind: str) -> Corrupt:
    return Corrupt(f"not a regular file ({kind})")


def _irregular_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), "an unknown file type")


def _open_regular(path: Path, flags: int) -> int | Corrupt:
    """Open ``path`` without following a link and without blocking, if it is a regular file.

    The ``lstat`` before ``open`` keeps a device node from being opened at
    all; the ``fstat`` after it settles a race with a replacement. Raises
    ``OSError`` for any other failure (``FileNotFoundError`` when missing).
    """
    try:
        kind = _irregular_kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        kind = None
    if kind is not None:
        return _not_regular(kind)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno in _NOT_REGULAR_ERRORS:
            return _not_regular(_NOT_REGULAR_ERRORS[error.errno])
        raise
    try:
        kind = _irregular_kind(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        return _not_regular(kind)
    return fd


def _nobody_holds(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        # Cannot tell (no lock support): trust the record rather than hide a live leader.
        return False
    return True  # released when the caller closes the file


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def parse(data: bytes, model: type[_Model]) -> _Model | Corrupt:
    """``data`` as a ``model``, or :class:`Corrupt` saying why not; never raises.

    Corrupt when ``data`` is empty, larger than :data:`MAX_FILE_SIZE` or does
    not validate as ``model``; the reason stays short whatever the input.
    """
    if len(data) > MAX_FILE_SIZE:
        return Corrupt(f"larger than {MAX_FILE_SIZE} bytes")
    if not data:
        return Corrupt("empty (truncated?)")
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        return Corrupt(
            f"invalid {model.__name__}: {_shorten(where)}: {_shorten(str(first['msg']))}"
        )
    except ValueError as error:  # defensive: pydantic reports JSON faults as ValidationError
        return Corrupt(f"invalid {model.__name__}: {_shorten(str(error))}")


def _shorten(text: str) -> str:
    if len(text) <= _MAX_REASON_PART:
        return text
    return text[: _MAX_REASON_PART - 3] + "..."


def read(
    path: Path, model: type[_Model], *, held_only: bool = False
) -> _Model | Missing | Corrupt | Unheld:
    """The ``model`` stored at ``path``, or why there is none.

    :data:`MISSING` when nothing is at ``path``; :class:`Corrupt` when it is
    not a regular file (never followed, never waited on), cannot be read, is
    empty, is larger than :data:`MAX_FILE_SIZE` or does not validate as
    ``model``; with ``held_only``, :data:`UNHELD` when it is valid but no
    process holds a lock on it. Never blocks; never raises ``OSError``.
    """
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        return Corrupt(f"unreadable: {error.strerror or error}")
    if isinstance(fd, Corrupt):
        return fd
    try:
        data = _read_all(fd, MAX_FILE_SIZE + 1)
        unheld = held_only and _nobody_holds(fd)
    except OSError as error:
        return Corrupt(f"unreadable: {error.strerror or error}")
    finally:
        os.close(fd)
    found = parse(data, model)
    return UNHELD if unheld and not isinstance(found, Corrupt) else found


def is_held(path: Path) -> bool:
    """Whether some open file holds a lock on the regular file at ``path``.

    A leader holds its record locked until it has stepped down, so ``True``
    means a leader may still be in office. ``False`` when nothing, no
    regular file or no file this process may open is at ``path`` (a live
    leader repairs such a record on its next poll); ``True`` when a lock
    cannot be tried on it, which keeps a possibly live leader from being
    ignored. Never blocks.
    """
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except OSError:
        return False
    if isinstance(fd, Corrupt):
        return False
    try:
        return not _nobody_holds(fd)
    finally:
        os.close(fd)


def unreplaceable(path: Path) -> str | None:
    """Why :func:`write_durably` cannot replace what stands at ``path``, or ``None`` if it can.

    A rename replaces a regular file, a link, a FIFO, a socket or a device,
    but never a directory, and the driver never deletes one: an operator must.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode):
        return f"a directory stands where {path.name} belongs; remove it"
    return None


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


class WriteFailed(LeaderwatchError, OSError):
    """:func:`write_durably` failed: at which ``step``, for which file ``name``, and why.

    ``errno`` and ``strerror`` are the operating system's. The message names
    no temporary file, so one failure reads the same each time it recurs.
    """

    def __init__(self, step: str, name: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or type(error).__name__)
        self.step = step
        self.name = name

    def __str__(self) -> str:
        return f"{self.step} {self.name}: {self.strerror}"


def write_durably(
    directory: Path, files: dict[str, bytes], *, hold: str | None = None
) -> int | None:
    """Replace each named file of ``directory`` with its bytes, in the order given.

    Each file is replaced atomically: a reader sees the old bytes or the new
    ones, never a mix, and a later file never appears before an earlier one.
    On return every new file survives a crash of the host. With ``hold``,
    the new file of that name is exclusively ``flock``-ed before anyone can
    see it, and the open descriptor holding that lock is returned. On error
    :class:`WriteFailed` is raised, no temporary file is left behind and no
    lock is held; files already replaced stay replaced.
    """
    staged: list[tuple[Path, Path]] = []
    held: int | None = None
    step, name = "create", ""
    try:
        for name, data in files.items():
            step = "create"
            temp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            staged.append((temp, directory / name))
            keep = name == hold
            try:
                if keep:
                    step = "lock"
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                step = "write"
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                step = "fsync"
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
        step = "rename"
        for temp, target in staged:
            name = target.name
            os.replace(temp, target)
        step, name = "fsync", "the directory"
        _fsync_directory(directory)
    except BaseException as error:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        if held is not None:
            os.close(held)
        if isinstance(error, OSError):
            raise WriteFailed(step, name, error) from error
        raise
    return held


def prepare(directory: Path) -> None:
    """Create ``directory`` and its lock file if missing, and check files can be created there.

    Whatever already stands at the lock file's path is left alone (the
    election reports it if it is not a regular file). Raises ``OSError``
    when the directory is not usable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(
            os.open(
                directory / LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
        )
    probe = directory / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    probe.touch(exist_ok=False)
    probe.unlink()


def lock_exclusively(path: Path) -> int | Corrupt | None:
    """Open ``path`` (creating it) and take an exclusive ``flock`` on it without waiting.

    Returns the descriptor holding the lock (tracked as by :func:`track_lock`;
    release it with :func:`close_lock`), ``None`` when another open file
    holds a lock on it, or :class:`Corrupt` when something other than a
    regular file stands at ``path`` (a link is never followed). Raises
    ``OSError`` when the lock cannot be tried (``FileNotFoundError`` when the
    directory is gone); nothing stays open then. Never blocks.
    """
    fd = _open_regular(path, os.O_RDWR | os.O_CREAT)
    if isinstance(fd, Corrupt):
        return fd
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
    """Whether ``path`` still names the file open at ``fd`` (not unlinked, not replaced).

    A link at ``path`` never counts, even one that leads to that file.
    """
    try:
        now = os.lstat(path)
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
