"""Tiny models and data sets for the training tests (imported by tests and by ddp_worker.py).

Everything is built in code, with dropout 0, so runs are deterministic and fast on a CPU:

- a 2-layer BERT (hidden 32) with random weights from a fixed seed;
- a separable seq-cls task: class "a" sentences use tokens 4..11, class "b" tokens 12..19;
- a token-cls task whose tag follows the token id (entity words B-/I-LOC or B-/I-PER);
- features as `batching.encode` makes them: input_ids, attention_mask, labels (+ word_ids).
"""

from __future__ import annotations

import functools
import random
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

import modfit
from modfit.batching import collate

VOCAB = 24
PAD, CLS, SEP = 0, 1, 2
SEQ_LABELS = ("a", "b")
TAGS = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")

collate_fn = functools.partial(collate, pad_token_id=PAD)


def bert_config(**overrides: Any) -> BertConfig:
    values: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config()).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels=2, classifier_dropout=0.0)).eval()


def seq_cls_model(seed: int = 0, r: int = 4) -> modfit.ModularModel:
    """A tiny BERT with LoRA module "task" and a 2-label seq-cls head (dropout 0)."""
    mm = modfit.wrap(tiny_bert(seed))
    torch.manual_seed(seed + 1)
    mm.add(
        "task", modfit.config("lora", r=r, alpha=8.0), head=modfit.head("seq-cls", SEQ_LABELS, dropout=0.0)
    )
    return mm


def dropout_model(seed: int = 0) -> modfit.ModularModel:
    """Like `seq_cls_model`, with dropout 0.2 in LoRA and head, so training draws random numbers."""
    mm = modfit.wrap(tiny_bert(seed))
    torch.manual_seed(seed + 1)
    head = modfit.head("seq-cls", SEQ_LABELS, dropout=0.2)
    mm.add("task", modfit.config("lora", r=4, alpha=8.0, dropout=0.2), head=head)
    return mm


def token_cls_model(seed: int = 0) -> modfit.ModularModel:
    mm = modfit.wrap(tiny_bert(seed))
    torch.manual_seed(seed + 1)
    mm.add("ner", modfit.config("lora", r=4, alpha=8.0), head=modfit.head("token-cls", TAGS, dropout=0.0))
    return mm


def seq_cls_features(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sentences of 2..7 tokens; label 0 ("a") uses tokens 4..11, label 1 ("b") tokens 12..19."""
    rng = random.Random(seed)
    features = []
    for i in range(n):
        label = i % 2
        low = 4 if label == 0 else 12
        words = [rng.randint(low, low + 7) for _ in range(rng.randint(2, 7))]
        ids = [CLS, *words, SEP]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label})
    return features


def token_cls_features(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sentences of words; word token 4..7 is O, 8..11 LOC, 12..15 PER; some words have 2 pieces.

    A second piece of a word is token 20..23 and carries label -100, as `batching.encode` does.
    """
    rng = random.Random(seed)
    features = []
    for _ in range(n):
        ids, labels, word_ids = [CLS], [-100], [-1]
        previous = "O"
        for w in range(rng.randint(2, 6)):
            token = rng.randint(4, 15)
            kind = "O" if token < 8 else "LOC" if token < 12 else "PER"
            tag = "O" if kind == "O" else ("I-" if previous == kind else "B-") + kind
            previous = kind
            ids.append(token)
            labels.append(TAGS.index(tag))
            word_ids.append(w)
            if rng.random() < 0.3:  # a continuation piece
                ids.append(rng.randint(20, 23))
                labels.append(-100)
                word_ids.append(w)
        ids.append(SEP)
        labels.append(-100)
        word_ids.append(-1)
        features.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "word_ids": word_ids}
        )
    return features


WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "mat", "park", "paris", "london", "bob", "alice", "in")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer over `WORDS` (+ "##s"), built in code, ids < VOCAB."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS, "##s"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        # ids in the vocabulary below, not the CLS/SEP constants of the hand-made features
        special_tokens=[("[CLS]", SPECIALS.index("[CLS]")), ("[SEP]", SPECIALS.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) + rng.choice(["", "s"]) for _ in range(rng.randint(3, 7)))
        for _ in range(n)
    ]


def module_state(mm: modfit.ModularModel, name: str) -> dict[str, torch.Tensor]:
    """Copies of module `name`'s parameters (units and head), keyed by position."""
    return {str(i): p.detach().clone() for i, p in enumerate(mm.module_parameters(name))}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
