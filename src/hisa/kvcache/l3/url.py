"""Parse `--l3 file:PATH | redis://HOST:PORT[,HOST:PORT...][/DB] | mooncake://MASTER_HOST:PORT[,...][?metadata=URL[,...]][&client=HOST:PORT[,...][&pool_gb=GB]]`.

Torch-free. Every malformed value raises :class:`hisa.errors.ConfigError` with the accepted forms,
so the CLI prints it without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlsplit

from hisa.errors import ConfigError

FORMS = ("file:PATH, redis://HOST:PORT[,HOST:PORT...][/DB] or "
         "mooncake://MASTER_HOST:PORT[,...][?metadata=URL[,...]][&client=HOST:PORT[,...][&pool_gb=GB]]")


@dataclass(frozen=True, slots=True)
class FileL3Spec:
    """A directory on local disk (created if missing)."""
    path: str


@dataclass(frozen=True, slots=True)
class RedisL3Spec:
    """A Redis server (host, port), or several (`others` after it: pages spread over them by key,
    `hisa.kvcache.l3.sharded`); several hisa processes may share them."""
    host: str
    port: int
    db: int = 0
    others: tuple[tuple[str, int], ...] = ()

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.others)


@dataclass(frozen=True, slots=True)
class MooncakeL3Spec:
    """A Mooncake Store master (`mooncake_master`). `metadata` is the transfer engine's metadata
    server; by default the master's own HTTP metadata server on its default port 8080. `client`:
    HOST:PORT of a store process on this host (`mooncake_client --port`) to move pages through its
    shared memory (a pool of `pool_gb`) instead of TCP; None: TCP. `others`: more stores, each with a
    master of its own (pages spread over them by key, `hisa.kvcache.l3.sharded`, read from all at once:
    one store process serves one client's reads one at a time)."""
    master_host: str
    master_port: int
    metadata: str
    client: str | None = None
    pool_gb: float = 4.0
    others: tuple["MooncakeL3Spec", ...] = ()

    @property
    def stores(self) -> tuple["MooncakeL3Spec", ...]:
        return (replace(self, others=()), *self.others)

    @property
    def master(self) -> str:
        return f"{self.master_host}:{self.master_port}"


L3Spec = FileL3Spec | RedisL3Spec | MooncakeL3Spec


def parse_l3_url(url: str) -> L3Spec:
    """`--l3` value -> spec.

    Example::

        parse_l3_url("file:/var/cache/hisa")      # FileL3Spec(path='/var/cache/hisa')
        parse_l3_url("redis://127.0.0.1:6379")    # RedisL3Spec(host='127.0.0.1', port=6379, db=0)
        parse_l3_url("redis://h:6379,h:6380/1")   # RedisL3Spec(host='h', port=6379, db=1, others=(('h', 6380),))
        parse_l3_url("mooncake://10.0.0.5:50051") # MooncakeL3Spec(..., metadata='http://10.0.0.5:8080/metadata')
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"--l3 is empty; use {FORMS}")
    url = url.strip()
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"--l3 {url!r} has no scheme; use {FORMS}")
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest  # file:///abs and file:/abs alike
        if not path:
            raise ConfigError(f"--l3 {url!r}: the directory is missing; use file:PATH, e.g. file:/tmp/hisa-l3")
        return FileL3Spec(path=path)
    if scheme in ("redis", "mooncake"):
        if not rest.startswith("//"):
            raise ConfigError(f"--l3 {url!r}: use {scheme}://HOST:PORT")
        parts = urlsplit(url)
        hosts = parts.netloc.split(",")
        servers = [_host_port(url, scheme, f"{scheme}://{h}") for h in hosts]
        host, port = servers[0]
        if len(set(servers)) != len(servers):
            raise ConfigError(f"--l3 {url!r}: a server is named twice")
        if scheme == "redis":
            if parts.query:
                raise ConfigError(f"--l3 {url!r}: redis takes no options; use redis://HOST:PORT[,HOST:PORT...][/DB]")
            db_text = parts.path.strip("/")
            if db_text and not db_text.isdigit():
                raise ConfigError(f"--l3 {url!r}: the database after the port must be a number (redis://HOST:PORT/0)")
            return RedisL3Spec(host=host, port=port, db=int(db_text or 0), others=tuple(servers[1:]))
        if parts.path.strip("/"):
            raise ConfigError(f"--l3 {url!r}: mooncake takes no path; use mooncake://MASTER_HOST:PORT[?metadata=URL]")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"metadata", "client", "pool_gb"}
        if unknown:
            raise ConfigError(f"--l3 {url!r}: unknown option(s) {sorted(unknown)}; the options are metadata=URL, "
                              f"client=HOST:PORT and pool_gb=GB")
        n = len(servers)
        metadata = query["metadata"][-1].split(",") if "metadata" in query else \
            [f"http://{h}:8080/metadata" for h, _ in servers]
        if len(metadata) != n or not all(metadata):
            raise ConfigError(f"--l3 {url!r}: metadata= names one URL per master ({n}), none empty")
        clients: list[str | None] = [None] * n
        if "client" in query:
            named = query["client"][-1].split(",")
            if len(named) != n:
                raise ConfigError(f"--l3 {url!r}: client= names one store process per master ({n})")
            clients = [":".join(map(str, _host_port(url, scheme, f"mooncake://{c}"))) for c in named]
        client = clients[0]
        try:
            pool_gb = float(query.get("pool_gb", ["4"])[-1])
        except ValueError:
            raise ConfigError(f"--l3 {url!r}: pool_gb= must be a number of GB") from None
        if "pool_gb" in query and client is None:
            raise ConfigError(f"--l3 {url!r}: pool_gb= sizes the shared pool of client=HOST:PORT; add client=")
        if not 0.05 <= pool_gb <= 1024:
            raise ConfigError(f"--l3 {url!r}: pool_gb= must be between 0.05 and 1024, got {pool_gb}")
        stores = [MooncakeL3Spec(master_host=h, master_port=p, metadata=m, client=c, pool_gb=pool_gb)
                  for (h, p), m, c in zip(servers, metadata, clients)]
        return replace(stores[0], others=tuple(stores[1:]))
    raise ConfigError(f"--l3 {url!r}: unknown scheme {scheme!r}; use {FORMS}")


def _host_port(url: str, scheme: str, one: str) -> tuple[str, int]:
    """(host, port) of `one` (scheme://HOST:PORT, a server of `url`); ConfigError if either is missing."""
    parts = urlsplit(one)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"--l3 {url!r}: the port is not a number in 1-65535") from None
    if not host or port is None:
        raise ConfigError(f"--l3 {url!r}: both a host and a port are needed ({scheme}://HOST:PORT)")
    return host, port
