"""Scoring of model replies to the synthetic tasks, as RULER scores them.

A reply scores the fraction of expected strings it contains, case-insensitively
(:func:`string_match_all`, RULER's metric for every niah, vt, cwe and fwe task);
:func:`string_match_part` (1 if any is present) is RULER's metric for its QA tasks. Per-sample
scores are in [0, 1]; tables multiply by 100.

Example::

    >>> string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "9999999"])
    0.5
    >>> string_match_part("The numbers are 1234567 and 7654321.", ["1234567", "9999999"])
    1.0
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hisa.eval.tasks import TaskSample

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """Strip the reply and turn control characters into newlines (RULER's ``postprocess_pred``)."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _check(expected: Sequence[str]) -> None:
    if isinstance(expected, str) or not expected:
        raise ValueError(f"expected must be a non-empty list of strings, got {expected!r}")


def string_match_all(prediction: str, expected: Sequence[str]) -> float:
    """Fraction of ``expected`` strings that occur in ``prediction`` (case-insensitive), in [0, 1].

    Example::

        >>> string_match_all("VAR ABCDE and var fghij", ["ABCDE", "FGHIJ", "KLMNO"])
        0.6666666666666666
    """
    _check(expected)
    text = prediction.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def string_match_part(prediction: str, expected: Sequence[str]) -> float:
    """1.0 if any of ``expected`` occurs in ``prediction`` (case-insensitive), else 0.0.

    Example::

        >>> string_match_part("it is paris", ["Paris", "France"])
        1.0
    """
    _check(expected)
    text = prediction.lower()
    return float(any(e.lower() in text for e in expected))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"all": string_match_all, "part": string_match_part}
"""Metric name -> function."""

TASK_METRICS: dict[str, str] = {"qa_1": "part", "qa_2": "part"}
"""Tasks scored with a metric other than "all" (RULER uses "part" for its QA tasks only)."""


def score_sample(sample: TaskSample, prediction: str) -> float:
    """Score one reply in [0, 1] with the task's metric, after RULER's post-processing.

    ``prediction`` is the generated text; the answer prefix may or may not be included (it holds
    none of the expected strings, except passkey's "The pass key is", which holds no digits).

    Example::

        >>> s = TaskSample(task="passkey", prompt="...", answer_prefix="The pass key is", expected=["71432"],
        ...                num_tokens=3, seed=0, depth=0.5)
        >>> score_sample(s, " 71432.")
        1.0
    """
    metric = METRICS[TASK_METRICS.get(sample.task, "all")]
    return metric(postprocess_prediction(prediction), sample.expected)


def aggregate(results: Iterable[tuple[TaskSample, float]]) -> dict[str, Any]:
    """Mean score per task, per (task, target length) and overall, with sample counts.

    ``results`` holds ``(sample, score)`` pairs with scores in [0, 1]. ``overall.score`` is the
    mean of the task means (every task weighs the same, as RULER averages); ``overall.micro`` is the
    mean over samples.

    Example::

        >>> a = TaskSample("vt", "", "", ["X"], 1, 0, None, {"target_tokens": 4096})
        >>> b = TaskSample("cwe", "", "", ["Y"], 1, 0, None, {"target_tokens": 4096})
        >>> out = aggregate([(a, 1.0), (a, 0.0), (b, 1.0)])
        >>> out["tasks"]["vt"], out["overall"]
        ({'score': 0.5, 'n': 2}, {'score': 0.75, 'micro': 0.6666666666666666, 'n': 3})
    """
    by_task: dict[str, list[float]] = defaultdict(list)
    by_length: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for sample, score in results:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"scores must be in [0, 1], got {score} for a {sample.task} sample")
        by_task[sample.task].append(score)
        by_length[(sample.task, sample.metadata.get("target_tokens"))].append(score)
    if not by_task:
        raise ValueError("aggregate needs at least one (sample, score) pair")

    def summary(scores: list[float]) -> dict[str, Any]:
        return {"score": sum(scores) / len(scores), "n": len(scores)}

    tasks = {task: summary(scores) for task, scores in by_task.items()}
    every = [s for scores in by_task.values() for s in scores]
    lengths: dict[str, dict[Any, dict[str, Any]]] = defaultdict(dict)
    for (task, length), scores in by_length.items():
        lengths[task][length] = summary(scores)
    return {
        "tasks": tasks,
        "lengths": dict(lengths),
        "overall": {"score": sum(t["score"] for t in tasks.values()) / len(tasks),
                    "micro": sum(every) / len(every), "n": len(every)},
    }
