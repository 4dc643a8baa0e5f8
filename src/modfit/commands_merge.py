"""`modfit merge` and `modfit fisher`: parameter-space merging of saved modules (task arithmetic,
TIES, DARE, Fisher weighting) into one module or into a full model, and the Fisher estimate that
Fisher merging reads. `cli.py` parses the arguments; the helpers shared by every command are in
`commands.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .commands import _base_model, _collate_fn, _encode, _model_tasks, _read, _say, _tokenizer, _unlabeled
from .heads import HeadConfig
from .model import wrap
from .persistence import read_card


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected numbers separated by commas, e.g. 1,-1") from None


def _check_merge_out(out: Path, loads: Sequence[str]) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    for directory in loads:
        if out.resolve() == Path(directory).resolve():
            raise ValueError(f"--out {out} is the folder of a --load module; saving there would overwrite it")


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from .compose import merge_into_model, merge_modules, read_fisher

    weights = _weights(args.weights)
    out = Path(args.out)
    _check_merge_out(out, args.load)
    if args.to == "full" and args.rank is not None:
        raise ValueError("--rank applies to --to lora (a full model has no rank)")
    cards = [read_card(d) for d in args.load]
    fisher_files = [read_fisher(d) for d in args.load] if args.method == "fisher" else None
    causal = any((card.get("head") or {}).get("task") == "causal-lm" for card in cards)
    mm = wrap(_base_model(args.base, "causal-lm" if causal else None))
    names: list[str] = []
    for i, (directory, card) in enumerate(zip(args.load, cards, strict=True)):
        name = card["name"] if card["name"] not in names else f"{card['name']}-{i + 1}"  # one folder twice
        names.append(mm.load(directory, name=name, check_base=not args.allow_other_weights))
    options: dict[str, Any] = dict(
        method=args.method,
        weights=weights,
        density=args.density,
        scale=args.scale,
        seed=args.seed,
        fishers=dict(zip(names, fisher_files, strict=True)) if fisher_files is not None else None,
        base_weight=args.base_weight,
    )
    result: dict[str, Any] = {"sources": names, "method": args.method, "to": args.to, "out": str(out)}
    if args.to == "full":
        try:
            tokenizer = _tokenizer(args.base)
        except ValueError:
            tokenizer = None  # a base folder without a tokenizer: the model alone
        merge_into_model(mm, names, out, tokenizer=tokenizer, **options)
        _say(args, f"merged {', '.join(names)} ({args.method}) into a full model: saved {out}")
        return result
    name = args.name or out.name
    merged = merge_modules(
        mm,
        names,
        name,
        to=args.to,
        rank=args.rank,
        head=None if args.head == "none" else args.head,
        **options,
    )
    mm.save(name, out)
    parameters = mm.trainable_parameters(name)
    _say(
        args,
        f"merged {', '.join(names)} ({args.method}, via {merged.route}) into '{name}' "
        f"({merged.method}, {parameters:,} parameters): saved {out}",
    )
    result.update(name=name, module_method=merged.method, route=merged.route, parameters=parameters)
    return result


def cmd_fisher(args: argparse.Namespace) -> dict[str, Any]:
    from .atomic import atomic_write_group
    from .compose import compute_fisher, save_fisher
    from .compose.fisher import module_digest
    from .persistence import CARD, WEIGHTS

    card = read_card(args.load)
    head = HeadConfig.from_dict(card["head"]) if card.get("head") else None
    if head is not None and args.task is not None and args.task != head.task:
        raise ValueError(f"--task {args.task}: the module's head is for {head.task}")
    task = head.task if head is not None else args.task
    if task is None:
        raise ValueError(f"{args.load}: the module has no head; name its task with --task causal-lm")
    out = Path(args.out) if args.out else Path(args.load)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    mm = wrap(_base_model(args.base, task))
    name = mm.load(args.load, check_base=not args.allow_other_weights)
    tokenizer = _tokenizer(args.base)
    examples = _read(args, args.data, task, require_labels=args.target == "label")
    if args.target == "sample" and task == "seq-cls":
        examples = [_unlabeled(ex) for ex in examples]  # y is drawn from the model: labels play no part
    labelled = all(getattr(ex, "tags", None) is not None for ex in examples)
    if args.target == "sample" and task == "token-cls" and not labelled:
        examples = [_unlabeled(ex) for ex in examples]  # without tags every real token is a prediction
    labels = head.labels if head is not None and head.labels else None
    features = _encode(
        args.data,
        examples,
        tokenizer,
        task,
        labels=labels,
        max_length=args.max_length,
        tasks=_model_tasks(mm, examples, "--data", [name]),
    )
    collate_fn = _collate_fn(task, tokenizer, args.seed)
    _say(args, f"computing the Fisher of '{name}' on {len(features)} examples (target: {args.target})")
    fisher = compute_fisher(
        mm, name, features, collate_fn=collate_fn, target=args.target, seed=args.seed, task=task
    )
    source = Path(args.load)
    if out.resolve() != source.resolve():  # a complete module folder, with its Fisher beside it

        def copier(path: Path) -> Any:
            return lambda tmp: Path(tmp).write_bytes(path.read_bytes())

        atomic_write_group([(out / WEIGHTS, copier(source / WEIGHTS)), (out / CARD, copier(source / CARD))])
    fisher.metadata.update(module_sha256=module_digest(out), data=str(args.data))
    path = save_fisher(fisher, out)
    _say(args, f"saved {path}")
    return {
        "module": name,
        "out": str(path),
        "examples": len(features),
        "target": args.target,
        "parts": {part: len(fisher.part(part)) for part in ("units", "deltas", "base")},
    }
