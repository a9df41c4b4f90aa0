"""The sampler and SamplingParams: every value the boundary accepts samples safely in fp32, every value it
cannot take is refused by name, and one bad row fails alone."""

from __future__ import annotations

import pytest
import torch

from hisa import SamplingParams
from hisa.engine.sampler import Sampler
from hisa.engine.sampling_params import FP32_TINY
from hisa.engine.sequence import Sequence
from hisa.errors import InvalidRequestError

V = 50


def _seq(i=0, output=(), **params):
    seq = Sequence(request_id=str(i), prompt_token_ids=[1, 2, 3], params=SamplingParams(**params))
    seq.token_ids.extend(output)
    return seq


def _logits(rows=4, seed=0):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 8


@pytest.mark.parametrize("temperature", [FP32_TINY, 1e-30, 1e-8])
def test_tiny_temperature_puts_all_mass_on_the_top_token(temperature):
    logits = _logits()
    sampler = Sampler(torch.device("cpu"), seed=0)
    for trial in range(20):
        seqs = [_seq(i, temperature=temperature) for i in range(4)]
        assert sampler.sample(logits, seqs) == logits.argmax(-1).tolist()


def test_huge_temperature_samples_nearly_uniformly_without_nan():
    logits = _logits(rows=1)
    sampler = Sampler(torch.device("cpu"), seed=0)
    seen = {sampler.sample(logits, [_seq(temperature=1e30)])[0] for _ in range(400)}
    assert len(seen) > V // 2  # no NaN error, and not stuck on the argmax


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 1e-40, "cannot be applied in fp32"),
    ("temperature", float("inf"), "temperature must be >= 0 (0 = greedy) and finite"),
    ("temperature", float("nan"), "temperature must be >= 0 (0 = greedy) and finite"),
    ("temperature", 1e39, "cannot be applied in fp32"),
    ("seed", 2**64, "seed must be an integer in [0, 2**64 - 1]"),
    ("seed", -1, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("max_tokens", True, "max_tokens must be an integer"),
    ("top_p", float("nan"), "top_p must be in (0, 1]"),
    ("top_k", -2, "top_k must be an integer >= 0"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty", float("-inf"), "frequency_penalty must be in [-2, 2]"),
    ("logit_bias", {"abc": 1}, "logit_bias keys must be token ids"),
    ("logit_bias", {"5": 101}, "logit_bias values must be in [-100, 100]"),
    ("stop", ["x" * 2000], "at most 32 stop strings"),
    ("stop", [""], "stop strings must be non-empty"),
    ("ignore_eos", "yes", "ignore_eos must be true or false"),
])
def test_values_the_sampler_cannot_take_are_refused_by_name(field, value, message):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert message in str(e.value)


def test_the_largest_seed_works_and_is_reproducible():
    logits = _logits(rows=1)
    draws = {Sampler(torch.device("cpu"), seed=i).sample(logits, [_seq(temperature=5.0, seed=2**64 - 1)])[0]
             for i in range(5)}  # fresh samplers with different engine seeds: the request's seed decides
    assert len(draws) == 1


def test_logit_bias_moves_greedy_and_sampled_picks():
    logits = _logits(rows=1)
    top = int(logits.argmax())
    target = (top + 7) % V
    sampler = Sampler(torch.device("cpu"))
    assert sampler.sample(logits, [_seq(logit_bias={str(target): 100})]) == [target]
    second = int(logits[0].topk(2).indices[1])
    assert sampler.sample(logits, [_seq(logit_bias={top: -100})]) == [second]
    assert sampler.sample(logits, [_seq(temperature=1e-3, logit_bias={target: 100})]) == [target]


def test_presence_and_frequency_penalties_lower_generated_tokens():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 10.0, 9.0
    seq = _seq(output=[3, 3, 3], frequency_penalty=0.5, presence_penalty=0.4)
    row = Sampler(torch.device("cpu"))._adjusted(logits[0], seq)
    assert row[3].item() == pytest.approx(10.0 - 3 * 0.5 - 0.4)
    assert row[4].item() == 9.0 and logits[0, 3] == 10.0  # other tokens and the input untouched
    assert Sampler(torch.device("cpu")).sample(logits, [seq]) == [4]  # greedy with penalties
    assert Sampler(torch.device("cpu")).sample(logits, [_seq(output=[3, 3, 3])]) == [3]  # without


def test_a_bias_and_penalties_on_one_token_add_up():
    logits = torch.zeros(1, V)
    seq = _seq(output=[5, 5, 7], frequency_penalty=1.0, presence_penalty=0.5, logit_bias={5: 2.0, 9: -1.0})
    row = Sampler(torch.device("cpu"))._adjusted(logits[0], seq)
    assert row[5].item() == pytest.approx(2.0 - 2 * 1.0 - 0.5)
    assert row[7].item() == pytest.approx(-1.0 - 0.5) and row[9].item() == -1.0 and row[0].item() == 0.0


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.full((1, V), -30.0)
    logits[0, :3] = torch.tensor([0.0, -0.1, -5.0])  # probs ~ 0.52, 0.47, 0.003
    sampler = Sampler(torch.device("cpu"), seed=1)
    drawn = {sampler.sample(logits, [_seq(temperature=1.0, min_p=0.5)])[0] for _ in range(200)}
    assert drawn == {0, 1}
    assert {sampler.sample(logits, [_seq(temperature=1.0, min_p=1.0)])[0] for _ in range(50)} == {0}


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-50])
@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"min_p": 0.5}])
def test_a_top_p_below_fp32s_smallest_keeps_the_top_token(top_p, extra):
    # valid (top_p is in (0, 1]) but 0 in fp32: the nucleus is the top token, never an empty row
    logits = _logits()
    sampler = Sampler(torch.device("cpu"), seed=0)
    seqs = [_seq(i, temperature=1.0, top_p=top_p, **extra) for i in range(4)]
    assert sampler.sample(logits, seqs) == logits.argmax(-1).tolist()


def test_a_failing_row_fails_alone():
    logits = _logits(rows=3)
    logits[1] = float("nan")
    seqs = [_seq(0, temperature=0.7, seed=1), _seq(1, temperature=0.7, seed=1), _seq(2)]
    out = Sampler(torch.device("cpu")).sample(logits, seqs)
    assert isinstance(out[1], Exception)
    assert isinstance(out[0], int) and out[2] == int(logits[2].argmax())


def test_sampling_on_the_device_leaves_valid_tokens_and_reads_once():
    """sample_on_device keeps the draw on the device: a NaN row holds a placeholder id (valid input
    for the next step) and reads back as an exception; the other rows equal `sample`'s."""
    logits = _logits(rows=3)
    logits[1] = float("nan")
    seqs = [_seq(0, temperature=0.7, seed=1), _seq(1, temperature=0.7, seed=1), _seq(2)]
    draw = Sampler(torch.device("cpu")).sample_on_device(logits, seqs)
    assert draw.tokens.shape == (3,) and draw.tokens.dtype == torch.int64
    assert bool(((draw.tokens >= 0) & (draw.tokens < V)).all())
    assert draw.failed.tolist() == [False, True, False]
    got = draw.read()
    assert isinstance(got[1], RuntimeError) and "not finite" in str(got[1])
    ref = Sampler(torch.device("cpu")).sample(logits, seqs)
    assert got[0] == ref[0] and got[2] == ref[2] == int(logits[2].argmax())


def test_token_ids_are_checked_against_the_vocabulary():
    SamplingParams(logit_bias={"10": 1.0}, stop_token_ids=[3]).check_vocab(V)
    with pytest.raises(InvalidRequestError, match=r"logit_bias: token id 50 is outside the vocabulary \[0, 50\)"):
        SamplingParams(logit_bias={"50": 1.0}).check_vocab(V)
    with pytest.raises(InvalidRequestError, match="stop_token_ids: token id -1"):
        SamplingParams(stop_token_ids=[-1]).check_vocab(V)


def test_tiny_temperature_generates_the_greedy_text(make_llm):
    """End to end through the engine: 1.2e-38 (the smallest accepted) samples exactly the greedy tokens."""
    llm = make_llm()
    greedy = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8), use_tqdm=False)[0]
    tiny = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=FP32_TINY, seed=3),
                        use_tqdm=False)[0]
    assert tiny.token_ids == greedy.token_ids and tiny.finish_reason == greedy.finish_reason


def _reference_probs(row, *, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The definition, in fp64, one row at a time: temperature, min-p, top-k, top-p, renormalized."""
    p = torch.softmax(row.double() / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if min_p:
        keep &= p >= min_p * p.max()
    if top_k:
        keep &= p >= torch.topk(p, top_k).values[-1]
    order = torch.argsort(torch.where(keep, p, 0.0), descending=True)
    kept = torch.where(keep, p, 0.0)[order]
    before = torch.cumsum(kept / kept.sum(), 0) - kept / kept.sum()
    nucleus = torch.zeros_like(keep)
    nucleus[order] = before < top_p
    q = torch.where(keep & nucleus, p, 0.0)
    return q / q.sum()


def test_a_mixed_batch_draws_each_row_from_its_own_filtered_distribution():
    """Rows with different temperature / top-k / top-p / min-p share one batched draw; each row's
    empirical frequencies match its own distribution, and filtered-out tokens are never drawn."""
    row = torch.tensor([2.0, 1.6, 1.2, 0.5, 0.0, -1.0, -3.0, -8.0])
    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.6),
             dict(temperature=1.0, min_p=0.2), dict(temperature=0.9, top_k=5, top_p=0.8)]
    per_kind = 400
    seqs = [_seq(i, **kinds[i % len(kinds)]) for i in range(per_kind * len(kinds))]
    logits = row.expand(len(seqs), -1).contiguous()
    sampler = Sampler(torch.device("cpu"), seed=3)
    counts = torch.zeros(len(kinds), row.numel())
    for _ in range(5):
        for i, tok in enumerate(sampler.sample(logits, seqs)):
            counts[i % len(kinds), tok] += 1
    for j, kw in enumerate(kinds):
        ref = _reference_probs(row, **kw).float()
        freq = counts[j] / counts[j].sum()
        assert bool((freq[ref == 0] == 0).all()), f"{kw}: drew a filtered token: {freq} vs {ref}"
        torch.testing.assert_close(freq, ref, atol=0.035, rtol=0, msg=lambda m: f"{kw}: {m}")


@pytest.mark.parametrize("row, top_k, top_p", [
    ([5.0, 1.0, 1.0, 1.0], 2, 0.5),         # the top token alone reaches top_p: its ties never drawn
    ([2.0, 1.0, 1.0, 1.0, -5.0], 2, 0.95),  # the nucleus needs every token tied with the k-th
    ([1.0, 1.0, 1.0, 1.0, 0.0], 2, 0.4),
])
def test_top_p_also_filters_the_tokens_tied_with_the_kth(row, top_k, top_p):
    """top-k keeps every token tied with the k-th logit (frequent with bf16 logits); top-p then applies
    to all of them. Ties past the k candidates were left out of top-p: drawn where the nucleus had
    no room for them (0.6% of draws on SmolLM2's real logits at top_k=50, top_p=0.5)."""
    row = torch.tensor(row)
    seqs = [_seq(i, temperature=1.0, top_k=top_k, top_p=top_p) for i in range(3000)]
    toks = Sampler(torch.device("cpu"), seed=1).sample(row.expand(len(seqs), -1).contiguous(), seqs)
    freq = torch.bincount(torch.tensor(toks), minlength=row.numel()).float() / len(toks)
    ref = _reference_probs(row, temperature=1.0, top_k=top_k, top_p=top_p).float()
    if (ref > 0).sum() == (row == row[top_k - 1]).sum() + (row > row[top_k - 1]).sum():
        torch.testing.assert_close(freq, ref, atol=0.03, rtol=0)   # every kept token: the reference's own
    else:   # which of equal logits make the nucleus is arbitrary: as many tokens, of the top logits
        assert (freq > 0).sum() <= (ref > 0).sum() and bool((row[freq > 0] >= row[top_k - 1]).all())


def test_seeded_rows_draw_the_same_tokens_whatever_shares_the_batch():
    logits = _logits(rows=4, seed=5)
    alone = Sampler(torch.device("cpu")).sample(logits[2:3], [_seq(7, temperature=1.0, top_p=0.9, seed=42)])
    mixed = Sampler(torch.device("cpu")).sample(
        logits, [_seq(0, temperature=0.5), _seq(1), _seq(7, temperature=1.0, top_p=0.9, seed=42),
                 _seq(3, temperature=2.0, top_k=4, seed=1)])
    assert mixed[2] == alone[0]


@pytest.mark.parametrize("flat_row_too", [False, True])
def test_top_p_on_the_cpu_finds_the_nucleus_among_candidates_or_sorts_everything(monkeypatch, flat_row_too):
    """The CPU's shortcut: the nucleus is looked for among the most likely tokens (16 here) and the
    whole vocabulary is sorted only when a row's nucleus may be wider (a flat row); either way each
    row draws from its own nucleus with the reference frequencies."""
    monkeypatch.setattr(Sampler, "NUCLEUS_CANDIDATES", 16)
    used = []
    real = Sampler._nucleus_candidates

    def spy(self, x, top_p):
        out = real(self, x, top_p)
        used.append(out[0] is not None)
        return out

    monkeypatch.setattr(Sampler, "_nucleus_candidates", spy)
    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(64, generator=g) * 3
    flat = torch.randn(64, generator=g) * 0.05
    rows, kinds = [peaked], [dict(temperature=1.0, top_p=0.7)]
    if flat_row_too:
        rows.append(flat)
        kinds.append(dict(temperature=1.0, top_p=0.9))
    per_kind = 2000
    seqs = [_seq(i, **kinds[i % len(kinds)]) for i in range(per_kind * len(kinds))]
    logits = torch.stack([rows[i % len(kinds)] for i in range(len(seqs))])
    sampler = Sampler(torch.device("cpu"), seed=5)
    counts = torch.zeros(len(kinds), 64)
    for _ in range(5):
        for i, tok in enumerate(sampler.sample(logits, seqs)):
            counts[i % len(kinds), tok] += 1
    assert used == [not flat_row_too] * 5
    for j, kw in enumerate(kinds):
        ref = _reference_probs(rows[j], **kw).float()
        freq = counts[j] / counts[j].sum()
        assert bool((freq[ref == 0] == 0).all())
        torch.testing.assert_close(freq, ref, atol=0.02, rtol=0)
    if flat_row_too:
        assert int((_reference_probs(flat, temperature=1.0, top_p=0.9) > 0).sum()) > 16  # wider than the candidates


def test_rows_drawn_in_parts_give_the_same_tokens(monkeypatch):
    """A batch larger than DRAW_ELEMENTS allows is filtered and drawn a few rows at a time, with the
    same random stream: the same tokens as all at once."""
    logits = _logits(rows=7, seed=9)

    def seqs():  # odd rows seeded, even ones from the sampler's generator
        return [_seq(i, temperature=0.9, top_p=0.8, **({"seed": i} if i % 2 else {})) for i in range(7)]

    whole = Sampler(torch.device("cpu"), seed=4).sample(logits, seqs())
    monkeypatch.setattr(Sampler, "DRAW_ELEMENTS", 2 * V)   # two rows at a time
    parts = Sampler(torch.device("cpu"), seed=4).sample(logits, seqs())
    assert parts == whole
