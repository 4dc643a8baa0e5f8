"""What each `modfit` subcommand does; `cli.py` only parses arguments.

Each `cmd_*` takes the parsed arguments, prints a human summary unless `--json` was given, and
returns a JSON-ready result (printed by the CLI under `--json`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import registry
from .base import load_base, load_tokenizer, resolve_base
from .batching import MlmCollator, collate, encode
from .composition import Composition, as_composition, operator_with_layers
from .data import DataError, TextExample, TokenExample, label_list, read_examples, task_list, with_task
from .heads import HeadConfig
from .model import ModularModel, wrap
from .persistence import read_card
from .vocabulary import active_tokenizer

LM_TASKS = ("mlm", "causal-lm")
# A base folder with a tokenizer holds at least one of these (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Output formats of `predict`, by the head's task; the --out extension picks one.
PREDICTION_SUFFIXES = {
    "seq-cls": (".jsonl", ".json", ".csv", ".tsv"),
    "token-cls": (".jsonl", ".json", ".conll"),
}


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not getattr(args, "json", False):
        for line in lines:
            print(line)


def _collate_fn(task: str, tokenizer: Any, seed: int = 0) -> Any:
    if task == "mlm":
        return MlmCollator(tokenizer, seed=seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda features: collate(features, pad_id)


def _base_error(base: str, what: str, error: Exception) -> ValueError:
    # transformers explains a missing folder as a failed download, over several lines: keep the first.
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if Path(resolve_base(base)).is_dir():
        return ValueError(f"--base {base}: cannot load the {what} from this folder: {first}")
    return ValueError(f"--base {base}: no such folder, and no model of that id could be loaded ({first})")


def _base_model(base: str, task: str | None) -> Any:
    try:
        return load_base(base, task)
    except (OSError, ValueError) as e:  # ValueError: transformers 4.57's invalid-repo-id error
        raise _base_error(base, "model", e) from None


def _tokenizer(base: str) -> Any:
    folder = Path(resolve_base(base))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the config alone: every word [UNK].
        raise ValueError(
            f"--base {base}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)}); "
            "save it there with tokenizer.save_pretrained(folder)"
        )
    try:
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError) as e:  # ValueError: transformers 4.57's invalid-repo-id error
        raise _base_error(base, "tokenizer", e) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models often ship without a pad token
    return tokenizer


def _load_modules(mm: ModularModel, args: argparse.Namespace) -> list[str]:
    return [mm.load(d, check_base=not args.allow_other_weights) for d in args.load]


def _activate(mm: ModularModel, names: list[str], compose: str | None, head: str | None = None) -> None:
    if compose:
        mm.activate(compose, head=head)
    elif names:
        mm.activate(names[0] if len(names) == 1 else f"stack({', '.join(names)})", head=head)


def _activate_loaded(mm: ModularModel, names: list[str], compose: str | None) -> None:
    """Activate for eval, predict and fusion-weights: `--compose`; without it the composition a loaded
    module was trained in (its card's), when that runs exactly the loaded modules (e.g. fuse(a, b)
    with the fusion module of a, b and its layers); else the loaded modules stacked in order."""
    if not compose:
        for name in reversed(names):
            recorded = mm.records[name].card.get("composition")
            if not recorded or not set(as_composition(recorded).names()) <= set(names):
                continue
            mm.activate(recorded)
            if set(mm.active_names()) == set(names):
                return
    _activate(mm, names, compose)


def _read(args: argparse.Namespace, path: str, task: str, require_labels: bool = True) -> list[Any]:
    return read_examples(
        path,
        task,
        fmt=args.format,
        text_column=args.text_column,
        label_column=args.label_column,
        require_labels=require_labels,
        task_column=getattr(args, "task_column", None),
    )


# -- multi-task data: `--task-column NAME`, or one file per task `--train TASK=FILE` ----------------

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _sources(values: Sequence[str], flag: str) -> list[tuple[str | None, str]]:
    """(task or None, path) of each `FILE` or `TASK=FILE` given to `flag` (an existing file whose
    name holds "=" stays a plain FILE).

    Raises:
        ValueError: a mix of FILE and TASK=FILE, a task named twice, or TASK= without a file.
    """
    out: list[tuple[str | None, str]] = []
    for value in values:
        task, sep, path = value.partition("=")
        if sep and _TASK_NAME.fullmatch(task) and not Path(value).exists():
            if not path:
                raise ValueError(f"{flag} {value!r}: no file after '=' (expected TASK=FILE)")
            out.append((task, path))
        else:
            out.append((None, value))
    named = [task for task, _ in out if task is not None]
    if named and len(named) != len(out):
        raise ValueError(f"{flag}: give every file as TASK=FILE (one file per task), or none")
    twice = sorted({t for t in named if named.count(t) > 1})
    if twice:
        raise ValueError(f"{flag}: task {twice[0]!r} is given more than one file")
    return out


Groups = list[tuple[str, list[Any]]]  # (path, examples) per data file


def _read_groups(
    args: argparse.Namespace, values: Sequence[str], flag: str, task: str, require_labels: bool = True
) -> tuple[Groups, list[str]]:
    """(path, examples) per file of `flag`, each example naming its task (TASK=FILE or --task-column),
    and the data's tasks: the TASK names in the order given, else the task column's values, sorted."""
    sources = _sources(values, flag)
    if sources[0][0] is not None and getattr(args, "task_column", None):
        raise ValueError(f"give the tasks with --task-column or as {flag} TASK=FILE, not both")
    groups: Groups = []
    for name, path in sources:
        examples = _read(args, path, task, require_labels)
        groups.append((path, with_task(examples, name) if name is not None else examples))
    named = [name for name, _ in sources if name is not None]
    return groups, named or task_list([ex for _, examples in groups for ex in examples])


def _config_tasks(config: Any, data_tasks: list[str], method: str) -> tuple[Any, list[str] | None]:
    """The config with its task list (a `tasks` field, e.g. poly's) filled from the data when empty, and
    the task names in id order for the batches' `task_ids` (None: the batches carry none).

    Raises:
        ValueError: the config names several tasks but the data names none.
    """
    if "tasks" not in {f.name for f in dataclasses.fields(config)}:
        return config, data_tasks or None  # ids for a composition that reads them; harmless otherwise
    declared = list(config.tasks)
    if not declared:
        return (config.replace(tasks=tuple(data_tasks)), data_tasks) if data_tasks else (config, None)
    if not data_tasks:
        if len(declared) > 1:
            raise ValueError(
                f"--method {method} has tasks ({', '.join(declared)}): name each example's task with "
                "--task-column NAME, or give one file per task as --train TASK=FILE"
            )
        return config, None
    return config, declared


def _model_tasks(
    mm: ModularModel, examples: list[Any], flag: str, names: list[str] | None = None
) -> list[str] | None:
    """Task names in id order for data run through modules `names` (default: the active ones): the
    `tasks` of the first that has some (None: the data's tasks are not needed).

    Raises:
        ValueError: a module has several tasks but the data names none.
    """
    for name in mm.active_names() if names is None else names:
        declared = list(getattr(mm.records[name].config, "tasks", None) or ())
        if not declared:
            continue
        if any(ex.task is not None for ex in examples):
            return declared
        if len(declared) > 1:
            raise ValueError(
                f"module '{name}' has tasks ({', '.join(declared)}): name each example's task with "
                f"--task-column NAME, or give the file as {flag} TASK=FILE"
            )
    return None


def _encode_groups(groups: Groups, tokenizer: Any, task: str, **options: Any) -> list[Any]:
    """`_encode` per file (so errors name the file), concatenated."""
    return [f for path, examples in groups for f in _encode(path, examples, tokenizer, task, **options)]


def _encode(path: str, examples: list[Any], tokenizer: Any, task: str, **options: Any) -> list[Any]:
    """`batching.encode`, with the data file named in errors about one example (an unknown label)."""
    try:
        return encode(examples, tokenizer, task, **options)
    except DataError as e:
        if e.path is not None:
            raise
        raise DataError(path, None, e.what) from None


# -- train -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import TrainSettings, evaluate, train

    task = args.task
    name = args.name or Path(args.out).name
    config = registry.config(args.method, **_children_from_compose(args, _params(args.param), name))
    _check_out(args)
    # A module that combines others (fusion layers) runs in the composition it was made for.
    made_for = getattr(config, "composition", None)
    compose = args.compose or (made_for() if callable(made_for) else None)
    if compose and not _runs_in(as_composition(compose), name, config):
        serves = f" ({made_for()})" if callable(made_for) else ""
        raise ValueError(f"--compose {compose!r} must include the module being trained, '{name}'{serves}")
    train_groups, data_tasks = _read_groups(args, args.train, "--train", task)
    eval_groups = _read_groups(args, args.eval, "--eval", task)[0] if args.eval else []
    train_examples = [ex for _, examples in train_groups for ex in examples]
    # Multi-task data: one head over the union of the tasks' labels, shared by every task (see README).
    labels = tuple(label_list(train_examples)) if task not in LM_TASKS else ()
    head = HeadConfig(task=task, labels=labels)
    config, tasks = _config_tasks(config, data_tasks, args.method)

    tokenizer = _tokenizer(args.base)
    mm = wrap(_base_model(args.base, task))
    mm.fast_dropout = not args.torch_dropout
    mm.fast_linear = not args.torch_linear
    loaded = _load_modules(mm, args)
    # --seed fixes the new module's and its head's initial weights too, not only the data order:
    # the same command twice gives the same module.
    torch.manual_seed(args.seed)
    mm.add(name, config, head, task=task, language=args.language)
    _activate(mm, [*loaded, name], compose, head=name)  # the new module's head, wherever it stands
    active = mm.active
    assert active is not None  # the new module is always among the names
    if len(active.names()) > 1:  # the card records what a module was trained on top of (None: alone)
        mm.records[name].card["composition"] = str(active)

    features = _encode_groups(
        train_groups, tokenizer, task, labels=labels, max_length=args.max_length, tasks=tasks
    )
    eval_features = (
        _encode_groups(
            eval_groups,
            tokenizer,
            task,
            labels=labels,
            max_length=args.max_length,
            keep_word_ids=True,
            tasks=tasks,
        )
        if eval_groups
        else None
    )
    default_lr = 5e-4 if task == "mlm" else 1e-3
    settings = TrainSettings(
        epochs=args.epochs if args.epochs is not None or args.steps is not None else 3.0,
        steps=args.steps,
        lr=args.lr if args.lr is not None else (config.default_lr or default_lr),
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile or False,
        seed=args.seed,
        checkpoint_dir=str(_checkpoint_dir(args)) if args.checkpoint_every else None,
        checkpoint_every=args.checkpoint_every,
        resume=bool(args.checkpoint_every) and not args.no_resume,
        progress=not args.json,
    )
    _say(
        args,
        f"training '{name}' ({args.method}, {mm.trainable_parameters(name):,} parameters) on "
        f"{len(features)} examples; composition {mm.active}",
    )
    collate_fn = _collate_fn(task, tokenizer, args.seed)
    result = train(mm, name, features, collate_fn=collate_fn, settings=settings, eval_features=eval_features)
    if result.resumed_from is not None:
        _say(args, f"resumed from the checkpoint of step {result.resumed_from} in {_checkpoint_dir(args)}")
    metrics: dict[str, float] = {}
    if eval_features:
        eval_collate = _collate_fn(task, tokenizer, seed=args.seed + 1)
        metrics = evaluate(mm, eval_features, collate_fn=eval_collate, batch_size=args.batch_size)
    out = mm.save(name, args.out, metrics=metrics)
    _say(
        args,
        _metrics_line("eval", metrics) if metrics else "no --eval file: no held-out metrics",
        f"saved {out}",
    )
    return {
        "name": name,
        "out": str(out),
        "method": args.method,
        "parameters": mm.trainable_parameters(name),
        "composition": str(mm.active),
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "metrics": metrics,
    }


def _children_from_compose(args: argparse.Namespace, params: dict[str, Any], name: str) -> dict[str, Any]:
    """`params`, with `children` taken from the one operator of --compose that a module of this method
    serves (fuse(...) for fusion layers, moe(...) for a router) when --param names none.

    An operator naming another module for its layers (`fuse(..., fusion=NAME)`) is served by that one.
    """
    fields = {f.name for f in dataclasses.fields(registry.method_entry(args.method).config_class)}
    if "children" not in fields or "children" in params:
        return params
    operator = operator_with_layers(args.method)
    op = operator.op if operator is not None else "fuse"
    if not args.compose:
        raise ValueError(
            f"--method {args.method} combines other modules: name them with --compose, e.g. "
            f"--compose '{op}(a, b)' (loading a and b with --load), or with --param children=a,b"
        )
    served = [
        node
        for node in as_composition(args.compose).walk()
        if node.layers_method == args.method and node.layers_name() in (None, name)
    ]
    if not served:
        raise ValueError(
            f"--method {args.method}: --compose {args.compose!r} has no {op}(...) for '{name}' to serve; "
            f"e.g. --compose '{op}(a, b)'"
        )
    if len(served) > 1:
        option = operator.layers_option if operator is not None else "fusion"
        raise ValueError(
            f"--method {args.method}: --compose {args.compose!r} has {len(served)} {op}(...); mark the one "
            f"'{name}' serves with {op}(..., {option}={name}), or name its modules with --param children=..."
        )
    return {**params, "children": [str(child) for child in served[0].children]}


def _runs_in(expr: Composition, name: str, config: Any) -> bool:
    """Whether `expr` runs module `name`: it names it, or (fusion layers, a router) holds the operator
    the config was made for, not given to another module of that method by name."""
    if name in expr.names():
        return True
    made_for = getattr(config, "composition", None)
    if not callable(made_for):
        return False
    target = as_composition(made_for())
    return any(
        node.layers_method == config.method
        and node.children == target.children
        and node.layers_name() in (None, name)
        for node in expr.walk()
    )


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "checkpoints"


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot hold the module, before anything is trained."""
    from .train import latest_checkpoint

    path = Path(args.out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    for directory in args.load:
        if path.resolve() == Path(directory).resolve():
            raise ValueError(
                f"--out {args.out} is the folder of a --load module; saving there would overwrite it"
            )
    latest = latest_checkpoint(_checkpoint_dir(args)) if args.checkpoint_every and args.no_resume else None
    if latest is not None:
        raise ValueError(
            f"{_checkpoint_dir(args)} holds checkpoints of an earlier run (latest: {latest.name}); "
            "drop --no-resume to continue that run, or remove them"
        )


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
    mm = wrap(_base_model(args.base, tasks[-1]))
    mm.fast_linear = not args.torch_linear
    names = _load_modules(mm, args)
    _activate_loaded(mm, names, args.compose)
    if mm.head_name is None:
        raise ValueError(f"no module in the composition {mm.active} has a task head")
    head = mm.records[mm.head_name].head
    assert head is not None
    return mm, active_tokenizer(mm, _tokenizer(args.base)), head


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .train import evaluate

    mm, tokenizer, head = _setup_loaded(args)
    groups, _ = _read_groups(args, [args.data], "--data", head.task)
    features = _encode_groups(
        groups,
        tokenizer,
        head.task,
        labels=head.labels or None,
        max_length=args.max_length,
        keep_word_ids=True,
        tasks=_model_tasks(mm, groups[0][1], "--data"),
    )
    metrics = evaluate(mm, features, collate_fn=_collate_fn(head.task, tokenizer), batch_size=args.batch_size)
    _say(
        args,
        f"{args.data} ({len(features)} examples, composition {mm.active})",
        _metrics_line("eval", metrics),
    )
    return {"data": args.data, "composition": str(mm.active), "examples": len(features), "metrics": metrics}


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from .atomic import write_text
    from .train import predict

    mm, tokenizer, head = _setup_loaded(args)
    if head.task not in PREDICTION_SUFFIXES:
        raise ValueError(f"predict supports seq-cls and token-cls heads; the active head is {head.task}")
    suffixes = PREDICTION_SUFFIXES[head.task]
    if Path(args.out).suffix.lower() not in suffixes:
        raise ValueError(f"--out {args.out}: {head.task} predictions are written as {', '.join(suffixes)}")
    # Gold labels in the file (if any) play no part: drop them, so unknown ones are no error either.
    groups, _ = _read_groups(args, [args.data], "--data", head.task, require_labels=False)
    examples: list[Any] = [_unlabeled(ex) for ex in groups[0][1]]
    features = _encode(
        groups[0][0],
        examples,
        tokenizer,
        head.task,
        labels=None,
        max_length=args.max_length,
        keep_word_ids=True,
        tasks=_model_tasks(mm, examples, "--data"),
    )
    predictions = predict(
        mm, features, collate_fn=_collate_fn(head.task, tokenizer), batch_size=args.batch_size
    )
    if head.task == "token-cls":
        predictions = _fill_truncated(examples, predictions, args.max_length)
    write_text(args.out, _format_predictions(Path(args.out), examples, predictions))
    print(f"wrote {len(predictions)} predictions to {args.out}")
    return {"out": args.out, "count": len(predictions)}


def _unlabeled(example: TextExample | TokenExample) -> TextExample | TokenExample:
    if isinstance(example, TokenExample):
        return dataclasses.replace(example, tags=None)
    return dataclasses.replace(example, label=None)


def _fill_truncated(examples: list[TokenExample], tags: list[list[str]], max_length: int) -> list[list[str]]:
    """Tag words cut off by --max-length "O", so every input token gets an output line; say so."""
    filled = [row + ["O"] * (len(ex.tokens) - len(row)) for ex, row in zip(examples, tags, strict=True)]
    cut = sum(len(row) < len(ex.tokens) for ex, row in zip(examples, tags, strict=True))
    if cut:
        print(
            f"modfit: {cut} sentence(s) longer than --max-length {max_length} tokens: "
            "their last words are tagged O without a prediction",
            file=sys.stderr,
        )
    return filled


def _format_predictions(path: Path, examples: list[Any], predictions: list[Any]) -> str:
    suffix = path.suffix.lower()
    rows = list(zip(examples, predictions, strict=True))
    if examples and isinstance(examples[0], TokenExample):
        if suffix in (".jsonl", ".json"):
            return "".join(json.dumps({"tokens": list(ex.tokens), "tags": tags}) + "\n" for ex, tags in rows)
        sentences = [
            "\n".join(f"{tok} {tag}" for tok, tag in zip(ex.tokens, tags, strict=True)) for ex, tags in rows
        ]
        return "\n\n".join(sentences) + "\n"
    if suffix in (".csv", ".tsv"):
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
        writer.writerow(["text", "prediction"])
        writer.writerows([ex.text, label] for ex, label in rows)
        return buffer.getvalue()
    return "".join(json.dumps({"text": ex.text, "prediction": label}) + "\n" for ex, label in rows)


# -- info / methods / count --------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    card = read_card(args.dir)
    head = card.get("head") or {}
    base = card.get("base") or {}
    fingerprint = base.get("fingerprint") or {}
    _say(
        args,
        f"module     {card['name']}  ({card['method']}, {card.get('parameters', 0):,} parameters)",
        f"task       {card.get('task') or '-'}   language {card.get('language') or '-'}",
        f"labels     {', '.join(head.get('labels', [])) or '-'}",
        f"base       {base.get('name_or_path') or '-'}  ({fingerprint.get('model_type', '?')})",
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
    try:
        model_config = AutoConfig.from_pretrained(resolve_base(args.base))
    except (OSError, ValueError) as e:  # ValueError: transformers 4.57's invalid-repo-id error
        raise _base_error(args.base, "model config", e) from None
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
