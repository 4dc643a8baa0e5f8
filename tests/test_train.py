"""The training loop: it learns, it is exact (accumulation, resuming), it fails safely.

All models are tiny random BERTs (see train_fixtures.py); the base has no dropout, and where a
test needs randomness the module itself has dropout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from seqeval.metrics import f1_score

import modfit
from modfit import checkpoint, distributed
from modfit.batching import MlmCollator, collate, encode
from modfit.config import ConfigError
from modfit.data import TextExample, TokenExample
from modfit.train import TrainSettings, evaluate, latest_checkpoint, predict, train
from train_fixtures import (
    SEQ_LABELS,
    TAGS,
    collate_fn,
    dropout_model,
    max_diff,
    module_state,
    sentences,
    seq_cls_features,
    seq_cls_model,
    tiny_bert,
    tiny_bert_classifier,
    tiny_tokenizer,
    token_cls_features,
    token_cls_model,
)

FAST = dict(lr=1e-2, batch_size=8, progress=False)


def _settings(**overrides: Any) -> TrainSettings:
    return TrainSettings(**{**FAST, **overrides})


# -- learning ------------------------------------------------------------------------------------


def test_loss_decreases_and_only_the_module_moves() -> None:
    mm = seq_cls_model()  # tiny_bert() is in eval mode, as from_pretrained leaves a model
    base = {n: p.detach().clone() for n, p in mm.model.named_parameters() if not n.startswith("modfit.")}
    dev = seq_cls_features(16, seed=1)
    result = train(
        mm,
        "task",
        seq_cls_features(40),
        collate_fn=collate_fn,
        settings=_settings(epochs=3),
        eval_features=dev,
    )
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.metrics["accuracy"] == 1.0 and result.metrics["loss"] < 0.5
    assert result.step == result.total_steps == 15 and result.resumed_from is None
    for n, p in mm.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
    assert not mm.model.training  # the mode it had before (no dropout switched on)


def test_history_has_eval_at_each_epoch_end() -> None:
    mm = seq_cls_model()
    result = train(
        mm,
        "task",
        seq_cls_features(24),  # 3 steps per epoch
        collate_fn=collate_fn,
        settings=_settings(epochs=2, log_every=2),
        eval_features=seq_cls_features(8, seed=1),
    )
    assert [e["step"] for e in result.history] == [2, 3, 4, 6]
    assert [e["step"] for e in result.history if "eval_accuracy" in e] == [3, 6]
    assert result.history[1]["epoch"] == 1.0
    assert set(result.history[1]) == {
        "step",
        "epoch",
        "loss",
        "lr",
        "eval_accuracy",
        "eval_macro_f1",
        "eval_loss",
    }
    assert result.metrics == {k[5:]: v for k, v in result.history[-1].items() if k.startswith("eval_")}


def test_headless_module_trains_with_the_models_own_loss() -> None:
    model = tiny_bert_classifier()
    mm = modfit.wrap(model)
    mm.add("task", modfit.config("lora", r=4))  # no modfit head: BertForSequenceClassification's loss
    before = module_state(mm, "task")
    result = train(mm, "task", seq_cls_features(16), collate_fn=collate_fn, settings=_settings(steps=3))
    assert max_diff(before, module_state(mm, "task")) > 0
    assert result.history[-1]["loss"] > 0
    assert set(evaluate(mm, seq_cls_features(8), collate_fn=collate_fn)) == {"loss"}


# -- settings ------------------------------------------------------------------------------------


def test_settings_defaults_and_json_round_trip() -> None:
    s = TrainSettings()
    assert s.epochs == 3.0 and s.steps is None
    assert TrainSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert TrainSettings(steps=5).epochs is None
    assert TrainSettings(epochs=1.5, batch_size=4).total_steps(10) == 4  # ceil(15 / 4)
    assert TrainSettings(checkpoint_dir=Path("runs") / "a").checkpoint_dir == str(Path("runs") / "a")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(epochs=1, steps=10), "train.epochs: give epochs or steps, not both"),
        (dict(epochs=0), "train.epochs: must be > 0"),
        (dict(steps=0), "train.steps: must be >= 1"),
        (dict(lr=0), "train.lr: must be > 0"),
        (dict(batch_size=0), "train.batch_size: must be >= 1"),
        (dict(batch_size=10, grad_accum=4), "train.batch_size: 10 is not divisible by grad_accum 4"),
        (dict(grad_accum=0), "train.grad_accum: must be >= 1"),
        (dict(weight_decay=-1), "train.weight_decay: must be >= 0"),
        (dict(warmup_ratio=1.0), r"train.warmup_ratio: must be in \[0, 1\)"),
        (dict(max_grad_norm=0), "train.max_grad_norm: must be > 0 or None"),
        (dict(seed=-1), "train.seed"),
        (dict(eval_every=0), "train.eval_every: must be >= 1 or None"),
        (dict(checkpoint_every=5), "train.checkpoint_every: needs checkpoint_dir"),
        (dict(resume=True), "train.resume: needs checkpoint_dir"),
        (dict(log_every=0), "train.log_every: must be >= 1"),
        (dict(stop_after_steps=0), "train.stop_after_steps: must be >= 1 or None"),
    ],
)
def test_settings_validation(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**values)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*learning_rate"):
        TrainSettings.from_dict({"learning_rate": 1.0})


def test_global_batch_must_split_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.Processes, "setup", classmethod(lambda cls: cls(rank=0, world=3)))
    with pytest.raises(ValueError, match=r"batch_size 8 is not divisible by world size 3 × grad_accum 1"):
        train(
            seq_cls_model(), "task", seq_cls_features(8), collate_fn=collate_fn, settings=_settings(steps=1)
        )


def test_errors_for_bad_data() -> None:
    mm = seq_cls_model()
    with pytest.raises(ValueError, match="no training features"):
        train(mm, "task", [], collate_fn=collate_fn, settings=_settings(steps=1))
    unlabelled = [{k: v for k, v in f.items() if k != "labels"} for f in seq_cls_features(8)]
    with pytest.raises(ValueError, match="has no 'labels'"):
        train(mm, "task", unlabelled, collate_fn=collate_fn, settings=_settings(steps=1))


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["seq-cls", "token-cls"])
def test_gradient_accumulation_matches_the_full_batch(task: str) -> None:
    # token-cls micro-batches hold different numbers of labelled tokens: the loss must be weighted
    # by them (a mean of micro-batch means would differ from the full-batch mean).
    make, features, name = (
        (seq_cls_model, seq_cls_features(32), "task")
        if task == "seq-cls"
        else (token_cls_model, token_cls_features(32), "ner")
    )
    states = []
    for accum in (1, 2, 4):
        mm = make()
        settings = _settings(
            steps=5, grad_accum=accum, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=0.5
        )
        train(mm, name, features, collate_fn=collate_fn, settings=settings)
        states.append(module_state(mm, name))
    assert max_diff(states[0], states[1]) < 1e-5
    assert max_diff(states[0], states[2]) < 1e-5


class Interrupt(Exception):
    pass


def _interrupt_at(step: int) -> Any:
    def callback(done: int, logs: dict[str, float]) -> None:
        if done == step:
            raise Interrupt(f"simulated crash after step {done}")

    return callback


@pytest.mark.parametrize("how", ["stop_after_steps", "exception"])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, how: str) -> None:
    features, dev = seq_cls_features(24), seq_cls_features(8, seed=1)  # 3 steps per epoch
    common = dict(
        epochs=3, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=0.5, log_every=1, checkpoint_every=2
    )

    whole = dropout_model()
    full = train(
        whole,
        "task",
        features,
        collate_fn=collate_fn,
        settings=_settings(checkpoint_dir=str(tmp_path / "a"), **common),
        eval_features=dev,
    )

    settings = _settings(checkpoint_dir=str(tmp_path / "b"), **common)
    first = dropout_model()
    if how == "stop_after_steps":
        stopped = train(
            first,
            "task",
            features,
            collate_fn=collate_fn,
            settings=TrainSettings(**{**settings.to_dict(), "stop_after_steps": 5}),
            eval_features=dev,
        )
        assert stopped.step == 5 and stopped.metrics == {}
    else:
        with pytest.raises(Interrupt):
            train(
                first, "task", features, collate_fn=collate_fn, settings=settings, callback=_interrupt_at(5)
            )
    assert latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "step-00000004"

    fresh = dropout_model()  # weights come from the checkpoint, in place
    resumed = train(
        fresh,
        "task",
        features,
        collate_fn=collate_fn,
        settings=TrainSettings(**{**settings.to_dict(), "resume": True}),
        eval_features=dev,
    )
    assert resumed.resumed_from == 4
    assert max_diff(module_state(whole, "task"), module_state(fresh, "task")) < 1e-6
    assert [e["step"] for e in resumed.history] == [e["step"] for e in full.history]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)
    assert resumed.metrics == pytest.approx(full.metrics, abs=1e-6)

    # Resuming a finished run does nothing but report.
    again = train(
        fresh,
        "task",
        features,
        collate_fn=collate_fn,
        settings=TrainSettings(**{**settings.to_dict(), "resume": True}),
        eval_features=dev,
    )
    assert again.resumed_from == 9 and again.step == 9
    assert max_diff(module_state(whole, "task"), module_state(fresh, "task")) < 1e-6


def test_resume_restores_the_collators_generator(tmp_path: Path) -> None:
    # MLM: the masks come from the collator's own generator, which the checkpoint carries.
    tok = tiny_tokenizer()
    features = encode([TextExample(s) for s in sentences(16)], tok, "mlm", labels=None, max_length=16)

    def run(stop: int | None, resume: bool) -> modfit.ModularModel:
        mm = modfit.wrap(tiny_bert())
        torch.manual_seed(1)
        mm.add("lm", modfit.config("lora", r=4), head=modfit.head("mlm", dropout=0.0))
        settings = _settings(
            steps=6,
            checkpoint_dir=str(tmp_path / "ckpt"),
            checkpoint_every=2,
            stop_after_steps=stop,
            resume=resume,
        )
        train(mm, "lm", features, collate_fn=MlmCollator(tok, seed=3), settings=settings)
        return mm

    run(stop=3, resume=False)
    resumed = run(stop=None, resume=True)
    (tmp_path / "ckpt").rename(tmp_path / "old")
    whole = run(stop=None, resume=False)
    assert max_diff(module_state(whole, "lm"), module_state(resumed, "lm")) < 1e-6


def test_resume_without_checkpoint_starts_afresh(tmp_path: Path) -> None:
    mm = seq_cls_model()
    settings = _settings(steps=2, checkpoint_dir=str(tmp_path / "none-yet"), resume=True)
    result = train(mm, "task", seq_cls_features(16), collate_fn=collate_fn, settings=settings)
    assert result.resumed_from is None and result.step == 2
    assert latest_checkpoint(tmp_path / "none-yet") == tmp_path / "none-yet" / "step-00000002"


def test_resume_refuses_another_data_order_or_module(tmp_path: Path) -> None:
    settings = _settings(steps=2, checkpoint_dir=str(tmp_path))
    train(seq_cls_model(), "task", seq_cls_features(16), collate_fn=collate_fn, settings=settings)
    resume = settings.to_dict() | {"resume": True}
    with pytest.raises(ConfigError, match=r"data order changed.*seed: 42 then, 7 now"):
        reseeded = TrainSettings(**resume | {"seed": 7})
        train(seq_cls_model(), "task", seq_cls_features(16), collate_fn=collate_fn, settings=reseeded)
    with pytest.raises(ConfigError, match="number of examples: 16 then, 24 now"):
        train(
            seq_cls_model(),
            "task",
            seq_cls_features(24),
            collate_fn=collate_fn,
            settings=TrainSettings(**resume),
        )
    other = seq_cls_model()
    other.add("other", modfit.config("lora", r=2), head=modfit.head("seq-cls", SEQ_LABELS))
    with pytest.raises(ConfigError, match="a checkpoint of module 'task', not 'other'"):
        train(other, "other", seq_cls_features(16), collate_fn=collate_fn, settings=TrainSettings(**resume))


# -- checkpoints ---------------------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_checkpoint_is_pickle_free_and_its_module_loads(tmp_path: Path) -> None:
    mm = seq_cls_model()
    train(
        mm,
        "task",
        seq_cls_features(16),
        collate_fn=collate_fn,
        settings=_settings(steps=2, checkpoint_dir=str(tmp_path)),
    )
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    assert {p.suffix for p in latest.rglob("*") if p.is_file()} == {".json", ".safetensors"}
    state = json.loads((latest / "trainer.json").read_text())
    assert state["step"] == 2 and state["epoch"] == 1.0 and state["module"] == "task"

    other = modfit.wrap(tiny_bert())
    other.load(latest / "module", name="task")
    other.activate("task")
    mm.activate("task")
    batch = collate_fn(seq_cls_features(4))
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, mm(**batch).logits, rtol=0, atol=0)


class WriteFails(Exception):
    pass


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, target: str, n: int) -> None:
    """Make checkpoint.<target> raise on its n-th call (1-based)."""
    original = getattr(checkpoint, target)
    calls = {"count": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == n:
            raise WriteFails(f"disk full on call {n}")
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, target, failing)


def test_failed_run_leaves_earlier_checkpoints_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    resume = TrainSettings(**settings.to_dict() | {"resume": True})
    features = seq_cls_features(16)

    # The second checkpoint (step 4) fails while its last file is being written.
    _fail_on_call(monkeypatch, "write_json", 2)
    with pytest.raises(WriteFails):
        train(seq_cls_model(), "task", features, collate_fn=collate_fn, settings=settings)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no half-written folder
    before = _tree(tmp_path)

    # A resumed run fails in its first checkpoint, and a fresh run may not mix in: step 2 stays.
    _fail_on_call(monkeypatch, "write_safetensors", 1)
    with pytest.raises(WriteFails):
        train(seq_cls_model(), "task", features, collate_fn=collate_fn, settings=resume)
    monkeypatch.undo()
    with pytest.raises(
        FileExistsError, match=r"already holds checkpoints \(latest: step-00000002\); pass resume=True"
    ):
        train(seq_cls_model(), "task", features, collate_fn=collate_fn, settings=settings)
    assert _tree(tmp_path) == before

    resumed = train(seq_cls_model(), "task", features, collate_fn=collate_fn, settings=resume)
    assert resumed.resumed_from == 2 and resumed.step == 6


def test_rewriting_a_checkpoint_folder_keeps_the_old_one_until_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mm = seq_cls_model()
    train(
        mm,
        "task",
        seq_cls_features(16),
        collate_fn=collate_fn,
        settings=_settings(steps=2, checkpoint_dir=tmp_path),
    )
    folder = tmp_path / "step-00000002"
    before = _tree(folder)
    state = json.loads((folder / "trainer.json").read_text())

    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise WriteFails("no space left")

    monkeypatch.setattr(mm, "save", failing_save)
    with pytest.raises(WriteFails):
        checkpoint._write_checkpoint(folder, mm, "task", state, {})
    monkeypatch.undo()
    assert _tree(folder) == before
    checkpoint._write_checkpoint(folder, mm, "task", state | {"step": 2, "note": "new"}, {})
    assert json.loads((folder / "trainer.json").read_text())["note"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no leftovers


# -- evaluation and prediction -------------------------------------------------------------------


def test_evaluate_token_cls_scores_word_level_tags() -> None:
    mm = token_cls_model()
    mm.activate("ner")
    features = token_cls_features(12, seed=3)
    metrics = evaluate(mm, features, collate_fn=collate_fn, batch_size=5)

    # The same by hand: one forward per sentence, tags at the first sub-token of each word.
    gold, pred, losses, counts = [], [], [], []
    with torch.no_grad():
        for f in features:
            out = mm(**collate_fn([f]))
            labels = torch.tensor(f["labels"])
            keep = labels != -100
            gold.append([TAGS[i] for i in labels[keep].tolist()])
            pred.append([TAGS[i] for i in out.logits[0].argmax(-1)[keep].tolist()])
            losses.append(float(out.loss) * int(keep.sum()))
            counts.append(int(keep.sum()))
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred))
    flat = [(g, p) for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True)]
    assert metrics["accuracy"] == pytest.approx(sum(g == p for g, p in flat) / len(flat))
    assert metrics["loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-5)
    assert set(metrics) == {"precision", "recall", "f1", "accuracy", "loss"}

    # predict gives the same tags per word, from word_ids
    assert predict(mm, features, collate_fn=collate_fn, batch_size=5) == pred


def test_token_cls_from_real_tokenizer_end_to_end() -> None:
    tok = tiny_tokenizer()
    examples = [
        TokenExample(("bob", "sat", "in", "paris"), ("B-PER", "O", "O", "B-LOC")),
        TokenExample(("alice", "cats", "ran", "london"), ("B-PER", "O", "O", "B-LOC")),  # cats = cat ##s
    ] * 8
    features = encode(examples, tok, "token-cls", labels=list(TAGS), max_length=16)
    mm = token_cls_model()
    pad = tok.pad_token_id
    collate_tok = lambda batch: collate(batch, pad)  # noqa: E731
    result = train(
        mm,
        "ner",
        features,
        collate_fn=collate_tok,
        settings=_settings(epochs=8, lr=3e-2),
        eval_features=features,
    )
    assert result.metrics["f1"] == 1.0
    tags = predict(mm, features[:2], collate_fn=collate_tok)
    assert tags == [list(examples[0].tags or ()), list(examples[1].tags or ())]


def test_predict_and_evaluate_seq_cls() -> None:
    mm = seq_cls_model()
    train(mm, "task", seq_cls_features(40), collate_fn=collate_fn, settings=_settings(epochs=3))
    dev = seq_cls_features(10, seed=2)
    assert predict(mm, dev, collate_fn=collate_fn, batch_size=3) == [SEQ_LABELS[f["labels"]] for f in dev]
    metrics = evaluate(mm, dev, collate_fn=collate_fn, batch_size=3)
    assert metrics["accuracy"] == metrics["macro_f1"] == 1.0


def test_evaluate_language_model_gives_perplexity() -> None:
    mm = modfit.wrap(tiny_bert())
    mm.add("lm", modfit.config("lora", r=2), head=modfit.head("mlm"))
    mm.activate("lm")
    features = [dict(f, labels=[-100, *f["input_ids"][1:-1], -100]) for f in seq_cls_features(6)]
    metrics = evaluate(mm, features, collate_fn=collate_fn)
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    with pytest.raises(ValueError, match="predict needs an active seq-cls or token-cls head, not mlm"):
        predict(mm, features, collate_fn=collate_fn)
