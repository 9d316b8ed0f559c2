"""Where the test servers (etcd, PostgreSQL) keep their data."""

from __future__ import annotations

import os

__all__ = ["scratch_dir"]


def scratch_dir(*, at_least: int = 2 * 1024**3) -> str | None:
    """Where test servers keep their data: ``/dev/shm`` when it is a writable tmpfs
    with ``at_least`` bytes free, else ``None`` (the default temporary directory).

    etcd preallocates 128 MB of WAL per server and exits on a failed write, so
    a nearly full disk must not be where it writes; memory is also faster.
    """
    shm = "/dev/shm"
    try:
        stats = os.statvfs(shm)
    except OSError:
        return None
    if not os.access(shm, os.W_OK) or stats.f_bavail * stats.f_frsize < at_least:
        return None
    return shm
