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
    """cos/sin of absolute positions for RoPE (applied by `hisa.ops.qkv_rope.qkv_rope`).

    The table covers positions 0 .. n-1 on the device and grows on demand (doubling, at least 4K);
    `_ensure(max_pos, device)` grows it ahead of time (CUDA graphs must not grow it inside a capture).

    Example::

        rope = RotaryEmbedding(rope_inv_freq(64, 10000.0, None))
        cos_sin = rope.lookup(torch.tensor([0, 1, 2]), max_position=2)   # fp32 [3, 2, 32]
    """

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos_sin = None  # fp32 [n, 2, D/2]

    def _ensure(self, max_pos: int, device: torch.device) -> None:
        table = self._cos_sin
        if table is not None and table.shape[0] > max_pos and table.device == device:
            return
        n = max(int(max_pos) + 1, 2 * (0 if table is None else table.shape[0]), 4096)
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [n, D/2], as transformers computes them
        self._cos_sin = torch.stack([freqs.cos(), freqs.sin()], dim=1)  # [n, 2, D/2]

    def lookup(self, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """positions: int64 [T] → fp32 [T, 2, D/2], each token's (cos, sin) per frequency.

        `max_position` (an int the caller already knows) avoids a device sync to size the table.
        """
        self._ensure(int(positions.max()) if max_position is None else max_position, positions.device)
        return self._cos_sin[positions]
