"""Page keys: a chained content hash of a prompt's token pages, as SGLang HiCache and LMCache key KV.

    root    = H("hisa-kv-v1" | the KV layout: model id, dtype, page size, layers, kv heads, head dim, ...)
    key[0]  = H(root   | tokens of page 0)
    key[i]  = H(key[i-1] | tokens of page i)

so a page's key names its tokens *and every token before it*: two prompts share the keys of exactly
their common full pages, and changing one token changes that page's key and every later one. The
layout is in the root, so a different model, dtype, page size or layer layout never reads another's
KV. Only full pages get keys (a partial last page changes as tokens are added). H is BLAKE2b with a
16-byte digest (hex: 32 characters), keyed by nothing: collisions are 2^-64 likely at 2^32 pages.

Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Sequence

DIGEST_BYTES = 16
_VERSION = b"hisa-kv-v1"


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Everything that decides the bytes of a page besides its tokens.

    `model_id` must change when the weights do (e.g. the checkpoint's name and size, or the random
    preset and seed); `extra` holds anything else that changes the stored bytes (a layer kind list,
    a page layout version, the sliding windows).
    """
    model_id: str
    dtype: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self):
        if not self.model_id:
            raise ValueError("KVLayout.model_id is empty")
        for name in ("page_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    def root(self) -> bytes:
        """The chain's root digest: a hash of the layout alone."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(_VERSION + text, digest_size=DIGEST_BYTES).digest()


def chain_digest(parent: bytes, page_tokens: Sequence[int]) -> bytes:
    """The digest of one page given the digest before it (the root for page 0)."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(struct.pack(f"<{len(page_tokens)}q", *page_tokens))
    return h.digest()


def salted(parent: bytes, salt: bytes) -> bytes:
    """A chain digest turned onto a branch of its own by `salt`: the pages chained after it are named
    apart from the same tokens' pages chained after `parent` (a sparse request's decoded pages:
    `hisa.engine.sequence.Sequence.decode_salt`)."""
    return hashlib.blake2b(parent + salt, digest_size=DIGEST_BYTES, person=b"hisa-salted").digest()


def page_keys(token_ids: Sequence[int], layout: KVLayout, *, parent: bytes | None = None,
              salt: tuple[int, bytes] | None = None) -> list[str]:
    """The keys (hex) of every full page of `token_ids`: len(token_ids) // page_size of them.

    `parent` continues a chain (the digest of the page before `token_ids[0]`, from `bytes.fromhex`
    of its key) instead of starting at the layout's root. `salt` (page, salt): the chain is `salted`
    before that page (`Sequence.key_salt`).

    Example::

        layout = KVLayout(model_id="smollm2-135m", dtype="float32", page_size=16, num_layers=30,
                          num_kv_heads=3, head_dim=64)
        page_keys(list(range(40)), layout)   # two keys: tokens 0-15 and 16-31 (32-39 is not full)
    """
    s = layout.page_size
    digest = layout.root() if parent is None else parent
    keys: list[str] = []
    for start in range(0, len(token_ids) - s + 1, s):
        if salt is not None and start == salt[0] * s:
            digest = salted(digest, salt[1])
        digest = chain_digest(digest, token_ids[start:start + s])
        keys.append(digest.hex())
    return keys
