"""CRC-32 (zlib's) of many equal-length pages on the device: `crc32_pages`.

An L3 page is checked by the crc32 of its key and its payload (`hisa.kvcache.l3.record`). Checking
2 GiB of pages read from the page cache took a third of a 16K-token prompt's load on the H200
machine's host (zlib-ng, 35-40 ms of the ~125 ms read + check on 8 threads; bench/results/
l3_mmap_probe_gpu_h200.json), while the pages land on the GPU anyway: `crc32_pages` computes the
same values there, over the landed pages, in a few milliseconds.

The arithmetic. zlib's crc32(data, value) is ~R(~value, data), where R(s, data) runs the CRC
register from state s over the bytes (reflected, polynomial 0xEDB88320). R is linear over GF(2):
R(s, data) = Z^n s ^ R(0, data) for n = len(data), Z being one zero byte's step, and a message cut
into pieces A|B gives R(0, A|B) = Z^len(B) R(0, A) ^ R(0, B). So a page is cut into PIECES, one
program each, and a program's LANES lanes each run the register over their own CHUNK consecutive
words (slicing-by-4: four table lookups per 32-bit word); each lane's result is shifted past the
rest of its piece (a 32 x 32 GF(2) matrix per lane) and the lanes XORed, the piece's shifted past
the pieces after it (a matrix per piece), and the pieces XORed into the page's crc by atomic XORs
(so the programs of a page need no second pass). Leading zero bytes do not change R(0, .), so a
page whose words do not fill PIECES x LANES x CHUNK is padded with zeros in front. The key's crc
enters as Z^n applied to ~value (one more matrix), and the final inversion as an XOR with all ones,
both added by a page's first piece. The matrices depend only on the page length and are made once
per length on the host (`_tables`).
(One program per page ran ~3.5 ms for any number of 2 MiB pages on an H200: a program's lanes are
serial; a landing copy of 64 pages then took longer to check than to copy.)
"""

from __future__ import annotations

import functools
import zlib

import torch

from hisa.ops._checks import next_pow2, want_triton

POLY = 0xEDB88320  # CRC-32, reflected (zlib, gzip, PNG)
LANES = 256        # lanes (independent runs of the register) per program
LANE_WORDS = 64    # words each lane runs over (about): a page is cut into as many pieces as that needs


def crc32_pages(pages: torch.Tensor, values: torch.Tensor, *, use_triton: bool | None = None,
                lanes: int = LANES, pieces: int | None = None) -> torch.Tensor:
    """zlib.crc32(bytes of pages[i], values[i]) for every page, as int64 [N].

    pages: [N, ...] any dtype, each page's bytes contiguous (rows may be strided), bytes per page a
    multiple of 4. values: int64 [N], the crc to continue from (zlib's `value`: the crc of what came
    before the page, e.g. its key; 0 for none), on pages' device. use_triton: None = Triton iff on
    CUDA (elsewhere zlib on the host). lanes (a power of two) and pieces (programs per page; None:
    enough for about LANE_WORDS words per lane) tune the kernel.

    Example::

        crc = crc32_pages(torch.arange(8, dtype=torch.uint8).view(2, 4), torch.zeros(2, dtype=torch.int64))
        crc.tolist() == [zlib.crc32(bytes([0, 1, 2, 3])), zlib.crc32(bytes([4, 5, 6, 7]))]   # True
    """
    words = _as_words(pages)
    if not isinstance(values, torch.Tensor) or values.shape != (pages.shape[0],) or values.dtype != torch.int64:
        raise ValueError(f"values must be an int64 tensor of shape ({pages.shape[0]},) (one crc per page), got "
                         f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
    if values.device != pages.device:
        raise ValueError(f"values is on {values.device} but pages is on {pages.device}; move them to one device")
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    if pieces is not None and pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    if not want_triton(use_triton, pages):
        return crc32_pages_ref(pages, values)
    from hisa.ops.triton_crc32 import crc32_pages_kernel

    N, W = words.shape
    out = torch.zeros(N, dtype=torch.int32, device=pages.device)
    if N == 0:
        return out.long()
    lanes = min(lanes, next_pow2(W))
    if pieces is None:
        pieces = max(1, W // (lanes * LANE_WORDS))
    pieces = min(pieces, -(-W // lanes))
    chunk = -(-W // (lanes * pieces))
    tables, lane_cols, piece_cols, tail_cols = _tables(W, lanes, pieces, pages.device)
    crc32_pages_kernel[(N, pieces)](words, values, out, tables, lane_cols, piece_cols, tail_cols, W, words.stride(0),
                                    pieces * lanes * chunk - W, CHUNK=chunk, LANES=lanes,
                                    num_warps=4 if pages.is_cuda else 1)
    return out.long() & 0xFFFFFFFF


def crc32_pages_ref(pages: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The reference: zlib.crc32 of each page's bytes on the host."""
    words = _as_words(pages).cpu()
    got = [zlib.crc32(words[i].numpy().tobytes(), int(v)) for i, v in enumerate(values.tolist())]
    return torch.tensor(got, dtype=torch.int64, device=pages.device)


def _as_words(pages: torch.Tensor) -> torch.Tensor:
    """pages as int32 words [N, W] (a view: no copy)."""
    if not isinstance(pages, torch.Tensor) or pages.ndim < 1:
        raise ValueError(f"pages must be a tensor [N, ...], got {type(pages).__name__}")
    flat = pages.reshape(pages.shape[0], -1) if pages.ndim > 1 else pages.view(-1, 1)
    if flat.shape[1] > 1 and flat.stride(1) != 1:
        raise ValueError(f"each page's bytes must be contiguous, got strides {tuple(pages.stride())}")
    nbytes = flat.shape[1] * flat.element_size()
    if nbytes % 4 or nbytes == 0:
        raise ValueError(f"a page must be a positive multiple of 4 bytes long, got {nbytes}")
    byte_rows = flat.view(torch.uint8) if flat.shape[0] else flat.new_empty(0, nbytes, dtype=torch.uint8)
    if flat.shape[0] and flat.stride(0) * flat.element_size() % 4:
        raise ValueError("pages must start 4-byte aligned (row stride in bytes a multiple of 4)")
    return byte_rows.view(torch.int32)


# ---- GF(2) arithmetic on the CRC register (32-bit ints; a matrix is its 32 columns) ----

def _zero_byte(s: int) -> int:
    """One zero byte through the register: Z(s)."""
    for _ in range(8):
        s = (s >> 1) ^ (POLY if s & 1 else 0)
    return s


def _apply(cols: list[int], x: int) -> int:
    y, k = 0, 0
    while x:
        if x & 1:
            y ^= cols[k]
        x >>= 1
        k += 1
    return y


def _mul(a: list[int], b: list[int]) -> list[int]:
    """The matrix of a after b."""
    return [_apply(a, c) for c in b]


def _shift(nbytes: int) -> list[int]:
    """Z^nbytes: the register after nbytes zero bytes."""
    result = [1 << k for k in range(32)]
    step = [_zero_byte(1 << k) for k in range(32)]
    while nbytes:
        if nbytes & 1:
            result = _mul(step, result)
        step = _mul(step, step)
        nbytes >>= 1
    return result


def _signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


@functools.lru_cache(maxsize=1)
def _byte_tables() -> list[int]:
    """Slicing-by-4's tables, concatenated: table m (m = 0..3) maps a byte b to Z^(m + 1) b (the
    word's byte 3 - m). The same for every page length."""
    tables = []
    for m in range(4):
        for b in range(256):
            s = b
            for _ in range(m + 1):
                s = _zero_byte(s)
            tables.append(s)
    return tables


@functools.lru_cache(maxsize=16)
def _host_tables(words: int, lanes: int, pieces: int) -> tuple[list[int], list[int], list[int], list[int]]:
    chunk = -(-words // (lanes * pieces))
    return (_byte_tables(), _powers(_shift(4 * chunk), lanes), _powers(_shift(4 * chunk * lanes), pieces),
            _shift(4 * words))


def _powers(step: list[int], n: int) -> list[int]:
    """The columns of step^(n - 1), step^(n - 2), ..., step^0, concatenated: entry i shifts the
    i-th of n equal parts past the parts after it."""
    out = [[1 << k for k in range(32)]]
    for _ in range(n - 1):
        out.append(_mul(step, out[-1]))
    return [c for m in reversed(out) for c in m]


def _tables(words: int, lanes: int, pieces: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The kernel's constants for pages of `words` words, on `device` (made once per shape and device)."""
    return _device_tables(words, lanes, pieces, str(device))


@functools.lru_cache(maxsize=16)
def _device_tables(words: int, lanes: int, pieces: int, device: str) -> tuple[torch.Tensor, ...]:
    def t(xs):
        return torch.tensor([_signed(x) for x in xs], dtype=torch.int32, device=device)
    return tuple(t(x) for x in _host_tables(words, lanes, pieces))
