"""`modfit recipe ...`: whole pipelines from files (the parsers and what each subcommand does).

    modfit recipe cross-lingual --base MODEL --source-text FILE --target-text FILE --task token-cls
        --train FILE --eval-target FILE --out DIR [--method pfeiffer|sft] [...]

The parsers are registered by `cli.py` (`add_parsers`); `cmd_recipe` runs the chosen recipe, prints
its table unless `--json`, and returns a JSON-ready result. This module imports nothing heavy at the
top, so `modfit --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .argtypes import non_negative_int, positive_int

# The recipe's flags of its input files, by `CrossLingualSpec` field (checked before anything loads).
INPUT_FLAGS = {
    "source_text": "--source-text",
    "target_text": "--target-text",
    "train": "--train",
    "eval_target": "--eval-target",
}


def add_parsers(sub: Any) -> None:
    """Register `recipe` and its subcommands on the `modfit` subparsers `sub`."""
    recipe = sub.add_parser("recipe", help="run a whole pipeline from files (cross-lingual transfer)")
    recipes = recipe.add_subparsers(dest="recipe", required=True)

    p = recipes.add_parser(
        "cross-lingual",
        help="MAD-X / LT-SFT: language modules by MLM, a task module on the source language, "
        "the F1 table with the target language swapped in",
    )
    p.add_argument(
        "--base", default="default", help="base model: 'default' (packaged MiniLM), a HF id or a folder"
    )
    p.add_argument("--source-text", required=True, metavar="FILE", help="source-language raw text")
    p.add_argument(
        "--target-text",
        required=True,
        metavar="FILE",
        help="target-language raw text (a CoNLL file is read as text, its tags ignored)",
    )
    p.add_argument("--task", default="token-cls", choices=["token-cls"])
    p.add_argument("--train", required=True, metavar="FILE", help="source-language task data (CoNLL)")
    p.add_argument(
        "--eval-target", required=True, metavar="FILE", help="target-language task data for the table (CoNLL)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the modules, table and plot")
    p.add_argument(
        "--method",
        default="pfeiffer",
        choices=["pfeiffer", "sft"],
        help="pfeiffer: Pfeiffer + invertible language adapters, a Pfeiffer task adapter; sft: LT-SFT diffs",
    )
    p.add_argument("--mlm-steps", type=positive_int, default=1000, help="steps of each language module")
    p.add_argument("--task-steps", type=positive_int, default=600, help="steps of the task module")
    p.add_argument("--mlm-lr", type=float, help="learning rate of the language modules (default 1e-3)")
    p.add_argument("--task-lr", type=float, help="learning rate of the task module (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument(
        "--extend-vocab",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="learn N new target word pieces (0: none)",
    )
    p.add_argument(
        "--max-text-lines",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="cap on raw-text lines (0: all)",
    )
    p.add_argument(
        "--max-train-sentences",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="cap on task sentences (0: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source-lang", default="source", metavar="NAME", help="name of the source language module"
    )
    p.add_argument(
        "--target-lang", default="target", metavar="NAME", help="name of the target language module"
    )
    p.add_argument("--task-name", default="task", metavar="NAME", help="name of the task module")
    p.add_argument(
        "--lang-param", action="append", default=[], metavar="KEY=VALUE", help="language module config field"
    )
    p.add_argument(
        "--task-param", action="append", default=[], metavar="KEY=VALUE", help="task module config field"
    )
    p.add_argument(
        "--no-whole-word-masking", action="store_true", help="mask single word pieces, not whole words"
    )
    p.add_argument(
        "--shared-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the target language module under the source module's frozen MLM head (default: on)",
    )
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true")


def cmd_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Run `modfit recipe <args.recipe>`."""
    return {"cross-lingual": cmd_cross_lingual}[args.recipe](args)


def cmd_cross_lingual(args: argparse.Namespace) -> dict[str, Any]:
    """`modfit recipe cross-lingual`: run `run_cross_lingual`, print and return its table."""
    for field, flag in INPUT_FLAGS.items():
        path = getattr(args, field)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    from dataclasses import fields

    from .cli import parse_params
    from .recipes import CrossLingualSpec, run_cross_lingual
    from .recipes.cross_lingual import table_markdown

    options: dict[str, Any] = {}
    if args.shared_head is not None:  # else the recipe's default
        options["shared_head"] = args.shared_head
    spec = CrossLingualSpec(
        base=args.base,
        source_text=args.source_text,
        target_text=args.target_text,
        train=args.train,
        eval_target=args.eval_target,
        out=args.out,
        method=args.method,
        task=args.task,
        mlm_steps=args.mlm_steps,
        task_steps=args.task_steps,
        mlm_lr=args.mlm_lr,
        task_lr=args.task_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        extend_vocab=args.extend_vocab,
        max_text_lines=args.max_text_lines,
        max_train_sentences=args.max_train_sentences,
        seed=args.seed,
        lang_params=dict(parse_params(args.lang_param)),
        task_params=dict(parse_params(args.task_param)),
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        task_name=args.task_name,
        whole_word_masking=not args.no_whole_word_masking,
        **options,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with _recipe_log(quiet=args.json):
        report = run_cross_lingual(spec)
    if not args.json:
        print(table_markdown(report.table), end="")
        print(f"{report.seconds:.0f} s; modules, results.json, results.md and curves.png in {report.out}")
    return {
        "table": report.table,
        "unknown_labels_as_o": report.unknown_labels,
        "seconds": round(report.seconds, 1),
        "out": str(report.out),
        "modules": {
            "source": str(report.out / spec.source_lang),
            "target": str(report.out / spec.target_lang),
            "task": str(report.out / spec.task_name),
        },
        "spec": {f.name: getattr(spec, f.name) for f in fields(spec)},
    }


class _recipe_log:
    """Route the recipe's log to stderr for the run: warnings as `modfit: warning: ...`, progress
    lines (INFO) too unless `quiet`. Restores the logger afterwards."""

    def __init__(self, quiet: bool) -> None:
        self.logger = logging.getLogger("modfit.recipes")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(_Prefixed())
        self.level = logging.WARNING if quiet else logging.INFO

    def __enter__(self) -> None:
        self.saved = self.logger.level, self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.level)
        self.logger.propagate = False  # no second copy through the root logger's handlers

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"modfit: warning: {message}" if record.levelno >= logging.WARNING else message
