"""Real L3 servers for the tests (helpers; the fixtures are in conftest.py), on loopback ports in temporary directories, stopped afterwards.

redis-server (Debian package redis-server) and Mooncake Store's master and store processes (PyPI
mooncake-transfer-engine-non-cuda; needs libibverbs1 and libnuma1) are started as child processes;
scripts/setup.sh installs them. Where one is absent its tests skip and say what to install.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

_GIVEN: set[int] = set()   # ports free_port handed out in this process (none is handed out twice)


def free_port() -> int:
    """A loopback port free now and not handed out before by this process (servers started together
    must not be given the same one: it is only reserved once a server binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port

def _wait(predicate, *, timeout_s: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout_s} s\n{tail}")

def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0

def _stop(proc: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

class RedisServer:
    """A redis-server on 127.0.0.1:port with no persistence, its files in `workdir`."""

    def __init__(self, workdir: Path, *, extra_args: list[str] | None = None, port: int | None = None):
        self.workdir, self.port, self.proc = workdir, port or free_port(), None
        self.extra_args = list(extra_args or [])   # more redis-server options (e.g. --io-threads 4)

    def start(self) -> "RedisServer":
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no",
             "--logfile", str(log), *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: _port_open(self.port), timeout_s=20, what="redis-server", log=log)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


class RedisServers:
    """`n` RedisServers, each in its own subdirectory of `workdir` (a store spread over them:
    `url` is redis://HOST:PORT,HOST:PORT,...); ports from `port` on if given. Started and stopped
    as one; `servers[i]` is each (to kill one)."""

    def __init__(self, workdir: Path, n: int, *, extra_args: list[str] | None = None, port: int | None = None):
        self.servers = [RedisServer(workdir / f"redis-{i}", extra_args=extra_args,
                                    port=port + i if port else None) for i in range(n)]

    def start(self) -> "RedisServers":
        try:
            for server in self.servers:
                server.workdir.mkdir(exist_ok=True)
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

REDIS_SERVER = shutil.which("redis-server")

def mooncake_bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)

class MooncakeStoreServers:
    """mooncake_master (with its HTTP metadata server) and one store process lending `segment` bytes."""

    def __init__(self, workdir: Path, *, segment: str = "256 MB"):
        self.workdir, self.segment = workdir, segment
        self.rpc_port, self.http_port, self.metrics_port, self.store_port = (free_port() for _ in range(4))
        self.master = self.store = None

    def start(self) -> "MooncakeStoreServers":
        self.workdir.mkdir(parents=True, exist_ok=True)
        mlog, slog = self.workdir / "master.log", self.workdir / "store.log"
        self.master = subprocess.Popen(
            [mooncake_bin("mooncake_master"), f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
             "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
             f"--http_metadata_server_port={self.http_port}", f"--metrics_port={self.metrics_port}"],
            stdout=open(mlog, "wb"), stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait(lambda: _port_open(self.rpc_port) and _port_open(self.http_port), timeout_s=90,
              what="mooncake_master", log=mlog)
        self.store = subprocess.Popen(
            [mooncake_bin("mooncake_client"), "--host=127.0.0.1", f"--port={self.store_port}",
             f"--master_server_address=127.0.0.1:{self.rpc_port}", f"--metadata_server={self.metadata}",
             f"--global_segment_size={self.segment}", "--protocol=tcp"],
            stdout=open(slog, "wb"), stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait(lambda: b"Starting real client service" in slog.read_bytes(), timeout_s=90,
              what="mooncake_client (store)", log=slog)
        return self

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    @property
    def url(self) -> str:
        return mooncake_url([self], shm=False)

    @property
    def shm_url(self) -> str:
        """The same store through the store process's shared memory (hisa as its dummy client; the
        pool holds an engine's 2 GiB of load rows, touched only where pages are read)."""
        return mooncake_url([self], shm=True)

    def kill_master(self) -> None:
        _stop(self.master, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.store)
        _stop(self.master)


def mooncake_url(stores: "list[MooncakeStoreServers]", *, shm: bool, pool_gb: float = 2.2) -> str:
    """The --l3 URL of one Mooncake store or several (each its own master, metadata server and store
    process; pages spread over them by key), over TCP or through the store processes' shared memory
    (hisa each one's dummy client, a pool of `pool_gb` each)."""
    url = ("mooncake://" + ",".join(f"127.0.0.1:{s.rpc_port}" for s in stores)
           + "?metadata=" + ",".join(s.metadata for s in stores))
    if shm:
        url += "&client=" + ",".join(f"127.0.0.1:{s.store_port}" for s in stores) + f"&pool_gb={pool_gb}"
    return url


def require_mooncake() -> None:
    """Skip the calling test, saying what to install, unless Mooncake Store can run here."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Mooncake Store is not usable: {e} (scripts/setup.sh installs "
                    f"mooncake-transfer-engine-non-cuda and the Debian packages libibverbs1 libnuma1)")
    if mooncake_bin("mooncake_master") is None or mooncake_bin("mooncake_client") is None:
        pytest.skip("mooncake_master / mooncake_client not found (pip install mooncake-transfer-engine-non-cuda)")
