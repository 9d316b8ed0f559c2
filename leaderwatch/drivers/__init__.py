"""Election drivers: where a node's leadership comes from.

Every driver is an async context manager that owns its background tasks and
exposes ``leadership()``, a receiver whose first value is immediate; see
:class:`LeadershipDriver`. :func:`driver_from_url` builds the driver an
election URL names (``local:///dir``, ``etcd://host:port/name``, ...).
``EtcdElectionDriver`` and ``PostgresElectionDriver`` are imported on
first use and need their extras (``pip install 'leaderwatch[etcd]'``,
``pip install 'leaderwatch[postgres]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from leaderwatch.drivers._base import DriverBase, LeadershipDriver
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers._url import InvalidElectionURL, driver_from_url
from leaderwatch.drivers.local import (
    ElectionStateCorrupt,
    LocalElectionDriver,
    LocalElectionError,
)
from leaderwatch.drivers.manual import ManualDriver
from leaderwatch.drivers.static import StaticDriver

if TYPE_CHECKING:
    from leaderwatch.drivers.etcd import EtcdElectionDriver as EtcdElectionDriver
    from leaderwatch.drivers.postgres import PostgresElectionDriver as PostgresElectionDriver

# The lazily loaded drivers are left out of __all__ so that ``import *``
# works without their extras installed.
__all__ = [
    "DriverBase",
    "ElectionStateCorrupt",
    "InvalidElectionURL",
    "LeadershipDriver",
    "LeaseTiming",
    "LocalElectionDriver",
    "LocalElectionError",
    "ManualDriver",
    "StaticDriver",
    "driver_from_url",
]

# name -> (module, the extra that installs its dependencies)
_LAZY: dict[str, tuple[str, str]] = {
    "EtcdElectionDriver": ("leaderwatch.drivers.etcd", "etcd"),
    "PostgresElectionDriver": ("leaderwatch.drivers.postgres", "postgres"),
}


def __getattr__(name: str) -> Any:
    found = _LAZY.get(name)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, extra = found
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{name} is unavailable ({error}); install its dependencies with "
            f"pip install 'leaderwatch[{extra}]'",
            name=error.name,
        ) from error
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
