"""Build a ready-to-run model (weights on the target device and dtype) from a :class:`ModelSource`."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hisa.errors import ModelLoadError
from hisa.models import loader
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.deepseek_v32 import DeepseekV32ForCausalLM
from hisa.models.gemma3 import Gemma3ForCausalLM
from hisa.models.layers import checkpoint_targets
from hisa.models.llama import LlamaForCausalLM

CausalLM = LlamaForCausalLM | Gemma3ForCausalLM | DeepseekV32ForCausalLM
# ModelConfig.family → the class that runs it
MODEL_CLASSES: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM,
                                            "deepseek_v32": DeepseekV32ForCausalLM}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None for random-weight presets
    source: loader.ModelSource


def load_model(model: str | None, *, device: torch.device, dtype: torch.dtype,
               progress: bool = True, seed: int = 0) -> LoadedModel:
    """Resolve `model` (path, "random:<preset>" or None for the embedded default) and load it.

    A progress bar shows tensors loaded (GGUF dequantization takes a few seconds per 100M params).
    """
    source = loader.resolve_model(model)
    rope_freqs = reader = None
    if source.kind == "random":
        return random_model(ModelConfig(**PRESETS[source.preset]), device=device, dtype=dtype, seed=seed,
                            source=dataclasses.replace(source, seed=seed))
    else:
        if source.kind == "gguf":
            reader = loader.open_gguf(source.path)
            cfg = loader.gguf_config(reader, source.path)
            tensors, total = loader.gguf_tensors(reader, cfg), len(reader.tensors)
        else:
            cfg = loader.hf_config(source.path)
            tensors, total = loader.hf_tensors(source.path), loader.hf_num_tensors(source.path)
        net = _empty_model(cfg, device, dtype)
        if isinstance(net, DeepseekV32ForCausalLM):  # per-expert tensors fused, MTP layers dropped
            tensors = net.convert_checkpoint(tensors)
        params = checkpoint_targets(net)  # checkpoint name → parameter, or rows of a fused one (qkv, gate|up)
        seen: set[str] = set()
        bar = tqdm(tensors, total=total, desc=f"loading {cfg.name or source.path.name}", unit="tensor",
                   disable=not progress, leave=False)
        for name, tensor in bar:
            if name == "rope_freqs":
                rope_freqs = tensor
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in params:
                raise ModelLoadError(f"{source.path}: unexpected tensor {name!r} for a {cfg.arch} model")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))  # the model dtype, or fp32 where kept so
            seen.add(name)
        expected = {n for n in params if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
        missing = sorted(expected - seen)
        if missing:
            raise ModelLoadError(f"{source.path}: weights missing for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    _init_rope(net, cfg, rope_freqs, device)
    net.eval()
    tokenizer = loader.load_tokenizer(source, reader)
    return LoadedModel(net, cfg, tokenizer, source)


def random_model(cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 source: loader.ModelSource | None = None) -> LoadedModel:
    """A model of any shape with random weights (no tokenizer), e.g. a preset varied for a test.

    Example::

        cfg = ModelConfig(**{**PRESETS["tiny-gemma3"], "sliding_window": 8})
        loaded = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    """
    net = _empty_model(cfg, device, dtype)
    _randomize(net, seed)
    _init_rope(net, cfg, None, device)
    net.eval()
    return LoadedModel(net, cfg, None, source or loader.ModelSource("random", preset=cfg.name or None, seed=seed))


def _init_rope(net: CausalLM, cfg: ModelConfig, rope_freqs, device: torch.device) -> None:
    """Rotary buffers are not weights: the meta-device build left them empty, compute them here."""
    if isinstance(net, Gemma3ForCausalLM):
        global_freq, local_freq = Gemma3ForCausalLM.rope_inv_freqs(cfg, rope_freqs)
        net.rope.inv_freq, net.rope_local.inv_freq = global_freq.to(device), local_freq.to(device)
    elif isinstance(net, DeepseekV32ForCausalLM):  # RoPE covers only the qk_rope_head_dim slice
        net.rope.inv_freq = DeepseekV32ForCausalLM.rope_inv_freq(cfg).to(device)
    else:
        net.rope.inv_freq = _inv_freq(cfg, rope_freqs).to(device)


def _inv_freq(cfg: ModelConfig, rope_freqs):
    from hisa.models.rope import rope_inv_freq

    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rope_freqs)


def _empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device("meta"):
        net = MODEL_CLASSES[cfg.family](cfg)
    net = net.to_empty(device=device).to(dtype)
    for p in getattr(net, "fp32_parameters", list)():  # DeepSeek: indexer head weights, router bias
        p.data = p.data.float()
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net


@torch.no_grad()
def _randomize(net: CausalLM, seed: int) -> None:
    """Random weights with sane scales (for shape-only benchmarks): N(0, 0.02) matrices, unit norms."""
    gen = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    # Gemma's norms scale by (1 + weight): 0 is the unit norm there
    unit_norm = 0.0 if isinstance(net, Gemma3ForCausalLM) else 1.0
    for name, p in net.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(unit_norm)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
