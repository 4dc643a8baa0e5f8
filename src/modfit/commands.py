"""What each `modfit` subcommand does; `cli.py` only parses arguments.

Each `cmd_*` takes the parsed arguments, prints a human summary unless `--json` was given, and
returns a JSON-ready result (printed by the CLI under `--json`).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import registry
from .base import load_base, load_tokenizer, resolve_base
from .batching import MlmCollator, collate, encode
from .data import TextExample, TokenExample, label_list, read_examples
from .heads import HeadConfig
from .model import ModularModel, wrap
from .persistence import read_card

LM_TASKS = ("mlm", "causal-lm")


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not getattr(args, "json", False):
        for line in lines:
            print(line)


def _collate_fn(task: str, tokenizer: Any, seed: int = 0) -> Any:
    if task == "mlm":
        return MlmCollator(tokenizer, seed=seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda features: collate(features, pad_id)


def _tokenizer(base: str) -> Any:
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models often ship without a pad token
    return tokenizer


def _load_modules(mm: ModularModel, dirs: Sequence[str]) -> list[str]:
    return [mm.load(d) for d in dirs]


def _activate(mm: ModularModel, names: list[str], compose: str | None) -> None:
    if compose:
        mm.activate(compose)
    elif names:
        mm.activate(names[0] if len(names) == 1 else f"stack({', '.join(names)})")


def _read(args: argparse.Namespace, path: str, task: str, require_labels: bool = True) -> list[Any]:
    return read_examples(
        path,
        task,
        fmt=args.format,
        text_column=args.text_column,
        label_column=args.label_column,
        require_labels=require_labels,
    )


# -- train -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import TrainSettings, evaluate, train

    task = args.task
    config = registry.config(args.method, **_params(args.param))
    name = args.name or Path(args.out).name
    train_examples = _read(args, args.train, task)
    eval_examples = _read(args, args.eval, task) if args.eval else None
    labels = tuple(label_list(train_examples)) if task not in LM_TASKS else ()
    head = HeadConfig(task=task, labels=labels)

    tokenizer = _tokenizer(args.base)
    mm = wrap(load_base(args.base, task))
    loaded = _load_modules(mm, args.load)
    mm.add(name, config, head, task=task, language=args.language)
    _activate(mm, [*loaded, name], args.compose)

    features = encode(train_examples, tokenizer, task, labels=labels, max_length=args.max_length)
    eval_features = (
        encode(eval_examples, tokenizer, task, labels=labels, max_length=args.max_length, keep_word_ids=True)
        if eval_examples
        else None
    )
    default_lr = 5e-4 if task == "mlm" else 1e-3
    settings = TrainSettings(
        epochs=args.epochs if args.epochs is not None or args.steps is not None else 3.0,
        steps=args.steps,
        lr=args.lr or default_lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        checkpoint_dir=str(Path(args.out) / "checkpoints") if args.checkpoint_every else None,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        progress=not args.json,
    )
    _say(
        args,
        f"training '{name}' ({args.method}, {mm.trainable_parameters(name):,} parameters) on "
        f"{len(features)} examples; composition {mm.active}",
    )
    collate_fn = _collate_fn(task, tokenizer, args.seed)
    result = train(mm, name, features, collate_fn=collate_fn, settings=settings, eval_features=eval_features)
    metrics: dict[str, float] = {}
    if eval_features:
        eval_collate = _collate_fn(task, tokenizer, seed=args.seed + 1)
        metrics = evaluate(mm, eval_features, collate_fn=eval_collate, batch_size=args.batch_size)
    out = mm.save(name, args.out, metrics=metrics)
    _say(args, _metrics_line("eval", metrics) if metrics else "no --eval file: no held-out metrics", f"saved {out}")
    return {
        "name": name,
        "out": str(out),
        "method": args.method,
        "parameters": mm.trainable_parameters(name),
        "steps": result.steps,
        "metrics": metrics,
    }


def _params(items: Sequence[str]) -> dict[str, str]:
    from .cli import parse_params

    return parse_params(items)


def _metrics_line(prefix: str, metrics: dict[str, float]) -> str:
    return f"{prefix}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# -- eval / predict ----------------------------------------------------------------------------


def _setup_loaded(args: argparse.Namespace) -> tuple[ModularModel, Any, HeadConfig]:
    """Load the base and the modules of `--load`, activate, and return the active head."""
    if not args.load:
        raise ValueError("name at least one trained module with --load DIR")
    cards = [read_card(d) for d in args.load]
    tasks = [c["head"]["task"] for c in cards if c.get("head")]
    if not tasks:
        raise ValueError("none of the --load modules has a task head; nothing to evaluate or predict with")
    mm = wrap(load_base(args.base, tasks[-1]))
    names = _load_modules(mm, args.load)
    _activate(mm, names, args.compose)
    if mm.head_name is None:
        raise ValueError(f"no module in the composition {mm.active} has a task head")
    head = mm.records[mm.head_name].head
    assert head is not None
    return mm, _tokenizer(args.base), head


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .train import evaluate

    mm, tokenizer, head = _setup_loaded(args)
    examples = _read(args, args.data, head.task)
    features = encode(
        examples, tokenizer, head.task, labels=head.labels or None, max_length=args.max_length, keep_word_ids=True
    )
    metrics = evaluate(mm, features, collate_fn=_collate_fn(head.task, tokenizer), batch_size=args.batch_size)
    _say(args, f"{args.data} ({len(features)} examples, composition {mm.active})", _metrics_line("eval", metrics))
    return {"data": args.data, "composition": str(mm.active), "examples": len(features), "metrics": metrics}


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from .atomic import write_text
    from .train import predict

    mm, tokenizer, head = _setup_loaded(args)
    if head.task in LM_TASKS:
        raise ValueError(f"predict supports seq-cls and token-cls heads; the active head is {head.task}")
    examples = _read(args, args.data, head.task, require_labels=False)
    features = encode(examples, tokenizer, head.task, labels=None, max_length=args.max_length, keep_word_ids=True)
    predictions = predict(mm, features, collate_fn=_collate_fn(head.task, tokenizer), batch_size=args.batch_size)
    write_text(args.out, _format_predictions(Path(args.out), examples, predictions))
    print(f"wrote {len(predictions)} predictions to {args.out}")
    return {"out": args.out, "count": len(predictions)}


def _format_predictions(path: Path, examples: list[Any], predictions: list[Any]) -> str:
    suffix = path.suffix.lower()
    if isinstance(examples[0], TokenExample) if examples else False:
        if suffix in (".jsonl", ".json"):
            rows = [json.dumps({"tokens": list(ex.tokens), "tags": tags}) for ex, tags in zip(examples, predictions)]
            return "\n".join(rows) + "\n"
        sentences = ["\n".join(f"{tok} {tag}" for tok, tag in zip(ex.tokens, tags)) for ex, tags in zip(examples, predictions)]
        return "\n\n".join(sentences) + "\n"
    text_examples: list[TextExample] = examples
    if suffix in (".csv", ".tsv"):
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
        writer.writerow(["text", "prediction"])
        writer.writerows([ex.text, label] for ex, label in zip(text_examples, predictions))
        return buffer.getvalue()
    return "".join(json.dumps({"text": ex.text, "prediction": p}) + "\n" for ex, p in zip(text_examples, predictions))


# -- info / methods / count --------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    card = read_card(args.dir)
    head = card.get("head") or {}
    base = card.get("base") or {}
    _say(
        args,
        f"module     {card['name']}  ({card['method']}, {card.get('parameters', 0):,} parameters)",
        f"task       {card.get('task') or '-'}   language {card.get('language') or '-'}",
        f"labels     {', '.join(head.get('labels', [])) or '-'}",
        f"base       {base.get('name_or_path') or '-'}  ({(base.get('fingerprint') or {}).get('model_type', '?')})",
        f"config     {json.dumps(card['config'])}",
        f"metrics    {json.dumps(card.get('metrics') or {})}",
        f"modfit     {card.get('modfit_version')}   saved {card.get('saved_at', '?')}",
    )
    return card


def cmd_methods(args: argparse.Namespace) -> dict[str, str]:
    summaries = registry.method_summaries()
    width = max(len(n) for n in summaries)
    _say(args, *(f"{name.ljust(width)}  {text}" for name, text in summaries.items()))
    return summaries


def cmd_count(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModel

    config = registry.config(args.method, **_params(args.param))
    model_config = AutoConfig.from_pretrained(resolve_base(args.base))
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModel.from_config(model_config)
    mm = wrap(model)
    mm.add("count", config)
    module = mm.trainable_parameters("count")
    base = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("modfit."))
    result = {
        "method": args.method,
        "config": config.to_dict(),
        "module_parameters": module,
        "base_parameters": base,
        "total_parameters": base + module,
        "percent": 100.0 * module / (base + module),
    }
    _say(
        args,
        f"{args.method}: {module:,} module parameters; base {base:,}; total {base + module:,} "
        f"({result['percent']:.4f}% trainable)",
    )
    return result


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, seed=args.seed)
