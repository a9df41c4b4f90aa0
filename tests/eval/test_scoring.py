"""RULER's string-match scoring and its aggregation."""

from __future__ import annotations

import pytest

from hisa.eval.scoring import (aggregate, postprocess_prediction, score_sample, string_match_all,
                               string_match_part)
from hisa.eval.tasks import TASKS, DEPTHLESS_TASKS, TaskSample

EXPECTED = ["1234567", "ABCDE", "sleepy-lantern"]


def sample(task="vt", expected=("X",), target_tokens=1000) -> TaskSample:
    return TaskSample(task=task, prompt="", answer_prefix="", expected=list(expected), num_tokens=0, seed=0,
                      depth=None, metadata={"target_tokens": target_tokens})


@pytest.mark.parametrize("prediction, all_score, part_score", [
    ("1234567, ABCDE and sleepy-lantern.", 1.0, 1.0),                    # all present
    ("only 1234567 here", 1 / 3, 1.0),                                     # partial
    ("1234567 abcde", 2 / 3, 1.0),                                        # case-insensitive
    ("SLEEPY-LANTERN", 1 / 3, 1.0),
    ("nothing relevant", 0.0, 0.0),                                       # none
    ("", 0.0, 0.0),
])
def test_string_match_all_and_part(prediction, all_score, part_score):
    assert string_match_all(prediction, EXPECTED) == pytest.approx(all_score)
    assert string_match_part(prediction, EXPECTED) == part_score


def test_string_match_rejects_empty_or_bare_string_expected():
    with pytest.raises(ValueError):
        string_match_all("x", [])
    with pytest.raises(ValueError):
        string_match_part("x", "1234567")      # a bare string would match character by character


def test_postprocess_turns_control_characters_into_newlines():
    assert postprocess_prediction("  71432\x00\tnext \n") == "71432\n\nnext"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_score_sample_on_generated_tasks(task):
    class Words:
        def encode(self, text):
            return text.split()

    s = TASKS[task](Words(), target_tokens=800, depth=None if task in DEPTHLESS_TASKS else 0.5, seed=2)
    perfect = f"{s.answer_prefix} {', '.join(s.expected)}."
    assert score_sample(s, perfect) == 1.0
    assert score_sample(s, s.answer_prefix) == 0.0             # the prefix gives nothing away
    assert score_sample(s, " ".join(s.expected[:1]).upper()) == pytest.approx(1 / len(s.expected))


def test_aggregate_means_per_task_length_and_overall():
    results = [(sample("vt"), 1.0), (sample("vt"), 0.0), (sample("vt", target_tokens=2000), 1.0),
               (sample("cwe"), 0.25)]
    out = aggregate(results)
    assert out["tasks"]["vt"] == {"score": pytest.approx(2 / 3), "n": 3}
    assert out["tasks"]["cwe"] == {"score": 0.25, "n": 1}
    assert out["lengths"]["vt"] == {1000: {"score": 0.5, "n": 2}, 2000: {"score": 1.0, "n": 1}}
    assert out["overall"]["score"] == pytest.approx((2 / 3 + 0.25) / 2)     # tasks weigh the same
    assert out["overall"]["micro"] == pytest.approx(2.25 / 4)
    assert out["overall"]["n"] == 4


def test_aggregate_rejects_out_of_range_scores_and_empty_input():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        aggregate([(sample(), 100.0)])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_seed_gives_the_answer_away_in_the_question(task):
    """Over many seeds (not one): a reply that only repeats the question and the answer prefix scores 0.
    (cwe's common words were drawn from a pool holding "often", a word of its own question.)"""
    class Words:
        def encode(self, text):
            return text.split()

    for seed in range(60):
        s = TASKS[task](Words(), target_tokens=400, depth=None if task in DEPTHLESS_TASKS else 0.5, seed=seed)
        question = s.prompt.rsplit("\n", 1)[-1]   # the question is the prompt's last line
        assert score_sample(s, f"{question} {s.answer_prefix}") == 0.0, (task, seed, s.expected)
