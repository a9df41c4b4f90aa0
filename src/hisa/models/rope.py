"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama), with llama3 / linear / YaRN scaling."""

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
    elif kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
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

        raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, yarn)")
    return inv_freq.float()


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN's blend of interpolated and extrapolated frequencies, in fp32 as transformers computes it."""
    factor = float(scaling["factor"])
    old_ctx = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` turns in old_ctx
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor YaRN multiplies cos/sin by (1 for every other scaling)."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    return _yarn_mscale(factor)


def yarn_softmax_mscale(scaling: dict | None) -> float:
    """DeepSeek's softmax-scale correction under scaled RoPE: the softmax scale is multiplied by the
    square of this (1 without scaling or without `mscale_all_dim`), as transformers' DeepSeek models do."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))


class RotaryEmbedding(torch.nn.Module):
    """cos/sin of absolute positions for RoPE (applied by `hisa.ops.qkv_rope.qkv_rope`).

    The table covers positions 0 .. n-1 on the device and grows on demand (doubling, at least 4K);
    `_ensure(max_pos, device)` grows it ahead of time (CUDA graphs must not grow it inside a capture).

    Example::

        rope = RotaryEmbedding(rope_inv_freq(64, 10000.0, None))
        cos_sin = rope.lookup(torch.tensor([0, 1, 2]), max_position=2)   # fp32 [3, 2, 32]
    """

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float = 1.0):
        """attention_factor: cos and sin are multiplied by it (YaRN's `rope_attention_factor`)."""
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self._cos_sin = None  # fp32 [n, 2, D/2]

    def _ensure(self, max_pos: int, device: torch.device) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current device: compare as "cuda:N"
            device = torch.device("cuda", torch.cuda.current_device())
        table = self._cos_sin
        same = table is not None and table.device == device
        if same and table.shape[0] > max_pos:
            return
        # grow geometrically on the same device (positions creep up one decode step at a time); a
        # table for another device is rebuilt at the size asked, never doubled
        n = max(int(max_pos) + 1, 2 * table.shape[0] if same else 0, 4096)
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [n, D/2], as transformers computes them
        self._cos_sin = torch.stack([freqs.cos(), freqs.sin()], dim=1)  # [n, 2, D/2]
        if self.attention_factor != 1.0:
            self._cos_sin = self._cos_sin * self.attention_factor

    def cos_sin(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) [T, D] of int64 positions [T] (D = 2 x len(inv_freq), both halves equal)."""
        half = self.lookup(positions, max_position)  # [T, 2, D/2]
        return torch.cat([half[:, 0], half[:, 0]], dim=-1), torch.cat([half[:, 1], half[:, 1]], dim=-1)

    def lookup(self, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """positions: int64 [T] → fp32 [T, 2, D/2], each token's (cos, sin) per frequency.

        `max_position` (an int the caller already knows) avoids a device sync to size the table.
        """
        self._ensure(int(positions.max()) if max_position is None else max_position, positions.device)
        return self._cos_sin[positions]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., D] by cos/sin broadcastable to [..., D] (from `RotaryEmbedding.cos_sin`), in fp32.

    interleaved=False: rotate-half pairs (x_i, x_{i+D/2}) (Llama; DeepSeek-V3.2's indexer).
    interleaved=True: adjacent pairs (x_0, x_1), (x_2, x_3), ... (DeepSeek's MLA; GLM-5's indexer); the
    result is written de-interleaved, [rotated evens | rotated odds], as transformers writes it: q and
    k get the same permutation, so q·k is that of the interleaved rotation.
    """
    if not interleaved:
        return _rotate(x, cos, sin)
    xf = x.float()
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # one angle per pair
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return torch.cat([even * c - odd * s, odd * c + even * s], dim=-1).to(x.dtype)
