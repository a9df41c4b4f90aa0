"""The stored form of one L3 page: a 24-byte header, then the page's bytes.

    magic b"HL3\\x01" | payload length (u64) | crc32 (u32) | key length (u32) | key (utf-8) ... | payload

The checksum covers the key and the payload, so a flipped bit anywhere, a truncated value, or a value
stored under another page's key all read as a corrupt page (a miss), never as KV. crc32 (zlib's CRC-32)
finds every error burst of up to 32 bits; it guards against faults, not against an adversary who can
write the store. It is computed by zlib-ng's (package `zlib-ng`) where installed: the same values,
31 GB/s over 2 MiB pages in one thread on this project's CPU machine against 4.1 GB/s for the
system zlib 1.2.13's (bench/results/l3_read_cpu.json), which made the checks the bottleneck of a
load; else by zlib's. Both release the GIL on large buffers, so several threads check pages at once.

A record can be checked where it lies: `decode` takes it whole, `check` takes its head (header +
key) and its payload as two buffers, so a reader can put the payload straight where it is needed
(a row of a pinned host buffer) and the head in a small buffer beside it (`head_bytes`). A reader
that checks payloads elsewhere (the GPU, once they have landed there) checks the head here and takes
the checksum the payload must have (`expected_crc`, continued from `key_crc`).
"""

from __future__ import annotations

import struct

try:
    from zlib_ng.zlib_ng import crc32
    CRC32 = "zlib-ng"
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32
    CRC32 = "zlib"

MAGIC = b"HL3\x01"
_HEADER = struct.Struct("<4sQII")
HEADER_BYTES = _HEADER.size

Buffer = bytes | bytearray | memoryview


def head_bytes(key: str) -> int:
    """Bytes before the payload in the record of `key` (header + key)."""
    return HEADER_BYTES + len(key.encode())


def encode(key: str, payload: Buffer) -> bytes:
    """Frame `payload` (one page, any bytes-like) for storage under `key`."""
    kb = key.encode()
    crc = crc32(payload, crc32(kb))
    return b"".join((_HEADER.pack(MAGIC, len(payload), crc, len(kb)), kb, payload))


def check(key: str, head: Buffer, payload: Buffer) -> bool:
    """Whether `head` (exactly `head_bytes(key)` bytes) and `payload` are an intact page stored under
    `key`. Reads both in place (no copy)."""
    want = expected_crc(key, head, len(payload))
    return want is not None and crc32(payload, key_crc(key)) == want


def expected_crc(key: str, head: Buffer, payload_bytes: int) -> int | None:
    """The crc32 that the payload (`payload_bytes` long) of the record whose head is `head` must
    have, continued from `key_crc(key)`, if the head is sound for `key` (magic, lengths, the key
    itself); None if not (a corrupt record). What `check` compares, for a caller that checks the
    payload elsewhere (on the GPU: `hisa.ops.crc32.crc32_pages`)."""
    kb = key.encode()
    if len(head) != HEADER_BYTES + len(kb):
        return None
    head = memoryview(head)
    magic, length, crc, klen = _HEADER.unpack_from(head)
    if magic != MAGIC or klen != len(kb) or length != payload_bytes or head[HEADER_BYTES:] != kb:
        return None
    return crc


def key_crc(key: str) -> int:
    """The crc32 of the key: a record's checksum continues from it over the payload."""
    return crc32(key.encode())


def decode(key: str, record: Buffer | None) -> memoryview | None:
    """The payload of `record` if it is an intact page stored under `key`, else None (corrupt)."""
    if record is None:
        return None
    view = memoryview(record)
    n = head_bytes(key)
    if len(view) < n:
        return None
    payload = view[n:]
    return payload if check(key, view[:n], payload) else None
