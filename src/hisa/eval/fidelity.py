"""Fidelity of a sparse (or otherwise approximate) run against a dense reference run.

Pure functions over token ids and logits: how many generated tokens agree, where they first
diverge, and the KL divergence of the next-token distributions.

Example::

    >>> token_agreement([1, 2, 3, 4], [1, 2, 9, 4])
    0.75
    >>> first_divergence([1, 2, 3, 4], [1, 2, 9, 4])
    2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _ids(ids: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dim() > 1:
        raise ValueError(f"{name} must be 1-D token ids, got shape {tuple(t.shape)}")
    return t.reshape(-1).to(torch.int64).cpu()


def token_agreement(ref_ids: Sequence[int] | torch.Tensor, test_ids: Sequence[int] | torch.Tensor) -> float:
    """Fraction of positions where the two id sequences agree, over the longer length (positions
    past the shorter sequence count as disagreement). Two empty sequences agree fully (1.0).

    ref_ids, test_ids: 1-D int sequences or tensors ``[T_ref]``, ``[T_test]``.

    Example::

        >>> token_agreement([5, 6, 7], [5, 6])
        0.6666666666666666
    """
    ref, test = _ids(ref_ids, "ref_ids"), _ids(test_ids, "test_ids")
    longest = max(len(ref), len(test))
    if longest == 0:
        return 1.0
    n = min(len(ref), len(test))
    return int((ref[:n] == test[:n]).sum()) / longest


def first_divergence(ref_ids: Sequence[int] | torch.Tensor, test_ids: Sequence[int] | torch.Tensor) -> int | None:
    """Index of the first position where the sequences differ (the shorter length when one is a
    strict prefix of the other), or None when they are identical.

    Example::

        >>> first_divergence([5, 6, 7], [5, 6]), first_divergence([5, 6], [5, 6])
        (2, None)
    """
    ref, test = _ids(ref_ids, "ref_ids"), _ids(test_ids, "test_ids")
    n = min(len(ref), len(test))
    diff = torch.nonzero(ref[:n] != test[:n])
    if len(diff):
        return int(diff[0, 0])
    return None if len(ref) == len(test) else n


def _logits_pair(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref_logits.shape != test_logits.shape or ref_logits.dim() < 1:
        raise ValueError(f"ref_logits and test_logits must have the same [T, V] shape, got "
                         f"{tuple(ref_logits.shape)} and {tuple(test_logits.shape)}")
    vocab = ref_logits.shape[-1]
    return (ref_logits.reshape(-1, vocab).float(),
            test_logits.to(ref_logits.device).reshape(-1, vocab).float())


def kl_per_position(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_test) at each position, in nats, computed in fp32 with log_softmax.

    ref_logits, test_logits: ``[T, V]`` (any float dtype; leading dims are flattened).
    Returns ``[T]`` fp32. Tokens with zero reference probability (``-inf`` logits) contribute 0;
    a token the reference allows but the test forbids gives ``inf``.

    Example::

        >>> x = torch.randn(4, 10)
        >>> kl_per_position(x, x).abs().max().item() < 1e-6
        True
    """
    ref, test = _logits_pair(ref_logits, test_logits)
    log_p = torch.log_softmax(ref, dim=-1)        # [T, V]
    log_q = torch.log_softmax(test, dim=-1)       # [T, V]
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)       # rounding can dip a hair below 0


def mean_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """KL(P_ref || P_test) averaged over positions, in nats (see :func:`kl_per_position`).

    Example::

        >>> ref = torch.tensor([[0.0, 0.0]])
        >>> round(mean_kl(ref, torch.tensor([[0.0, 1.0]])), 4)
        0.1201
    """
    return float(kl_per_position(ref_logits, test_logits).mean())


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax token is the same under both logits.

    Example::

        >>> top1_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
        0.5
    """
    ref, test = _logits_pair(ref_logits, test_logits)
    return float((ref.argmax(-1) == test.argmax(-1)).float().mean())
