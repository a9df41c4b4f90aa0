"""L3 backend `redis`: pages as string values in a Redis server (redis-py), shareable by processes.

Keys are `hisa:l3:<key>`. Batches are one round trip each (MGET, a pipeline of EXISTS, of SET,
one DEL). Replies are parsed by hiredis (C) when it is installed (the `l3` extra pins it).

The load path (`get_into`, what `L3Store.get_into` calls from its reader threads, one page per
call) does not go through redis-py: each reader thread keeps a socket of its own to the server,
sends one GET and receives the bulk reply's bytes straight into the page's buffers (a row of the
pinned host rows) with `recv_into`, so no bytes object is made and nothing is copied in Python;
several threads read pages at once (`recv_into` releases the GIL). redis-py and hiredis can only
return a reply as a new bytes object (and an MGET of a whole prefix is one reply of gigabytes,
built by the server's one thread): `L3Store.get_into` of 2 MiB pages through MGET moved 0.45 GB/s
with redis-py's own parser and 1.09 GB/s with hiredis on a 2-core machine, 0.33 and 0.62 GB/s on an
H200 machine's host (`python bench/l3_redis_read.py`, bench/results/l3_redis_read_cpu.json,
_h200.json). The client does not retry and times out after `timeout_s`, so a server that went away
surfaces as one RedisError or OSError that L3Store turns into "no L3" instead of a stalled engine
step; a socket whose reply was cut off is closed, never reused out of step.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

PREFIX = "hisa:l3:"


class RedisBackend:
    """One Redis database. `redis-server` itself is not started here.

    Example::

        b = RedisBackend("127.0.0.1", 6379)
        b.set(["ab12"], [b"..."]); b.exists(["ab12"])   # [True]
    """
    name = "redis"
    errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)

    def __init__(self, host: str, port: int, db: int = 0, *, timeout_s: float = 2.0, prefix: str = PREFIX):
        self.prefix = prefix
        self.host, self.port, self.db, self.timeout_s = host, port, db, timeout_s
        self.client = redis.Redis(host=host, port=port, db=db, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.client.ping()   # raises at start-up if the server is not there
        self._local = threading.local()   # .reader: this thread's _Reader for get_into
        self._readers: list[_Reader] = []   # every thread's, to close them
        self._generation = 0   # bumped by a failed read: older sockets are not used again
        self._lock = threading.Lock()

    def _k(self, key: str) -> str:
        return self.prefix + key

    def exists(self, keys: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.client.mget([self._k(k) for k in keys])

    def get_into(self, keys: Sequence[str], buffers: Sequence[Sequence[memoryview]]) -> list[int | None]:
        """Read each key's value straight into its writable `buffers` (filled in order) if it is
        exactly as long as they are; its length (its bytes read and dropped if it differs), or None
        if absent. Safe to call from several threads at once: each has its own socket."""
        reader = getattr(self._local, "reader", None)
        if reader is None or reader.generation != self._generation or not reader.idle():
            self._local.reader = None   # closed below: never taken up again, even if _Reader raises
            if reader is not None:
                reader.close()
            reader = _Reader(self.host, self.port, self.db, self.timeout_s, self._generation)
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        try:
            return [reader.get_into((self.prefix + k).encode(), bufs) for k, bufs in zip(keys, buffers, strict=True)]
        except BaseException:
            # mid-reply this socket is out of step; and the server may be gone: every thread's
            # socket is replaced at its next call
            with self._lock:
                self._generation += 1
            self._local.reader = None
            reader.close()
            raise

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(self._k(key), value)
        pipe.execute()

    def delete(self, keys: Sequence[str]) -> None:
        self.client.delete(*[self._k(k) for k in keys])

    def listing(self) -> list[tuple[str, int]]:
        """(key, bytes) of this prefix's pages, in scan order (Redis keeps no write time)."""
        names = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.strlen(name)
        n = len(self.prefix)
        return [(name.decode()[n:], size) for name, size in zip(names, pipe.execute()) if size]

    def close(self) -> None:
        self.client.close()
        with self._lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        self._generation += 1


class _Reader:
    """One socket speaking just enough RESP for GET: the command out, the bulk reply's bytes in,
    straight into the caller's buffers."""

    def __init__(self, host: str, port: int, db: int, timeout_s: float, generation: int):
        self.generation = generation
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        self._crlf = memoryview(bytearray(2))
        if db:
            self.sock.sendall(_command(b"SELECT", str(db).encode()))
            if self._header() != b"+OK":
                raise redis.exceptions.ResponseError(f"SELECT {db} failed")

    def idle(self) -> bool:
        """Whether the socket is usable: between replies nothing may be readable, so a readable
        socket was closed by the server (an idle timeout, a restart) or is out of step. One we
        closed is not usable either, whatever socket its descriptor number now belongs to."""
        return self.sock.fileno() >= 0 and not self._poll.poll(0)

    def get_into(self, name: bytes, buffers: Sequence[memoryview]) -> int | None:
        self.sock.sendall(_command(b"GET", name))
        head = self._header()
        if head[:1] != b"$" or not head[1:].lstrip(b"-").isdigit():
            raise redis.exceptions.ResponseError(f"GET replied {bytes(head[:200])!r}")
        size = int(head[1:])
        if size < 0:
            return None
        views = [memoryview(b).cast("B") for b in buffers]
        if size == sum(len(v) for v in views):
            for view in views:
                self._recv_into(view)
            self._recv_into(self._crlf)   # the reply's closing CRLF
        else:   # not a page of this length: read past it, the socket stays in step
            spare = memoryview(bytearray(min(size + 2, 1 << 20)))
            left = size + 2
            while left:
                left -= self._recv_into(spare[:min(left, len(spare))])
        return size

    def _header(self) -> bytes:
        """The reply's first line, without its CRLF (a bulk reply's `$<length>`, an error's text).
        Peeks before it takes, so no byte past the line is read: the value that follows lands in
        the caller's buffer."""
        line = b""
        while True:
            seen = self.sock.recv(64, socket.MSG_PEEK)
            if not seen:
                raise ConnectionError("the Redis server closed the connection")
            end = seen.find(b"\r\n")
            if end >= 0:
                return line + self.sock.recv(end + 2)[:end]
            take = len(seen) - seen.endswith(b"\r")   # (a CR whose LF is still on its way stays)
            if take:
                line += self.sock.recv(take)
            if len(line) > 1 << 16:
                raise redis.exceptions.ResponseError(f"reply line too long: {line[:200]!r}")

    def _recv_into(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = self.sock.recv_into(view[done:])
            if n == 0:
                raise ConnectionError("the Redis server closed the connection mid-reply")
            done += n
        return done

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _command(*parts: bytes) -> bytes:
    return b"".join([b"*%d\r\n" % len(parts)] + [b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])
