"""Shared fixtures: the embedded SmolLM2 loaded once per test session (weights reused by every engine)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is first imported: set it before any test
# (an engine test imports the kernels too) so the CPU-only kernel tests run in the interpreter
# whatever the order. The engine itself picks Triton only for CUDA tensors, so this changes nothing else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """hisa's LoadedModel of the embedded SmolLM2-135M-Instruct, fp32 on the CPU."""
    from hisa.models.factory import load_model

    return load_model(None, device=torch.device("cpu"), dtype=torch.float32, progress=False)


def load_hf_reference(loaded):
    """transformers' own fp32 load of the GGUF file behind hisa's LoadedModel `loaded` (eval mode)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = loaded.source.path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gemma3():
    """hisa's LoadedModel of Gemma-3-270M, fp32 on the CPU, loaded once per test session (the GGUF is
    assembled on first use; gguf's parse of the 262K-token vocabulary in the file's metadata takes
    ~7 s of the load here, and took ~23-40 s before `loader.open_gguf` parsed a plain view)."""
    from hisa.models.factory import load_model

    return load_model("gemma3-270m", device=torch.device("cpu"), dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    """Hugging Face transformers' own load of the same GGUF file (fp32), the reference."""
    return load_hf_reference(smollm2)


@pytest.fixture
def make_llm(smollm2):
    """Build an LLM over the session's SmolLM2 weights with engine options of the test's choosing."""
    from hisa import LLM

    def make(**kwargs):
        kwargs.setdefault("progress", False)
        return LLM(loaded=smollm2, device="cpu", dtype="float32", **kwargs)

    return make


def long_text(n_words: int, seed: int = 0) -> str:
    """Deterministic varied English-ish text of about `n_words` words (prompt material for tests)."""
    import random

    rng = random.Random(seed)
    words = ("the a river mountain quiet engine paper window seven garden old bright storm city "
             "market silver letter morning travels under over near between writes finds keeps "
             "green blue small large early late history music number ocean forest road").split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(words))
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def sharp_tiny_dsa(seed: int = 3, **dsa):
    """The `tiny-deepseek-v3.2` preset with random fp32 weights on the CPU, scaled to N(0, 0.1)
    (from N(0, 0.02)) so attention and the indexer's scores are sharp enough that selection matters.
    dsa: DSA fields to change (e.g. kv_lora_rank=128, which an FP8 latent cache needs)."""
    from hisa.models.config import PRESETS, ModelConfig
    from hisa.models.factory import random_model

    preset = dict(PRESETS["tiny-deepseek-v3.2"])
    preset["dsa"] = {**preset["dsa"], **dsa}
    loaded = random_model(ModelConfig(**preset), device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim >= 2:
                p.mul_(5.0)
    return loaded


def compile_for_hopper(script: str, *args: str) -> None:
    """Run `script` (python -c, with `args`) in a process without TRITON_INTERPRET, where it compiles
    Triton kernels for sm_90 (`triton.compile(..., target=GPUTarget("cuda", 90, 32))`: PTX and a
    cubin, no GPU needed); fail the test with its stderr if it does not exit 0. The interpreter the
    CPU kernel tests use accepts code the compiler refuses (two returns under a constexpr `if`)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
