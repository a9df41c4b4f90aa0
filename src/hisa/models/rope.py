"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama), with llama3 / linear scaling."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32), scaled as the model's config asks."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if freq_factors is not None:  # GGUF files of Llama 3.x store the llama3 scaling as per-frequency factors
        return (inv_freq / freq_factors.double()).float()
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        from hisa.errors import ModelLoadError

        raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to q and k given absolute positions; caches cos/sin on the device, grown on demand."""

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos = self._sin = None

    def _ensure(self, max_pos: int, device: torch.device) -> None:
        if self._cos is not None and self._cos.shape[0] > max_pos and self._cos.device == device:
            return
        n = max(int(max_pos) + 1, 2 * (0 if self._cos is None else self._cos.shape[0]), 4096)
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [n, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, D]
        self._cos, self._sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D], positions: int64 [T]. Returns rotated (q, k) in their dtype.

        `max_position` (an int the caller already knows) avoids a device sync to size the cache.
        """
        self._ensure(int(positions.max()) if max_position is None else max_position, q.device)
        cos = self._cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self._sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
