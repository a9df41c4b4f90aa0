"""Fidelity metrics: token agreement, first divergence, KL from logits."""

from __future__ import annotations

import math

import pytest
import torch

from hisa.eval.fidelity import first_divergence, kl_per_position, mean_kl, token_agreement, top1_agreement


@pytest.mark.parametrize("ref, test, agreement, divergence", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, None),          # identical
    ([1, 2, 3, 4], [1, 2, 9, 4], 0.75, 2),            # one mismatch in the middle
    ([1, 2, 3, 4], [1, 2], 0.5, 2),                   # test stopped early: missing tokens disagree
    ([1, 2], [1, 2, 3, 4], 0.5, 2),                   # test ran long
    ([7, 2, 3], [1, 2, 3], 2 / 3, 0),                 # first token differs
    ([], [], 1.0, None),                              # nothing to compare
    ([], [5], 0.0, 0),
])
def test_token_agreement_and_first_divergence(ref, test, agreement, divergence):
    assert token_agreement(ref, test) == pytest.approx(agreement)
    assert first_divergence(ref, test) == divergence
    assert token_agreement(torch.tensor(ref, dtype=torch.int32), torch.tensor(test)) == pytest.approx(agreement)


def test_token_agreement_rejects_batched_ids():
    with pytest.raises(ValueError, match="1-D"):
        token_agreement(torch.zeros(2, 3), [0, 0, 0])


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(5, 1000) * 10
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert mean_kl(logits.half(), logits.half()) == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_a_hand_computation():
    # 3 positions over a 3-token vocabulary, probabilities given directly (logits = log p).
    p = [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]
    q = [[1 / 3, 1 / 3, 1 / 3], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]
    by_hand = [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)]
    ref = torch.tensor(p).log() + 3.0          # a shift per row must not matter
    test = torch.tensor(q).log() - 1.5
    assert kl_per_position(ref, test).tolist() == pytest.approx(by_hand, abs=1e-6)
    assert mean_kl(ref, test) == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    assert by_hand[0] == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert mean_kl(ref, test) > 0 and mean_kl(test, ref) != pytest.approx(mean_kl(ref, test))   # not symmetric


def test_kl_is_stable_for_large_logits_and_masked_tokens():
    ref = torch.tensor([[1000.0, 0.0, float("-inf")]])
    test = torch.tensor([[999.0, 1.0, 5.0]])
    kl = mean_kl(ref, test)
    assert math.isfinite(kl) and kl >= 0
    assert mean_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float("-inf")]])) == math.inf


def test_kl_checks_shapes_and_flattens_leading_dims():
    with pytest.raises(ValueError, match="same"):
        mean_kl(torch.zeros(2, 5), torch.zeros(2, 6))
    x, y = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert mean_kl(x, y) == pytest.approx(mean_kl(x.reshape(6, 7), y.reshape(6, 7)))


def test_top1_agreement():
    ref = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0]])
    assert top1_agreement(ref, ref * 2) == 1.0
    assert top1_agreement(ref, -ref) == 0.0
