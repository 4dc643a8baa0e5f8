"""`modfit fusion-weights` and `modfit routing-plot`: what a trained fusion attends to, and how a
Polytropon module allocates skills to tasks, as tables and heatmaps. `cli.py` parses the arguments;
the helpers shared by every command are in `commands.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .batching import encode
from .commands import (
    PREDICTION_SUFFIXES,
    _activate_loaded,
    _base_model,
    _collate_fn,
    _load_modules,
    _read,
    _say,
    _tokenizer,
    _unlabeled,
)
from .model import ModularModel, wrap
from .persistence import read_card


def cmd_fusion_weights(args: argparse.Namespace) -> dict[str, Any]:
    from .compose.fusion_weights import as_json, format_table, fusion_weights, plot_fusion_weights

    if not args.load:
        raise ValueError(
            "name the fusion module and the modules it fuses with --load DIR (fused modules first)"
        )
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the heatmap is written as a .png file")
    cards = [read_card(d) for d in args.load]
    tasks = [c["head"]["task"] for c in cards if c.get("head")]
    task = tasks[-1] if tasks else None
    mm = wrap(_base_model(args.base, task))
    names = _load_modules(mm, args)
    _activate_loaded(mm, names, args.compose)
    fusion = _pick_fusion(mm, args.fusion)
    tokenizer = _tokenizer(args.base)
    # Only the text matters: read it as the head's task reads it (labels, if any, play no part).
    reader_task = task if task in PREDICTION_SUFFIXES else "mlm"
    examples: list[Any] = [_unlabeled(ex) for ex in _read(args, args.data, reader_task, require_labels=False)]
    features = encode(examples, tokenizer, reader_task, labels=None, max_length=args.max_length)
    collate_fn = _collate_fn("seq-cls", tokenizer)  # plain padding (no MLM masking)
    batches = (
        collate_fn(features[i : i + args.batch_size]) for i in range(0, len(features), args.batch_size)
    )
    result = fusion_weights(mm, fusion, batches)
    out: dict[str, Any] = {
        "fusion": fusion,
        "composition": str(mm.active),
        "data": args.data,
        "examples": len(features),
        **as_json(result),
        "plot": None,
    }
    _say(
        args,
        f"fusion '{fusion}' in {mm.active}: mean softmax weights over {result.tokens:,} tokens of "
        f"{args.data} ({len(features)} examples); rows: layers (several sites in one layer averaged)",
        format_table(result),
    )
    if args.plot is not None:
        out["plot"] = str(plot_fusion_weights(result, args.plot, title=f"{fusion}: {mm.active}"))
        _say(args, f"saved {args.plot}")
    return out


def _pick_fusion(mm: ModularModel, wanted: str | None) -> str:
    """The fusion module whose weights are read: `--fusion`, else the only one the composition runs."""
    running = [n for n in mm.active_names() if mm.records[n].config.method == "fusion"]
    if wanted is not None:
        if wanted not in mm.records:
            raise ValueError(f"--fusion {wanted}: no such loaded module (loaded: {', '.join(mm.records)})")
        if wanted not in running:
            raise ValueError(
                f"--fusion {wanted}: not a fusion module the composition {mm.active} runs "
                f"(fusion modules running: {', '.join(running) or 'none'})"
            )
        return wanted
    if not running:
        raise ValueError(
            f"the composition {mm.active} runs no fusion module: load one (after the modules it fuses) "
            "and compose with fuse(...)"
        )
    if len(running) > 1:
        raise ValueError(
            f"the composition runs several fusion modules ({', '.join(running)}): pick one with --fusion"
        )
    return running[0]


# -- routing-plot (issue 5: Polytropon's task x skill allocation) ------------------------------------


def cmd_routing_plot(args: argparse.Namespace) -> dict[str, Any]:
    from .routing.plot import module_allocation, plot_allocation

    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the allocation is drawn as a .png file")
    card = read_card(args.load)
    task = (card.get("head") or {}).get("task")
    mm = wrap(_base_model(args.base, task))
    name = mm.load(args.load, check_base=not args.allow_other_weights)
    allocation = module_allocation(mm, name)
    plot_allocation(allocation, args.out, title=f"{name}: task x skill allocation")
    _say(
        args,
        f"'{name}' ({card['method']}): {len(allocation.tasks)} tasks x {allocation.skills} skills"
        + (f" x {allocation.heads} heads" if allocation.heads > 1 else ""),
        f"saved {args.out}",
    )
    return {"module": name, "out": str(args.out), **allocation.as_json()}
