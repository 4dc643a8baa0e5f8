"""The cross-lingual transfer recipe (MAD-X; and its sparse variant, LT-SFT), end to end from files.

    report = run_cross_lingual(CrossLingualSpec(base="default", source_text="en.txt", target_text="sw.txt",
                                                train="en_ner.conll", eval_target="sw_ner.conll",
                                                out="runs/en-sw"))

1. A **language module** per language, trained with masked language modelling on its raw text: a
   Pfeiffer adapter with an invertible adapter (`pfeiffer_inv`) by default, or an `sft` diff. With
   `extend_vocab=N` the target language's module also learns N new word pieces from its text
   (`methods/vocab.py`), whose embeddings train inside it.
2. A **task module** trained on the source language's labelled data, stacked on the (frozen)
   source language module: `stack(source, task)`.
3. Evaluation on the target language's labelled data of the task module alone, of
   `stack(source, task)` and of `stack(target, task)` (the zero-shot transfer: the language module
   swapped). Target labels the task head does not know (e.g. DATE) count as O, with a warning.

Everything lands in `out`: the three modules (loadable with `modfit eval --load ... --compose`),
`results.json` and `results.md` (the table and every setting), `curves.png` (MLM and task losses).
The sparse variant trains `sft` modules throughout; stacking sparse diffs sums them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..atomic import write_text
from ..base import load_base, load_tokenizer
from ..batching import MlmCollator, collate, encode
from ..data import TokenExample, read_conll, read_text
from ..heads import head
from ..model import ModularModel, wrap
from ..plotting import new_figure, save_png
from ..registry import config as method_config
from ..train import TrainSettings, evaluate, train

log = logging.getLogger(__name__)

LanguageMethod = Literal["pfeiffer", "sft"]


@dataclass(frozen=True)
class CrossLingualSpec:
    """What to run.

    Attributes:
        base: base model ("default": the packaged MiniLM, a HF id or a folder).
        source_text, target_text: raw text, one sentence a line, per language.
        train: the source language's labelled task data (CoNLL for token-cls).
        eval_target: the target language's labelled data, for the table.
        out: the output folder.
        method: "pfeiffer" (Pfeiffer + invertible language adapters, Pfeiffer task adapter) or "sft".
        task: "token-cls" (NER).
        mlm_steps, task_steps: optimizer steps of each language module and of the task module.
        mlm_lr, task_lr: their learning rates (None: method defaults, see `_defaults`).
        batch_size, max_length: of every run.
        extend_vocab: new word pieces learned for the target language (0: none).
        max_text_lines, max_train_sentences: caps on the data read (0: all).
        seed: seeds every run.
        lang_params, task_params: extra config fields of the language and task modules.
        source_lang, target_lang, task_name: the modules' names (and folder names under `out`), so
            that `modfit eval --load out/sw --load out/ner --compose "stack(sw, ner)"` reads as the
            table does.
        whole_word_masking: MLM masks whole words (all pieces of a word together), else single pieces.
        shared_head: the target language module trains under the source module's MLM head, frozen
            (as MAD-X trains every language adapter under the one pretrained, frozen MLM head), so both
            language modules map into the space one head reads; else it trains its own head. On by
            default: measured on MiniLM English -> Swahili, it is what makes the swap help (the
            README's cross-lingual table: 25.5 F1 against 7.9 with an own head).
    """

    base: str
    source_text: str
    target_text: str
    train: str
    eval_target: str
    out: str
    method: LanguageMethod = "pfeiffer"
    task: str = "token-cls"
    mlm_steps: int = 1000
    task_steps: int = 600
    mlm_lr: float | None = None
    task_lr: float | None = None
    batch_size: int = 32
    max_length: int = 128
    extend_vocab: int = 0
    max_text_lines: int = 0
    max_train_sentences: int = 0
    seed: int = 0
    lang_params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)
    source_lang: str = "source"
    target_lang: str = "target"
    task_name: str = "task"
    whole_word_masking: bool = True
    shared_head: bool = True

    def __post_init__(self) -> None:
        if self.method not in get_args(LanguageMethod):
            raise ValueError(f"recipe cross-lingual: unknown method {self.method!r}; use pfeiffer or sft")
        if self.task != "token-cls":
            raise ValueError(
                f"recipe cross-lingual: task {self.task!r} is not supported yet (token-cls only)"
            )
        for what in ("mlm_steps", "task_steps", "batch_size", "max_length"):
            if getattr(self, what) < 1:
                raise ValueError(f"recipe cross-lingual: {what} must be >= 1, got {getattr(self, what)}")
        for what in ("extend_vocab", "max_text_lines", "max_train_sentences"):
            if getattr(self, what) < 0:
                raise ValueError(f"recipe cross-lingual: {what} must be >= 0, got {getattr(self, what)}")
        names = (self.source_lang, self.target_lang, self.task_name)
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"recipe cross-lingual: module name {name!r} must be a word (letters, digits, _)"
                )
        if len(set(names)) != 3:
            raise ValueError(
                f"recipe cross-lingual: the three module names must differ, got {', '.join(names)}"
            )

    def inputs(self) -> dict[str, str]:
        """The input files by field name."""
        return {k: getattr(self, k) for k in ("source_text", "target_text", "train", "eval_target")}


@dataclass
class CrossLingualReport:
    """The table (F1 per setting), the loss curves and where everything was saved."""

    table: dict[str, dict[str, float]]
    curves: dict[str, list[tuple[int, float]]]
    out: Path
    seconds: float
    unknown_labels: list[str]


def _defaults(method: str) -> tuple[str, str, float, float]:
    """(language method, task method, language lr, task lr) of a recipe variant."""
    if method == "sft":
        return "sft", "sft", 1e-3, 1e-3
    return "pfeiffer_inv", "pfeiffer", 1e-3, 1e-3


_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _lines(path: str, cap: int) -> list[str]:
    """Sentences of a raw-text file (one a line), or of a CoNLL file (`token TAG` lines, blank lines
    between sentences; its tags are ignored), told apart by whether every line ends in a tag."""
    texts = [ex.text for ex in read_text(path)]
    if texts and all(len(t.split()) == 2 and _TAG.match(t.split()[1]) for t in texts[:200]):
        texts = [" ".join(ex.tokens) for ex in read_conll(path, require_labels=False)]
        log.info("%s: CoNLL data, read as %d sentences of raw text", path, len(texts))
    return texts[:cap] if cap else texts


def _as_o(examples: Sequence[TokenExample], known: set[str]) -> tuple[list[TokenExample], list[str]]:
    """Tags the task head does not know become O (their entity type is absent from the source data)."""
    unknown: set[str] = set()
    out = []
    for ex in examples:
        tags = tuple(t if t in known else "O" for t in ex.tags or ())
        unknown.update(t for t in ex.tags or () if t not in known)
        out.append(replace(ex, tags=tags))
    return out, sorted(unknown)


def _train(
    mm: ModularModel,
    name: str,
    features: list[Any],
    collate_fn: Any,
    steps: int,
    lr: float,
    spec: CrossLingualSpec,
    curve: list[tuple[int, float]],
) -> None:
    settings = TrainSettings(
        steps=steps, lr=lr, batch_size=spec.batch_size, seed=spec.seed, log_every=max(1, steps // 50)
    )
    started = time.perf_counter()
    train(
        mm,
        name,
        features,
        collate_fn=collate_fn,
        settings=settings,
        callback=lambda step, logs: curve.append((step, float(logs["loss"]))),
    )
    log.info("%s: %d steps in %.0f s", name, steps, time.perf_counter() - started)


def run_cross_lingual(spec: CrossLingualSpec) -> CrossLingualReport:
    """Run the recipe (see the module docstring) and save everything under `spec.out`.

    Every input file is read before anything trains, so a bad file fails at once.

    Raises:
        ValueError, OSError: unreadable data (the message names the file and line) or a bad setting.
    """
    for what, path in spec.inputs().items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe cross-lingual: {what} {path}: no such file")
    started = time.perf_counter()
    src, tgt, task = spec.source_lang, spec.target_lang, spec.task_name
    source_texts = _lines(spec.source_text, spec.max_text_lines)
    target_texts = _lines(spec.target_text, spec.max_text_lines)
    train_examples = read_conll(spec.train)
    if spec.max_train_sentences:
        train_examples = train_examples[: spec.max_train_sentences]
    labels = sorted({t for ex in train_examples for t in ex.tags or ()}, key=lambda t: (t != "O", t))
    eval_examples, unknown = _as_o(read_conll(spec.eval_target), set(labels))
    if unknown:
        log.warning("target labels unknown to the task head count as O: %s", ", ".join(unknown))

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    lang_method, task_method, lang_lr, task_lr = _defaults(spec.method)
    lang_lr, task_lr = spec.mlm_lr or lang_lr, spec.task_lr or task_lr
    tokenizer = load_tokenizer(spec.base)
    mm = wrap(load_base(spec.base))
    curves: dict[str, list[tuple[int, float]]] = {f"{src} mlm": [], f"{tgt} mlm": [], task: []}

    # 1. language modules
    def mlm_features(texts: Sequence[str], tok: Any) -> list[Any]:
        return encode(
            _text_examples(texts), tok, "mlm", labels=None, max_length=spec.max_length, keep_word_ids=True
        )

    def masking(tok: Any) -> MlmCollator:
        return MlmCollator(tok, whole_word_masking=spec.whole_word_masking, seed=spec.seed)

    mm.add(src, method_config(lang_method, **spec.lang_params), head=head("mlm"), language=src)
    _train(
        mm,
        src,
        mlm_features(source_texts, tokenizer),
        masking(tokenizer),
        spec.mlm_steps,
        lang_lr,
        spec,
        curves[f"{src} mlm"],
    )

    target_tokenizer = tokenizer
    target_config = method_config(lang_method, **spec.lang_params)
    if spec.extend_vocab:
        from ..vocabulary import extended_tokenizer, learn_pieces

        pieces = learn_pieces(tokenizer, target_texts, spec.extend_vocab)
        vocab = method_config(
            "vocab", tokens=pieces, base_vocab=len(tokenizer), unk_id=tokenizer.unk_token_id
        )
        target_config = method_config("union", components=[target_config, vocab])
        target_tokenizer = extended_tokenizer(tokenizer, pieces)
    # A shared head: the target module has none of its own; it trains under the source's (frozen:
    # `train` optimises the target module's own parameters only).
    mm.add(tgt, target_config, head=None if spec.shared_head else head("mlm"), language=tgt)
    if spec.extend_vocab:
        from ..vocabulary import initialise_lexically

        initialise_lexically(mm, tgt, tokenizer)
    mm.activate(tgt, head=src if spec.shared_head else tgt)
    _train(
        mm,
        tgt,
        mlm_features(target_texts, target_tokenizer),
        masking(target_tokenizer),
        spec.mlm_steps,
        lang_lr,
        spec,
        curves[f"{tgt} mlm"],
    )

    # 2. the task module on the source language
    pad = tokenizer.pad_token_id
    task_features = encode(train_examples, tokenizer, "token-cls", labels=labels, max_length=spec.max_length)
    mm.add(task, method_config(task_method, **spec.task_params), head=head("token-cls", labels), task=task)
    mm.activate(f"stack({src}, {task})")
    _train(
        mm,
        task,
        task_features,
        partial(collate, pad_token_id=pad),
        spec.task_steps,
        task_lr,
        spec,
        curves[task],
    )

    # 3. the table
    table: dict[str, dict[str, float]] = {}
    for expression, tok in (
        (task, tokenizer),
        (f"stack({src}, {task})", tokenizer),
        (f"stack({tgt}, {task})", target_tokenizer),
    ):
        features = encode(eval_examples, tok, "token-cls", labels=labels, max_length=spec.max_length)
        mm.activate(expression, head=task)
        metrics = evaluate(mm, features, collate_fn=partial(collate, pad_token_id=pad), batch_size=64)
        row = f"{task} alone" if expression == task else expression
        table[row] = {k: metrics[k] for k in ("f1", "precision", "recall") if k in metrics}

    for name in (src, tgt, task):
        mm.save(name, out / name)
    seconds = time.perf_counter() - started
    report = CrossLingualReport(table, curves, out, seconds, unknown)
    _write_results(spec, report)
    _plot_curves(curves, out / "curves.png")
    return report


def _text_examples(texts: Sequence[str]) -> list[Any]:
    from ..data import TextExample

    return [TextExample(text=t) for t in texts]


def table_markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| setting | entity F1 | precision | recall |", "|---|---|---|---|"]
    for row, m in table.items():
        scores = " | ".join(f"{100 * m.get(k, 0.0):.1f}" for k in ("f1", "precision", "recall"))
        lines.append(f"| {row} | {scores} |")
    return "\n".join(lines) + "\n"


def _write_results(spec: CrossLingualSpec, report: CrossLingualReport) -> None:
    results = {
        "spec": asdict(spec),
        "table": report.table,
        "seconds": round(report.seconds, 1),
        "unknown_labels_as_o": report.unknown_labels,
        "curves": {k: [list(p) for p in v] for k, v in report.curves.items()},
    }
    write_text(report.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(report.out / "results.md", table_markdown(report.table))


def _plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """The MLM losses of both language modules ("... mlm") and the task loss, one panel each (PNG)."""
    try:
        fig = new_figure("the learning curves", figsize=(10, 3.5), layout="constrained")
    except ModuleNotFoundError as e:  # the plot extra is not installed: the run itself stands
        log.warning("no %s: %s", path.name, e)
        return
    axes = fig.subplots(1, 2)
    for name, curve in curves.items():
        if curve and name.endswith(" mlm"):
            steps, losses = zip(*curve, strict=True)
            axes[0].plot(steps, losses, label=name)
    axes[0].set(title="language modules (MLM loss)", xlabel="step", ylabel="loss")
    axes[0].legend()
    for name, curve in curves.items():
        if curve and not name.endswith(" mlm"):
            steps, losses = zip(*curve, strict=True)
            axes[1].plot(steps, losses, color="tab:green")
    axes[1].set(title="task module (token-cls loss)", xlabel="step", ylabel="loss")
    save_png(fig, path)
