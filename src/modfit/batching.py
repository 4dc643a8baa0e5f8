"""Examples to model inputs: tokenisation per task, padding collators, BERT-style masking.

`encode` turns examples into unpadded features (dicts of int lists), one per example::

    seq-cls    input_ids, attention_mask[, token_type_ids], labels: int         (label id)
    token-cls  input_ids, attention_mask[, token_type_ids], labels: list[int],  (tag id on a word's
               word_ids: list[int]                                               first piece, else -100)
    mlm        input_ids, attention_mask                                        (masked by MlmCollator)
    causal-lm  input_ids, attention_mask, labels = input_ids                    (the model shifts them)

Multi-task data (`encode(..., tasks=[...])`) adds ``task_ids: int`` (the example's task's index in
`tasks`), which a collator turns into a (B,) tensor and `ModularModel.forward(task_ids=...)` routes.

A collator pads a list of features on the right into (B, L) tensors: input_ids with the pad id,
attention_mask with 0, labels with -100 (ignored by the loss). `word_ids` stay on the features
(for `decode_token_predictions`) and never reach the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from modfit.data import TASKS, DataError, TextExample, TokenExample

IGNORE_INDEX = -100  # label value that cross-entropy skips (nn.CrossEntropyLoss default ignore_index)
_NO_WORD = -1  # word_ids entry of special tokens (the tokenizer's None), so features stay int lists

# Value used to pad each feature key (input_ids: the pad id); keys not listed pad with 0.
_PAD_VALUES = {"labels": IGNORE_INDEX, "special_tokens_mask": 1}
# Feature keys that describe the batch but are not model inputs.
_NOT_MODEL_INPUTS = ("word_ids",)
# Tokenizer outputs kept as model inputs for the classification tasks; the LM tasks keep the first two.
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")

# One encoded example: token-level keys hold list[int]; a seq-cls "labels" holds one int.
Feature = dict[str, Any]
_E = TypeVar("_E", TextExample, TokenExample)


def _only(examples: Sequence[object], kind: type[_E], task: str) -> list[_E]:
    """`examples` as a list of `kind`, or a ValueError naming the first that is not one."""
    typed = [ex for ex in examples if isinstance(ex, kind)]
    if len(typed) != len(examples):
        wrong = next(ex for ex in examples if not isinstance(ex, kind))
        raise ValueError(f"task {task!r} needs {kind.__name__}s, got a {type(wrong).__name__}")
    return typed


def _label_ids(labels: Sequence[str] | None) -> dict[str, int]:
    if labels is None:
        return {}
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels has duplicates: {list(labels)}")
    return {label: i for i, label in enumerate(labels)}


def _label_id(label: str, label2id: dict[str, int], index: int, what: str) -> int:
    """The id of `label`, or a DataError naming it, the example and the known labels."""
    if not label2id:
        raise ValueError(
            f"example {index + 1} has {what} {label!r} but labels=None; pass labels=label_list(...)"
        )
    if label not in label2id:
        known = list(label2id)
        shown = ", ".join(map(repr, known[:30])) + (f", ... ({len(known)} in all)" if len(known) > 30 else "")
        raise DataError(None, None, f"example {index + 1}: {what} {label!r} is not a known label ({shown})")
    return label2id[label]


def _word_ids(enc: Any, i: int) -> list[int]:
    """Word index of each token of sequence `i` (-1 for special tokens); needs a fast tokenizer."""
    if not getattr(enc, "is_fast", False):
        raise ValueError("word alignment needs a fast (Rust `tokenizers`) tokenizer with word_ids()")
    return [_NO_WORD if w is None else w for w in enc.word_ids(i)]


def _encode_tokens(
    examples: Sequence[TokenExample],
    tokenizer: PreTrainedTokenizerBase,
    label2id: dict[str, int],
    max_length: int,
) -> list[Feature]:
    """token-cls: tokenize pre-split words and put each word's tag id on its first word piece."""
    words = [list(ex.tokens) for ex in examples]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    features = []
    for i, ex in enumerate(examples):
        feature: Feature = {key: enc[key][i] for key in _MODEL_KEYS if key in enc}
        word_ids = _word_ids(enc, i)
        feature["word_ids"] = word_ids
        if ex.tags is not None:
            tag_ids = [_label_id(tag, label2id, i, "tag") for tag in ex.tags]
            # e.g. words [Jo, unaffable] -> [CLS] jo una ##ffa ##ble [SEP] -> [-100, t0, t1, -100, -100, -100]
            labels, previous = [], _NO_WORD
            for w in word_ids:
                labels.append(IGNORE_INDEX if w in (_NO_WORD, previous) else tag_ids[w])
                previous = w
            feature["labels"] = labels
        features.append(feature)
    return features


def encode(
    examples: Sequence[TextExample] | Sequence[TokenExample],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    *,
    labels: Sequence[str] | None,
    max_length: int,
    keep_word_ids: bool = False,
    tasks: Sequence[str] | None = None,
) -> list[Feature]:
    """Tokenize examples for `task` into unpadded features, truncated to `max_length` tokens.

    Args:
        examples: `TokenExample`s for token-cls, `TextExample`s otherwise. Text pairs are encoded
            as pairs (all examples or none must have one).
        tokenizer: a HuggingFace tokenizer (token-cls needs a fast one, for word alignment).
        task: ``seq-cls``, ``token-cls``, ``mlm`` or ``causal-lm``.
        labels: the label (tag) list; a label's id is its index. Needed when examples are labeled
            for seq-cls / token-cls; ignored by the LM tasks.
        max_length: the most tokens per feature, special tokens included.
        keep_word_ids: also store ``word_ids`` for seq-cls / mlm / causal-lm (token-cls always
            does); `MlmCollator` uses them for whole-word masking with any fast tokenizer.
        tasks: task names in id order: each example's `task` becomes ``task_ids`` (its index).
            None: examples' tasks are not encoded.

    Returns:
        One feature dict per example (see the module docstring); unlabeled examples get no
        ``labels`` key.

    Raises:
        ValueError: unknown task, max_length < 1, wrong example type, duplicate labels, labeled
            examples with ``labels=None``, or a slow tokenizer where word ids are needed.
        DataError: a label or tag not in `labels`; some examples with a text pair and some without;
            with `tasks`, an example without a task or with a task not in `tasks`.
    """
    features = _encode(
        examples, tokenizer, task, labels=labels, max_length=max_length, keep_word_ids=keep_word_ids
    )
    if tasks is not None:
        task_ids = _task_ids(examples, tasks)
        for feature, task_id in zip(features, task_ids, strict=True):
            feature["task_ids"] = task_id
    return features


def _task_ids(examples: Sequence[TextExample] | Sequence[TokenExample], tasks: Sequence[str]) -> list[int]:
    """Each example's task id (its index in `tasks`), or a DataError naming the example."""
    index = {name: i for i, name in enumerate(tasks)}
    items: Sequence[TextExample | TokenExample] = examples
    ids = []
    for i, ex in enumerate(items):
        if ex.task is None:
            raise DataError(None, None, f"example {i + 1} names no task (the tasks are {', '.join(tasks)})")
        if ex.task not in index:
            raise DataError(
                None, None, f"example {i + 1}: task {ex.task!r} is not one of the tasks {', '.join(tasks)}"
            )
        ids.append(index[ex.task])
    return ids


def _encode(
    examples: Sequence[TextExample] | Sequence[TokenExample],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    *,
    labels: Sequence[str] | None,
    max_length: int,
    keep_word_ids: bool,
) -> list[Feature]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    label2id = _label_ids(labels) if task in ("seq-cls", "token-cls") else {}
    if task == "token-cls":
        token_examples = _only(examples, TokenExample, task)
        return _encode_tokens(token_examples, tokenizer, label2id, max_length) if token_examples else []

    text_examples = _only(examples, TextExample, task)
    if not text_examples:
        return []
    texts = [ex.text for ex in text_examples]
    pairs = [ex.text_pair for ex in text_examples]
    with_pair = sum(p is not None for p in pairs)
    if 0 < with_pair < len(pairs):
        raise DataError(
            None, None, f"{with_pair} of {len(pairs)} examples have a text_pair: all or none must"
        )
    enc = tokenizer(texts, pairs if with_pair else None, truncation=True, max_length=max_length)
    keys = _MODEL_KEYS if task == "seq-cls" else _MODEL_KEYS[:2]
    features = []
    for i, ex in enumerate(text_examples):
        feature: Feature = {key: enc[key][i] for key in keys if key in enc}
        if keep_word_ids:
            feature["word_ids"] = _word_ids(enc, i)
        if task == "seq-cls" and ex.label is not None:
            feature["labels"] = _label_id(ex.label, label2id, i, "label")
        elif task == "causal-lm":
            feature["labels"] = list(feature["input_ids"])  # next-token targets; the model shifts them
        features.append(feature)
    return features


def _pad(rows: Sequence[Sequence[int] | torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad int sequences into a (B, L) long tensor, L the longest row."""
    length = max(len(row) for row in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Pad encoded features into a batch of tensors.

    Args:
        features: dicts from `encode`; all must have the same keys.
        pad_token_id: the tokenizer's pad id, used for ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask`` (0 on padding), optional ``token_type_ids`` (B, L) and
        ``labels``: (B,) for seq-cls, else (B, L) with -100 on padding. ``word_ids`` are dropped.

    Raises:
        ValueError: no features, features with different keys, or no pad id.
    """
    if not features:
        raise ValueError("cannot collate an empty list of features")
    if pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    keys = [key for key in features[0] if key not in _NOT_MODEL_INPUTS]
    for i, feature in enumerate(features):
        if set(feature) - set(_NOT_MODEL_INPUTS) != set(keys):
            raise ValueError(f"feature {i} has keys {sorted(feature)}, feature 0 has {sorted(features[0])}")
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [feature[key] for feature in features]
        if all(isinstance(v, int) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)  # (B,) one label per sequence
        else:
            batch[key] = _pad(values, pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0))
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    if labels is not None and mask is not None and labels.shape == mask.shape:
        # Never train on padding, however the features were padded before they got here.
        batch["labels"] = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return batch


class MlmCollator:
    """Pad features and apply BERT masking for masked-LM training (Devlin et al. 2019, §3.1).

    Each maskable token (not special, not padding) is selected with probability
    `mlm_probability`; of the selected, 80% become [MASK], 10% a random non-special token and 10%
    stay unchanged. ``labels`` hold the original id at selected positions and -100 elsewhere.
    With `whole_word_masking`, the choice is made per word and applies to all its pieces: words
    come from the features' ``word_ids`` when present (``encode(..., keep_word_ids=True)``), else
    from WordPiece's ``##`` continuation prefix.

    Randomness comes from an own `torch.Generator`, so a `seed` makes the masking sequence
    reproducible and independent of the global RNG.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
        seed: int | None = None,
    ) -> None:
        """Set up masking for `tokenizer`.

        Args:
            tokenizer: supplies the pad, mask and special token ids and the vocabulary.
            mlm_probability: chance that a token (or a whole word) is selected for prediction.
            whole_word_masking: select whole words rather than single word pieces.
            seed: seed of the collator's generator; None seeds it from fresh entropy.

        Raises:
            ValueError: probability outside [0, 1], or a tokenizer without mask or pad token.
        """
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("masked-LM training needs a tokenizer with a mask token and a pad token")
        self.tokenizer = tokenizer
        self.mlm_probability = mlm_probability
        self.whole_word_masking = whole_word_masking
        self.mask_token_id: int = tokenizer.mask_token_id
        self.pad_token_id: int = tokenizer.pad_token_id
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        ordinary = torch.ones(len(tokenizer), dtype=torch.bool)
        ordinary[self._special_ids] = False
        self._random_ids = ordinary.nonzero().squeeze(1)  # ids a "random token" replacement may take
        self._continuation: torch.Tensor | None = None  # (V,) True for "##" pieces; built on first use

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate `features` and mask them.

        Args:
            features: dicts with ``input_ids`` (and ``attention_mask``, optionally ``word_ids``).

        Returns:
            ``input_ids`` (masked), ``attention_mask`` and ``labels``, each (B, L).
        """
        batch = collate(features, self.pad_token_id)
        input_ids = batch["input_ids"]  # (B, L)
        attention = batch.get("attention_mask", (input_ids != self.pad_token_id).long())
        maskable = attention.bool() & ~torch.isin(input_ids, self._special_ids)  # (B, L)
        if self.whole_word_masking:
            selected = self._select_words(features, input_ids, maskable)
        else:
            selected = self._draw(input_ids.shape) & maskable

        roll = torch.rand(input_ids.shape, generator=self.generator)  # (B, L) in [0, 1)
        to_mask = selected & (roll < 0.8)
        to_random = selected & (roll >= 0.8) & (roll < 0.9)  # the remaining 10% stay unchanged
        picks = torch.randint(len(self._random_ids), input_ids.shape, generator=self.generator)
        masked = input_ids.masked_fill(to_mask, self.mask_token_id)
        batch["input_ids"] = torch.where(to_random, self._random_ids[picks], masked)
        batch["labels"] = input_ids.masked_fill(~selected, IGNORE_INDEX)
        return batch

    def _draw(self, shape: torch.Size) -> torch.Tensor:
        """(B, L) bools, each True with probability `mlm_probability`."""
        return torch.bernoulli(torch.full(shape, self.mlm_probability), generator=self.generator).bool()

    def _select_words(
        self, features: Sequence[Mapping[str, Any]], input_ids: torch.Tensor, maskable: torch.Tensor
    ) -> torch.Tensor:
        """Select whole words: draw once per word (at its first piece) and spread to its pieces."""
        after_maskable = F.pad(maskable[:, :-1], (1, 0), value=False)  # (B, L): previous token maskable
        if all("word_ids" in feature for feature in features):
            word_ids = _pad([feature["word_ids"] for feature in features], _NO_WORD)  # (B, L)
            same_word = word_ids == F.pad(word_ids[:, :-1], (1, 0), value=_NO_WORD)
        else:
            same_word = self._continuation_pieces()[input_ids]  # "##ffa" continues the previous word
        starts = maskable & ~(same_word & after_maskable)  # (B, L) first piece of each word

        # word[b, t]: index of the word that position t belongs to, counting words in row b
        word = starts.long().cumsum(dim=1) - 1
        chosen = self._draw(input_ids.shape) & starts
        chosen_by_word = torch.zeros_like(maskable)  # (B, W<=L): is word w of row b chosen
        rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(word)
        chosen_by_word[rows[starts], word[starts]] = chosen[starts]
        return chosen_by_word.gather(1, word.clamp(min=0)) & maskable

    def _continuation_pieces(self) -> torch.Tensor:
        """(V,) True for WordPiece continuation pieces ("##..."), for word grouping without word_ids."""
        if self._continuation is None:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._continuation = torch.tensor([str(t).startswith("##") for t in tokens], dtype=torch.bool)
            if not self._continuation.any():
                raise ValueError(
                    "whole-word masking needs word boundaries: this tokenizer has no '##' pieces, so "
                    "encode with keep_word_ids=True to give the features word_ids"
                )
        return self._continuation


def decode_token_predictions(
    pred_ids: Sequence[int] | torch.Tensor,
    word_ids: Sequence[int | None],
    id2label: Mapping[int, str] | Sequence[str],
    *,
    num_words: int | None = None,
    fill: str = "O",
) -> list[str]:
    """Map one sequence's sub-token predictions back to one tag per word.

    A word's tag is the prediction at its first sub-token, the position that carried its label
    in training.

    Args:
        pred_ids: (L,) predicted label id per token (argmax of the logits); may be longer than
            `word_ids` (batch padding).
        word_ids: word index per token, None or -1 for special tokens (the feature's ``word_ids``).
        id2label: label name per id.
        num_words: the sentence length in words; words cut off by truncation get `fill`.
            Default: up to the last word seen in `word_ids`.
        fill: tag for words without a prediction.

    Returns:
        One tag per word, in word order.

    Raises:
        ValueError: fewer predictions than tokens.
    """
    preds = pred_ids.tolist() if isinstance(pred_ids, torch.Tensor) else list(pred_ids)
    if len(preds) < len(word_ids):
        raise ValueError(f"{len(preds)} predictions for {len(word_ids)} tokens")
    tags: dict[int, str] = {}
    for position, w in enumerate(word_ids):
        if w is not None and w >= 0 and w not in tags:
            tags[w] = id2label[preds[position]]
    n = num_words if num_words is not None else max(tags, default=-1) + 1
    return [tags.get(w, fill) for w in range(n)]
