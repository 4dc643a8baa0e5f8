"""Metrics against values computed by hand (and against scikit-learn where it is installed)."""

from __future__ import annotations

import math
import random

import pytest

from modfit.metrics import accuracy, entity_scores, macro_f1, perplexity


def test_accuracy() -> None:
    assert accuracy(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == 0.75
    assert accuracy([1], [1]) == 1.0


def test_macro_f1_by_hand() -> None:
    # a: TP 1, FP 1, FN 0 -> 2/3; b: TP 1, FP 0, FN 2 -> 1/2; c: never right -> 0.
    assert macro_f1(["a", "a", "b", "c"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0


def test_macro_f1_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        refs = [rng.choice("abcd") for _ in range(30)]
        preds = [rng.choice("abce") for _ in range(30)]
        assert macro_f1(preds, refs) == pytest.approx(metrics.f1_score(refs, preds, average="macro"))


@pytest.mark.parametrize("fn", [accuracy, macro_f1])
def test_classification_errors(fn: object) -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        fn(["a", "b"], ["a"])  # type: ignore[operator]
    with pytest.raises(ValueError, match="no examples"):
        fn([], [])  # type: ignore[operator]


def test_entity_scores_seqeval_readme_example() -> None:
    refs = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    preds = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    # true: MISC[3..5], PER[0..1]; predicted: MISC[2..5] (wrong start), PER[0..1] -> 1 of 2 each way
    assert entity_scores(preds, refs) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_entity_scores_default_mode_starts_entities_at_i_tags() -> None:
    refs = [["B-PER", "I-PER", "O", "B-LOC"]]
    preds = [["I-PER", "I-PER", "O", "O"]]
    # conlleval (seqeval's default mode): a leading I-PER starts an entity, so PER[0..1] is found;
    # 1 predicted entity, 1 correct, 2 true -> P 1, R 1/2, F1 2/3.
    assert entity_scores(preds, refs) == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})


def test_entity_scores_without_entities_is_zero() -> None:
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_scores_errors() -> None:
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2 reference tags"):
        entity_scores([["O"]], [["O", "B-PER"]])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        entity_scores([["O"]], [["O"], ["O"]])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.e**2)
    assert perplexity(1e6) == math.inf
