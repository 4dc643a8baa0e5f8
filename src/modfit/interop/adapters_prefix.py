"""adapters' prefix tuning (`architecture: "prefix_tuning"`, flat or with its MLP) <-> modfit `prefix`;
adapters' prompt tuning, refused with the reason.

Prefix tuning: both put n virtual keys and values in front of every self-attention, read from one
table of n rows of width L·2·H (L layers, key and value, H = heads × head size), laid out as
(n, L·2, heads, head size). adapters stores the table flat (`flat: true`: `control_trans`, (n·L·2·H,))
or computes it as `control_trans(wte)`: Linear(H, bottleneck) -> tanh -> Linear(bottleneck, L·2·H);
modfit's `prefix` holds the same as `embedding` (n, L·2·H) or `embedding` (n, H) -> `transform`
(prefix_projection, encoder_hidden_size = bottleneck_size)::

    prefix_tuning.prefix_tunings.<n>.self_prefix.control_trans            (flat)
    prefix_tuning.prefix_tunings.<n>.self_prefix.wte.weight               (n, H)
    prefix_tuning.prefix_tunings.<n>.self_prefix.control_trans.0/2.*      the MLP

adapters also saves the pool again under every layer (`...attention.self.prefix_tuning.pool...`);
those copies are the same tensors and are skipped. Refused by name: `leave_out`, `use_gating` (adapters'
prefix gates are not modfit's), a non-tanh `non_linearity`, `dropout` (modfit's prefix has none) and
cross-attention prefixes (`cross_prefix` keys, encoder-decoder models).

Prompt tuning does not convert: adapters inserts the prompt *after* the embedding layer (after the
position embeddings and the embedding LayerNorm) and keeps the real tokens at positions 0..L-1; modfit
(as PEFT) puts it in front of the word embeddings, so the prompt passes through the embedding
LayerNorm and the tokens move to positions n..n+L-1. The same prompt weights compute something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.prefix import PrefixConfig, PrefixStackUnit
from ..targets import ModelView
from .adapters_common import Export, Part, reads, require_layout, writes
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

HANDLED = {
    "encoder_prefix",
    "cross_prefix",  # set by default; only encoder-decoder models have cross-attention prefixes
    "flat",
    "prefix_length",
    "bottleneck_size",
    "non_linearity",
    "shared_gating",  # read with use_gating
    "init_weights_seed",
}
PROMPT_REASON = (
    "adapters inserts the prompt after the embedding layer (after position embeddings and LayerNorm) and "
    "keeps the tokens at positions 0..L-1; modfit, as PEFT, prepends it to the word embeddings, so the same "
    "weights compute something else"
)


def _stack_path(config: PrefixConfig, view: ModelView) -> str:
    paths = [a.path for a in config.build(view) if isinstance(a.unit, PrefixStackUnit)]
    if len(paths) != 1:
        raise InteropError(
            f"prefix: adapters' self_prefix has one table; this {view.model_type} model has {len(paths)}"
        )
    return paths[0]


@reads("prefix_tuning")
def read_prefix(part: Part, view: ModelView) -> Imported:
    """An adapters prefix-tuning adapter as a modfit prefix module."""
    require_layout(view, str(part.config_path))
    part.check_fields(HANDLED)
    cfg = part.config
    if cfg.get("non_linearity", "tanh") != "tanh":
        raise InteropError(
            f"{part.field('non_linearity')} is {cfg['non_linearity']!r}: modfit's prefix MLP uses tanh"
        )
    flat = bool(cfg.get("flat"))
    n = int(cfg.get("prefix_length", 30))
    config = PrefixConfig(
        num_virtual_tokens=n,
        prefix_projection=not flat,
        encoder_hidden_size=None if flat else int(cfg.get("bottleneck_size", 512)),
    )
    stack = _stack_path(config, view)
    names = {
        k.split(".prefix_tunings.", 1)[1].split(".", 1)[0] for k in part.tensors if ".prefix_tunings." in k
    }
    if len(names) != 1:
        raise InteropError(
            f"{part.weights_path}: expected the prefix of one adapter, found {sorted(names) or 'none'}"
        )
    name = names.pop()
    theirs = (
        {"control_trans": "embedding.weight"}
        if flat
        else {
            "wte.weight": "embedding.weight",
            **{f"control_trans.{i}.{p}": f"transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
        }
    )
    marker = f"prefix_tuning.prefix_tunings.{name}.self_prefix."
    tensors: dict[str, torch.Tensor] = {}
    for key, value in part.tensors.items():
        if ".pool.prefix_tunings." in key:
            continue  # the per-layer copy of the same pool
        _, _, slot = key.partition(marker)
        if slot not in theirs:
            raise InteropError(f"{part.key(key)}: not a self-attention prefix weight modfit reads")
        tensors[f"units.{stack}.{theirs[slot]}"] = value.reshape(n, -1) if flat else value
    return Imported(config, tensors, name=name)


@reads("prompt_tuning")
def read_prompt(part: Part, view: ModelView) -> Imported:
    raise InteropError(f'{part.field("architecture")} is "prompt_tuning": does not convert: {PROMPT_REASON}')


@writes("prompt")
def write_prompt(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    raise InteropError(f"module '{name}': a modfit prompt has no adapters equivalent: {PROMPT_REASON}")


@writes("prefix")
def write_prefix(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit prefix module as an adapters prefix-tuning adapter."""
    view = mm.view
    require_layout(view, f"module '{name}'")
    config = cast(PrefixConfig, mm.records[name].config)
    if config.use_gating:
        raise InteropError(f"module '{name}': prefix.use_gating has no adapters equivalent")
    units = dict(mm.units(name))
    stack = cast(PrefixStackUnit, units[_stack_path(config, view)])
    base = f"prefix_tuning.prefix_tunings.{name}.self_prefix."
    if stack.transform is None:
        tensors = {base + "control_trans": stack.embedding.weight.reshape(-1)}
    else:
        tensors = {base + "wte.weight": stack.embedding.weight}
        tensors.update(
            {base + f"control_trans.{k}": v for k, v in stack.transform.state_dict(keep_vars=True).items()}
        )
    inner = config.encoder_hidden_size or view.hidden_size
    return {
        "architecture": "prefix_tuning",
        "encoder_prefix": True,
        "cross_prefix": True,
        "leave_out": [],
        "flat": stack.transform is None,
        "prefix_length": config.num_virtual_tokens,
        "bottleneck_size": inner if config.prefix_projection else 512,
        "non_linearity": "tanh",
        "dropout": 0.0,
        "use_gating": False,
        "shared_gating": True,
        "init_weights_seed": None,
    }, tensors
