"""adapters' prediction heads (`head_config.json` + `pytorch_model_head.bin` / `model_head.safetensors`)
<-> modfit's seq-cls and token-cls heads.

adapters builds a head as one `nn.Sequential` of `layers` blocks, each Dropout -> Linear (-> activation
between blocks), so its keys count the Dropout and activation slots too::

    classification, layers 2:  heads.<n>.1 = Linear(H, H), .2 = tanh, .4 = Linear(H, labels)
        on the first token (`use_pooler: false`): modfit's seq-cls head with pooling "first"
        (dense = .1, out = .4)
    tagging, layers 1:         heads.<n>.1 = Linear(H, labels): modfit's token-cls head (out = .1)

Labels come from `label2id` (in id order; `LABEL_<i>` without one). Refused by name: other head types,
`layers`, `activation_function`, `use_pooler: true`, `bias: false`; on export, seq-cls pooling other
than "first" and heads of other tasks (mlm, causal-lm).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..heads import HeadConfig
from ..targets import ModelView
from .adapters_common import Part, wrapper
from .registry import InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

# head_type -> (modfit task, layers, {adapters slot: modfit parameter prefix})
LAYOUTS = {
    "classification": ("seq-cls", 2, {"1": "dense", "4": "out"}),
    "tagging": ("token-cls", 1, {"1": "out"}),
}
KEY = re.compile(r"heads\.[^.]+\.(?P<slot>\d+)\.(?P<param>weight|bias)")
HANDLED = {
    "head_type",
    "num_labels",
    "layers",
    "activation_function",
    "label2id",
    "use_pooler",
    "bias",
    "dropout_prob",
}


def read_head(part: Part, view: ModelView) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """The head of an adapters folder as a modfit head config and its tensors (`head.<param>`)."""
    cfg = part.config
    head_type = cfg.get("head_type")
    if head_type not in LAYOUTS:
        raise InteropError(
            f"{part.field('head_type')} is {head_type!r}: modfit reads {', '.join(LAYOUTS)} heads"
        )
    task, layers, slots = LAYOUTS[head_type]
    unknown = sorted(set(cfg) - HANDLED)
    if unknown:
        raise InteropError(f"{part.field(unknown[0])} is {cfg[unknown[0]]!r}: modfit has no equivalent")
    for key, wanted in (("layers", layers), ("activation_function", "tanh")):
        if cfg.get(key, wanted) != wanted and not (key == "activation_function" and layers == 1):
            raise InteropError(f"{part.field(key)} is {cfg[key]!r}: a modfit {task} head has {wanted!r}")
    if cfg.get("use_pooler"):
        raise InteropError(
            f"{part.field('use_pooler')} is true: modfit's head reads the first token, not the pooler"
        )
    if cfg.get("bias", True) is not True:
        raise InteropError(f"{part.field('bias')} is {cfg['bias']!r}: modfit's head layers have biases")
    n = int(cfg.get("num_labels", 2))
    label2id = cfg.get("label2id") or {f"LABEL_{i}": i for i in range(n)}
    labels = [label for label, _ in sorted(label2id.items(), key=lambda item: int(item[1]))]
    if len(labels) != n:
        raise InteropError(f'{part.field("label2id")} has {len(labels)} labels, "num_labels" is {n}')
    dropout = cfg.get("dropout_prob")
    if dropout is None:
        dropout = getattr(view.base_model.config, "hidden_dropout_prob", None)
    dropout = 0.1 if dropout is None else dropout
    config = HeadConfig(task=task, labels=tuple(labels), pooling="first", dropout=float(dropout))
    tensors: dict[str, torch.Tensor] = {}
    for key, value in part.tensors.items():
        found = KEY.fullmatch(key)
        if found is None or found["slot"] not in slots:
            raise InteropError(f"{part.key(key)}: not a weight of a {head_type} head with {layers} layer(s)")
        tensors[f"head.{slots[found['slot']]}.{found['param']}"] = value
    return config, tensors


def head_files(mm: ModularModel, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(head_config.json, tensors under adapters' keys) for module `name`'s head; None without one."""
    record = mm.records[name]
    head = mm.head_module(name)
    if record.head is None or head is None:
        return None
    config = record.head
    layout = next(((t, ls) for t, (task, _, ls) in LAYOUTS.items() if task == config.task), None)
    if layout is None:
        raise InteropError(
            f"module '{name}': adapters has no head for modfit's {config.task} head (modfit exports seq-cls "
            "and token-cls); export without it (drop_head=True, `--drop-head`)"
        )
    head_type, slots = layout
    if config.task == "seq-cls" and config.pooling != "first":
        raise InteropError(
            f"module '{name}': head.pooling is {config.pooling!r}; adapters' classification head reads the "
            "first token (pooling 'first')"
        )
    state = head.state_dict(keep_vars=True)
    tensors = {
        f"heads.{name}.{slot}.{param}": state[f"{ours}.{param}"]
        for slot, ours in slots.items()
        for param in ("weight", "bias")
    }
    fields: dict[str, Any] = {
        "head_type": head_type,
        "num_labels": len(config.labels),
        "layers": LAYOUTS[head_type][1],
        "activation_function": "tanh",
        "label2id": {label: i for i, label in enumerate(config.labels)},
        "dropout_prob": config.dropout,
    }
    if head_type == "classification":
        fields.update(use_pooler=False, bias=True)
    return wrapper(mm.view, name, fields), tensors
