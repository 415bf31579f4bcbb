"""Edge replicas behind a real load balancer, on loopback: `make cluster-demo` and the tests.

Why here: the demo (scripts/cluster_demo.py) and the integration test
(tests/test_cluster_haproxy.py) run the same thing, N `python -m edge_service`
processes behind HAProxy started from the shipped deploy/haproxy.cfg, and must agree
on how (one place). Processes only: nothing here imports the edge or the device.

HAProxy's runtime API (its stats socket) says what the balancer sees of each replica,
so a caller waits on conditions ("all replicas UP", "edge2 DOWN"), never on a sleep.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
#: Hang guard for a process to come up (never an assertion about speed).
START_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_haproxy() -> str | None:
    """The haproxy binary (Debian puts it in /usr/sbin, often off a user's PATH)."""
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; a hang guard, not a speed assertion."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.05)


@dataclass
class Replica:
    """One edge process."""

    replica_id: str
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LoopbackCluster:
    """N edge replicas of `model` behind HAProxy (deploy/haproxy.cfg) on loopback.

    Use as a context manager; `url` is the balancer's. `edge_args` go to every
    `python -m edge_service` (one thread each by default: a 2-core machine).
    """

    model: str
    workdir: Path
    n: int = 3
    edge_args: Sequence[str] = ("--threads", "1")
    python: str = sys.executable
    replicas: list[Replica] = field(default_factory=list)
    lb_port: int = 0
    _haproxy: subprocess.Popen | None = None
    _logs: list[IO] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"

    def replica(self, replica_id: str) -> Replica:
        return next(r for r in self.replicas if r.replica_id == replica_id)

    def __enter__(self) -> "LoopbackCluster":
        haproxy = find_haproxy()
        if haproxy is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install -y haproxy)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(1, self.n + 1):
                r = Replica(f"edge{i}", free_port(), self.workdir / f"edge{i}.log")
                log = open(r.log_path, "w")  # noqa: SIM115 - closed in __exit__
                self._logs.append(log)
                r.proc = subprocess.Popen(
                    [self.python, "-m", "edge_service", "--model", str(self.model), "--port", str(r.port),
                     "--replica-id", r.replica_id, *self.edge_args],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
                self.replicas.append(r)
            for r in self.replicas:
                wait_for(lambda r=r: "edge_service ready" in r.log() or r.proc.poll() is not None,
                         f"{r.replica_id} to start")
                if r.proc.poll() is not None:
                    raise RuntimeError(f"{r.replica_id} exited with {r.proc.returncode}:\n{r.log()[-3000:]}")
            self.lb_port = free_port()
            env = {**os.environ, "DSSD_LB_BIND": f"127.0.0.1:{self.lb_port}",
                   "DSSD_HAPROXY_SOCKET": str(self.socket_path)}
            env.update({f"DSSD_EDGE{i}": f"127.0.0.1:{r.port}" for i, r in enumerate(self.replicas, 1)})
            log = open(self.workdir / "haproxy.log", "w")  # noqa: SIM115
            self._logs.append(log)
            self._haproxy = subprocess.Popen([haproxy, "-db", "-f", str(self._config())], stdout=log,
                                             stderr=subprocess.STDOUT, env=env)
            wait_for(lambda: self._haproxy.poll() is not None or self._up() == {r.replica_id for r in self.replicas},
                     "HAProxy to see every replica UP")
            if self._haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited: {(self.workdir / 'haproxy.log').read_text()[-3000:]}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _config(self) -> Path:
        """deploy/haproxy.cfg as shipped for 3 replicas; for another N, its server lines for N."""
        if self.n == 3:
            return HAPROXY_CFG
        lines = [line for line in HAPROXY_CFG.read_text().splitlines() if not line.strip().startswith("server edge")]
        lines += [f'    server edge{i} "${{DSSD_EDGE{i}}}"' for i in range(1, self.n + 1)]
        path = self.workdir / "haproxy.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path

    def haproxy_command(self, command: str) -> str:
        """One command on HAProxy's runtime API (e.g. "show stat", "set server edges/edge2 state drain")."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """HAProxy's view of each replica: UP, DOWN, DRAIN, MAINT, or a transition ("UP 1/2")."""
        try:
            text = self.haproxy_command("show stat").lstrip("# ")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row["status"] for row in rows if row.get("pxname") == "edges"
                and row["svname"] not in ("BACKEND", "FRONTEND")}

    def _up(self) -> set[str]:
        return {name for name, status in self.states().items() if status == "UP"}

    def wait_state(self, replica_id: str, status: str) -> None:
        wait_for(lambda: self.states().get(replica_id, "").startswith(status), f"{replica_id} {status}")

    def kill(self, replica_id: str) -> None:
        """SIGKILL: the replica dies mid-whatever, like a crashed machine."""
        proc = self.replica(replica_id).proc
        assert proc is not None
        proc.kill()
        proc.wait(60)

    def drain(self, replica_id: str) -> None:
        """SIGTERM: the replica drains (finishes its rounds, moves its devices) and exits."""
        proc = self.replica(replica_id).proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc: object) -> None:
        procs = [r.proc for r in self.replicas if r.proc is not None] + [p for p in [self._haproxy] if p]
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()
