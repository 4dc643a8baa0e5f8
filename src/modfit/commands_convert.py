"""`modfit convert`: move a module between modfit's folder format and another library's (PEFT, or
AdapterHub adapters).

    modfit convert --from peft|adapters ADAPTER_DIR --out MODULE_DIR [--base B] [--name N]
    modfit convert --to peft|adapters MODULE_DIR --out ADAPTER_DIR [--base B] [--task causal-lm] [--drop-head]

The base is loaded because PEFT's and adapters' files name modules of a model, not modfit sites:
reading maps the names onto the base, writing names the modules of the model class the adapter will
be loaded into (`--task`: the bare model, or one with a causal-LM, sequence- or token-classification head; by
default the module's own head decides: causal-lm, else the bare model). Both directions write
atomically (all files of the output folder, or none); errors name the file and the key or field.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# --task -> the transformers Auto class whose module names the PEFT keys use
TASK_CLASSES = {
    "bare": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
}


def add_parser(sub: Any) -> None:
    """Add the `convert` subcommand to the CLI's subparsers (it sets `handler=cmd_convert`)."""
    p = sub.add_parser(
        "convert", help="convert a module from or to another library's format (peft, adapters)"
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from",
        dest="from_format",
        metavar="FORMAT",
        help="DIR is in FORMAT (peft, adapters); write a modfit module",
    )
    direction.add_argument(
        "--to",
        dest="to_format",
        metavar="FORMAT",
        help="DIR is a modfit module; write it in FORMAT (peft, adapters)",
    )
    p.add_argument("dir", metavar="DIR", help="the folder to convert")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument(
        "--base", default="default", help="the base model: 'default' (packaged MiniLM), a HF id or a folder"
    )
    p.add_argument("--name", help="--from: the module's name (default: the --out folder's name)")
    p.add_argument(
        "--task",
        choices=sorted(TASK_CLASSES),
        help="--to: the model class the adapter is for (default: causal-lm for a causal-lm head, else bare)",
    )
    p.add_argument(
        "--drop-head", action="store_true", help="--to: export a module whose head the format cannot hold"
    )
    p.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="--to: the module was trained on a base with the same architecture but other weights",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_convert)


def _load_base(base: str, task: str) -> Any:
    import transformers

    from .base import resolve_base
    from .commands import _base_error

    loader = getattr(transformers, TASK_CLASSES[task])
    try:
        return loader.from_pretrained(resolve_base(base))
    except (OSError, ValueError) as e:
        raise _base_error(base, "model", e) from None


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Convert DIR to --out; returns what was written (formats, folders, module name, method)."""
    from .commands import _say
    from .interop import default_name, format_named, load_external
    from .model import wrap
    from .persistence import read_card

    source, out = Path(args.dir), Path(args.out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out}: the same folder as {source}; write the conversion elsewhere")
    if args.from_format is not None:
        fmt = format_named(args.from_format)
        if not fmt.detect(source):
            raise ValueError(f"{source}: not a {fmt.name} checkpoint folder")
        mm = wrap(_load_base(args.base, "bare"))
        name = load_external(mm, source, name=args.name or default_name(out), format=fmt.name)
        mm.save(name, out)
        direction = {"from": fmt.name, "to": "modfit"}
    else:
        fmt = format_named(args.to_format)
        card = read_card(source)
        head_task = (card.get("head") or {}).get("task")
        task = args.task or ("causal-lm" if head_task == "causal-lm" else "bare")
        mm = wrap(_load_base(args.base, task))
        name = mm.load(source, check_base=not args.allow_other_weights)
        fmt.write(mm, name, out, drop_head=args.drop_head)
        direction = {"from": "modfit", "to": fmt.name}
    record = mm.records[name]
    result = {
        **direction,
        "dir": str(source),
        "out": str(out),
        "name": name,
        "method": record.config.method,
        "parameters": mm.trainable_parameters(name),
    }
    _say(
        args,
        f"converted {source} ({direction['from']}) -> {out} ({direction['to']}): module '{name}', "
        f"{record.config.method}, {result['parameters']:,} parameters",
    )
    return result
