"""Evaluation metrics as pure functions over plain Python values.

    task        metrics                                        computed from
    seq-cls     accuracy, macro_f1                             one label per example
    token-cls   entity precision / recall / f1 (seqeval)       one IOB2 tag list per sentence
    mlm / clm   perplexity = exp(mean token loss)              the token-weighted mean loss

Classification metrics are written here (a few lines, no scikit-learn); entity-level scores come
from `seqeval` in its default (conlleval-compatible) mode, where an entity is a maximal B-X I-X ...
chunk and an I-X without a B-X starts one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence

__all__ = ["accuracy", "entity_scores", "macro_f1", "perplexity"]


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference.

    Args:
        predictions, references: one label (name or id) per example, same length.

    Returns:
        correct / total, in [0, 1].

    Raises:
        ValueError: different lengths, or no examples.
    """
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Unweighted mean of the per-class F1 over every class seen in predictions or references.

    F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c) (0 when the class is never right), so a class that is
    only ever predicted, never true, counts with F1 0. Classes absent from both lists do not count
    (as scikit-learn's `f1_score(average="macro")` without `labels=`).

    Args:
        predictions, references: one label (name or id) per example, same length.

    Returns:
        The macro-averaged F1, in [0, 1].

    Raises:
        ValueError: different lengths, or no examples.
    """
    _check_lengths(predictions, references)
    classes = set(predictions) | set(references)
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references, strict=True))
        fp = sum(p == c and r != c for p, r in zip(predictions, references, strict=True))
        fn = sum(p != c and r == c for p, r in zip(predictions, references, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of IOB2 tag sequences, with seqeval.

    An entity counts as found only when its type and both boundaries match. With no entity in
    either list a score is 0 (not a warning).

    Args:
        predictions, references: one tag list per sentence ("B-PER", "I-PER", "O", ...); each
            prediction as long as its reference.

    Returns:
        {"precision", "recall", "f1"}, each in [0, 1].

    Raises:
        ValueError: different numbers of sentences, a sentence of different lengths, or none.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    _check_lengths(predictions, references)
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if len(p) != len(r):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(r)} reference tags")
    y_true = [list(r) for r in references]
    y_pred = [list(p) for p in predictions]
    with warnings.catch_warnings():
        # seqeval warns about tags outside IOB2 (e.g. "O" only); the scores are still defined.
        warnings.simplefilter("ignore")
        return {
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        }


def perplexity(mean_loss: float) -> float:
    """exp(mean per-token cross-entropy in nats); inf when that overflows.

    Args:
        mean_loss: the loss averaged over every predicted token (not over batches).

    Returns:
        The perplexity, >= 1 for a non-negative loss.
    """
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
