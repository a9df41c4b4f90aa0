"""Offline, seeded RULER-style long-context tasks, their scoring, and fidelity metrics.

- :mod:`hisa.eval.tasks`: generators (niah_*, vt, cwe, fwe, passkey), ``TASKS``, ``generate_suite``.
- :mod:`hisa.eval.haystack`: filler text, needle material and fitting a prompt to a token budget.
- :mod:`hisa.eval.scoring`: RULER's string-match metrics, per-sample scores, aggregation.
- :mod:`hisa.eval.fidelity`: token agreement and KL between a reference and a test run (torch).
- :mod:`hisa.eval.runner`: the accuracy grid (algorithms × budgets × lengths × tasks × samples) on one model.
- :mod:`hisa.eval.report`: its aggregates, markdown table, plot and JSON.
- :mod:`hisa.eval.cli`: ``hisa eval`` (docs/eval.md). These three load on use, not on ``import hisa.eval``.

Example::

    >>> from hisa.eval import TASKS, score_sample
    >>> class Words:
    ...     def encode(self, text): return text.split()
    >>> s = TASKS["passkey"](Words(), target_tokens=1000, depth=0.5, seed=0)
    >>> score_sample(s, f"{s.answer_prefix} {s.expected[0]}.")
    1.0
"""

from hisa.eval.fidelity import first_divergence, kl_per_position, mean_kl, top1_agreement, token_agreement
from hisa.eval.scoring import (METRICS, aggregate, postprocess_prediction, score_sample, string_match_all,
                               string_match_part)
from hisa.eval.tasks import DEPTHLESS_TASKS, TASKS, NiahSpec, TaskSample, derive_seed, generate_suite

__all__ = [
    "TaskSample", "NiahSpec", "TASKS", "DEPTHLESS_TASKS", "generate_suite", "derive_seed",
    "string_match_all", "string_match_part", "score_sample", "aggregate", "postprocess_prediction", "METRICS",
    "token_agreement", "first_divergence", "mean_kl", "kl_per_position", "top1_agreement",
]
