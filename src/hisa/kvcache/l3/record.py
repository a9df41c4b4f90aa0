"""The stored form of one L3 page: a 24-byte header, then the page's bytes.

    magic b"HL3\\x01" | payload length (u64) | crc32 (u32) | key length (u32) | key (utf-8) ... | payload

The checksum covers the key and the payload, so a flipped bit anywhere, a truncated value, or a value
stored under another page's key all read as a corrupt page (a miss), never as KV. crc32 (zlib) finds
every error burst of up to 32 bits and runs at GB/s; it guards against faults, not against an
adversary who can write the store.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"HL3\x01"
_HEADER = struct.Struct("<4sQII")
HEADER_BYTES = _HEADER.size


def encode(key: str, payload: bytes | bytearray | memoryview) -> bytes:
    """Frame `payload` (one page, any bytes-like) for storage under `key`."""
    kb = key.encode()
    crc = zlib.crc32(payload, zlib.crc32(kb))
    return b"".join((_HEADER.pack(MAGIC, len(payload), crc, len(kb)), kb, payload))


def decode(key: str, record: bytes | bytearray | memoryview | None) -> memoryview | None:
    """The payload of `record` if it is an intact page stored under `key`, else None (corrupt)."""
    if record is None or len(record) < HEADER_BYTES:
        return None
    view = memoryview(record)
    magic, length, crc, klen = _HEADER.unpack_from(view)
    kb = key.encode()
    if magic != MAGIC or klen != len(kb) or len(view) != HEADER_BYTES + klen + length:
        return None
    if bytes(view[HEADER_BYTES:HEADER_BYTES + klen]) != kb:
        return None
    payload = view[HEADER_BYTES + klen:]
    if zlib.crc32(payload, zlib.crc32(kb)) != crc:
        return None
    return payload
