"""The `modfit` command line: train, eval, predict, info, methods, count, demo (their commands in
`commands.py`), merge, fisher (`commands_merge.py`), fusion-weights, routing-plot
(`commands_plots.py`), recipe (its parsers and commands in `commands_recipe.py`), convert
(`commands_convert.py`).

Every subcommand that prints results takes `--json` for machine-readable output. Errors that come
from the user's input (a bad file, an unknown method, a module trained on another base) print one
line `modfit: error: ...` and exit with status 2; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, commands_recipe
from .argtypes import positive_int

# The module that holds `cmd_<command>` where it is not `commands.py` (imported on use: the
# commands import torch and transformers, `--help` does not).
COMMAND_MODULES = {
    "merge": "commands_merge",
    "fisher": "commands_merge",
    "fusion-weights": "commands_plots",
    "routing-plot": "commands_plots",
    "recipe": "commands_recipe",
}

# OSError: a file or folder that cannot be read or written (a missing base, an --out that is a folder).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, ModuleNotFoundError)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", default="default", help="base model: 'default' (packaged MiniLM), a HF id or a folder"
    )
    p.add_argument("--load", action="append", default=[], metavar="DIR", help="a saved module (repeatable)")
    p.add_argument("--compose", metavar="EXPR", help="composition, e.g. 'stack(lang, task)'")
    p.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="load modules trained on a base with the same architecture but other weights",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=128)


def _torch_linear_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--torch-linear",
        action="store_true",
        help="compute the base model's linear layers with torch's own matrix products, not modfit's "
        "oneDNN ones (the same float32 products, rounded in another order; see modfit.fast_linear)",
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=["csv", "tsv", "jsonl", "conll", "text"],
        help="file format (default: by extension)",
    )
    p.add_argument("--text-column", help="text column of CSV/TSV/JSONL files (default: text or sentence)")
    p.add_argument("--label-column", help="label column of CSV/TSV/JSONL files (default: label)")
    p.add_argument(
        "--task-column",
        metavar="NAME",
        help="multi-task data: the CSV/TSV/JSONL column naming each example's task (batches carry task_ids)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `modfit` (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="modfit", description="Modular parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"modfit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a new module (frozen base, optional frozen loaded modules)")
    _common_model_args(p)
    _data_args(p)
    p.add_argument("--task", required=True, choices=["seq-cls", "token-cls", "mlm", "causal-lm"])
    p.add_argument("--method", required=True, help="a registered method (see `modfit methods`)")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)"
    )
    p.add_argument(
        "--train",
        required=True,
        action="append",
        metavar="FILE | TASK=FILE",
        help="training data; repeat as TASK=FILE for one file per task (multi-task data)",
    )
    p.add_argument("--eval", action="append", metavar="FILE | TASK=FILE", help="held-out data (as --train)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the trained module")
    p.add_argument("--name", help="module name (default: the --out folder's name)")
    p.add_argument("--language", help="language code recorded on the module card")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=float)
    group.add_argument("--steps", type=positive_int)
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3, or 5e-4 for MLM)")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layer activations in backward instead of storing them (less memory, slower)",
    )
    p.add_argument(
        "--torch-dropout",
        action="store_true",
        help="draw the base model's dropout masks with torch's own dropout, not modfit's faster one "
        "(the same distribution, another random stream; see modfit.fast_dropout)",
    )
    _torch_linear_arg(p)
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="train through torch.compile (default backend: inductor); the first steps compile",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        metavar="STEPS",
        help="write a resumable checkpoint every N steps",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh: refuse to run if --out holds checkpoints of an earlier run",
    )
    p.add_argument("--json", action="store_true")

    for command, what in (("eval", "evaluate"), ("predict", "predict with")):
        p = sub.add_parser(command, help=f"{what} saved modules on a data file")
        _common_model_args(p)
        _data_args(p)
        _torch_linear_arg(p)
        p.add_argument(
            "--data", required=True, metavar="FILE | TASK=FILE", help="the data (TASK=: all of one task)"
        )
        if command == "predict":
            p.add_argument(
                "--out", required=True, metavar="FILE", help="predictions (.jsonl, .csv, .tsv or .conll)"
            )
        else:
            p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="show a saved module's card")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("count", help="count a method's parameters on a base (without training)")
    p.add_argument("--base", default="default")
    p.add_argument("--method", required=True)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="train, save, reload and use a LoRA sentiment module on the default base")
    p.add_argument("--out", default="demo_out", metavar="DIR")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)

    # -- merging (issue 4): `modfit merge`, `modfit fisher` -------------------------------------
    p = sub.add_parser("merge", help="merge saved modules into a new module or a full model (offline)")
    p.add_argument("--base", default="default", help="the base model the modules were trained on")
    p.add_argument("--load", action="append", required=True, metavar="DIR", help="a module (repeatable)")
    p.add_argument("--allow-other-weights", action="store_true")
    p.add_argument(
        "--method",
        default="linear",
        help="linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune or fisher",
    )
    p.add_argument("--weights", metavar="W,W,...", help="one weight per --load, e.g. 1,-1 (default 1 each)")
    p.add_argument("--density", type=float, help="fraction kept by ties/magnitude_prune (0.2), dare_* (0.5)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the merged task vector")
    p.add_argument("--seed", type=int, default=0, help="seeds DARE's drop")
    p.add_argument("--to", default="same", help="same (the modules' method), lora, sft, or full (a model)")
    p.add_argument("--rank", type=positive_int, help="LoRA rank of the result (default: lossless)")
    p.add_argument("--head", default="first", help="first, average, none, or a loaded module's name")
    p.add_argument(
        "--base-weight", type=float, metavar="LAMBDA0", help="--method fisher: Elastic Weight Removal's λ0"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the merged module or model")
    p.add_argument("--name", help="name of the merged module (default: the --out folder's name)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fisher", help="compute a module's diagonal Fisher on a data file, stored beside it")
    p.add_argument("--base", default="default")
    p.add_argument("--load", required=True, metavar="DIR", help="the module")
    p.add_argument("--allow-other-weights", action="store_true")
    _data_args(p)
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument(
        "--task", choices=["seq-cls", "token-cls", "mlm", "causal-lm"], help="for a module without head"
    )
    p.add_argument(
        "--target",
        choices=["sample", "label"],
        default="sample",
        help="y drawn from the model (the Fisher, default) or the data's labels (the empirical Fisher)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--out", metavar="DIR", help="folder for fisher.safetensors (default: the --load folder)")
    p.add_argument("--json", action="store_true")

    # -- fusion weights (issue 4): `modfit fusion-weights` ---------------------------------------
    p = sub.add_parser(
        "fusion-weights",
        help="average a fusion's softmax weights per layer over a data file; table and heatmap",
    )
    _common_model_args(p)
    _data_args(p)
    p.add_argument("--data", required=True, metavar="FILE", help="the texts (labels, if any, are ignored)")
    p.add_argument(
        "--fusion", metavar="NAME", help="the fusion module (default: the one the composition runs)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw the heatmap (layers x modules); needs matplotlib")
    p.add_argument("--json", action="store_true")

    # -- routing (issue 5): `modfit routing-plot` ------------------------------------------------
    p = sub.add_parser(
        "routing-plot", help="draw a task-routed module's task x skill allocation (Polytropon) as a PNG"
    )
    p.add_argument("--base", default="default", help="the base model the module was trained on")
    p.add_argument("--load", required=True, metavar="DIR", help="the module")
    p.add_argument("--allow-other-weights", action="store_true")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the heatmap; needs matplotlib")
    p.add_argument("--json", action="store_true")

    # -- recipes (issue 6): `modfit recipe cross-lingual` -----------------------------------------
    commands_recipe.add_parsers(sub)

    # -- interop (issue 7): `modfit convert`, its parser and command in `commands_convert.py` ----
    from . import commands_convert

    commands_convert.add_parser(sub)
    return parser


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """`["r=8", "targets=query,value"]` -> {"r": "8", "targets": "query,value"}.

    Raises:
        ValueError: an item without `=` (the message quotes it).
    """
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        params[key.strip()] = value.strip()
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modfit` command; returns the exit status.

    0 on success; 2 on a usage error (argparse has printed it) or a user error (one line
    `modfit: error: ...` on stderr, no traceback). `--help` and `--version` return 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the help, the version or a usage error (status 2)
        return e.code if isinstance(e.code, int) else 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars drown modfit's output

    module = importlib.import_module(f".{COMMAND_MODULES.get(args.command, 'commands')}", __package__)
    handler = getattr(args, "handler", None) or getattr(module, f"cmd_{args.command.replace('-', '_')}")
    try:
        result: Any = handler(args)
    except USER_ERRORS as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        # One line, whatever the library's message looks like (HF errors span several lines).
        one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
        print(f"modfit: error: {one_line or type(e).__name__}", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    return 0


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as null (a loss over no targets is NaN): valid JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
