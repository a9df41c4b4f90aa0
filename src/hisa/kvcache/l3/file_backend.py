"""L3 backend `file`: one file per page in a directory on local disk.

Layout `ROOT/<first two characters of the key>/<key>` (256 subdirectories for hex keys, so no
directory grows past a few thousand entries per million pages). A page is written to a temporary
file in its subdirectory and renamed over its name (`os.replace`, atomic on POSIX), so a reader sees
the whole old page, the whole new page or nothing, and a crash leaves at most a `.tmp` file (removed
by a later start-up's listing once it is 10 minutes old: a younger one may be another process's write).
Pages are not fsynced: L3 is a cache, a page lost in a power cut reads as a miss and the checksum
catches a torn one.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Sequence

from hisa.kvcache.l3.threads import LazyThreads

_KEY = re.compile(r"^[A-Za-z0-9_-]{3,200}$")
_TMP = ".tmp"
STALE_TMP_S = 600.0   # a temporary file older than this is a crash's leftover (a page is written in well under)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_into(path: str, buffers: Sequence[memoryview]) -> int | None:
    """Read the file at `path` across `buffers` (in order) if its size is theirs in all; its size,
    or None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        views = [memoryview(b).cast("B") for b in buffers]
        if size != sum(len(v) for v in views):
            return size
        done = 0
        while views:
            n = os.preadv(fd, views, done)
            if n == 0:   # the file is a whole page or nothing (writes are renamed in): only a disk fault lands here
                return done
            done += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][n:]
        return size
    finally:
        os.close(fd)


class FileBackend:
    """Pages as files under `root` (created if missing). Keys: letters, digits, '_' and '-'.

    Example::

        b = FileBackend("/tmp/hisa-l3")
        b.set(["ab12"], [b"..."]); b.get(["ab12", "cd34"])   # [b"...", None]
    """
    name = "file"
    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, root: str):
        self._readers = LazyThreads("hisa-l3-file")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"L3 directory {self.root} is not writable")

    def path(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"L3 key {key!r} is not a valid file name (letters, digits, '_', '-', 3-200 of them)")
        return os.path.join(self.root, key[:2], key)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [os.path.exists(self.path(k)) for k in keys]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Pages are read by a few threads at once (file reads release the GIL): one reader
        thread moved ~0.6 GB/s from the page cache on the H200 machine, far below what its GPU
        prefills."""
        return self._readers.map(_read, [self.path(k) for k in keys])

    def get_into(self, keys: Sequence[str], buffers: Sequence[Sequence[memoryview]]) -> list[int | None]:
        """Read each key's page straight into its writable `buffers` (one `preadv` of the file
        across them, no intermediate bytes object) if the page is exactly as long as they are; its
        length (not read if it differs), or None if absent. Reads on the calling thread; safe to
        call from several threads at once (L3Store does, one page per call)."""
        return [_read_into(self.path(k), bufs) for k, bufs in zip(keys, buffers, strict=True)]

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            path = self.path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP}"
            try:
                with open(tmp, "wb", buffering=0) as f:
                    view = memoryview(value)
                    while view:
                        view = view[f.write(view):]
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            _unlink(self.path(key))

    def listing(self) -> list[tuple[str, int]]:
        """(key, bytes) of every stored page, least recently written first; removes stale temporaries."""
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.root) as subdirs:
            for sub in subdirs:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as entries:
                    for e in entries:
                        if e.name.endswith(_TMP):
                            # a crash's leftover; a younger one may be another process's write in flight
                            # (its rename would fail and turn its L3 off)
                            try:
                                if time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_S:
                                    _unlink(e.path)
                            except FileNotFoundError:
                                pass
                        elif _KEY.match(e.name) and e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            found.append((st.st_mtime, e.name, st.st_size))
        found.sort()
        return [(key, size) for _, key, size in found]

    def close(self) -> None:
        self._readers.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
