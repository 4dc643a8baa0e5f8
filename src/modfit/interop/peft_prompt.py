"""PEFT prompt tuning and prefix tuning <-> modfit `prompt` and `prefix`.

Both PEFT methods save one tensor, `prompt_embeddings` (no key prefix):

- prompt tuning: the n virtual token embeddings, (n · num_transformer_submodules, D). modfit's prompt
  sits in front of the input of the stack that embeds the tokens (the encoder of an encoder-decoder),
  which is PEFT's `num_transformer_submodules: 1`; a checkpoint with prompts for the decoder too (2) is
  refused by name.
- prefix tuning: the key/value table, (n, num_layers · 2 · token_dim), token_dim = key/value heads ×
  head_dim; for each virtual token layer 0's keys, layer 0's values, layer 1's keys, ... — modfit's
  plain prefix table, `embedding.weight`, in the same layout. With `prefix_projection` PEFT saves the
  table its MLP computed, not the MLP, so the checkpoint reads as a plain modfit prefix with identical
  outputs; a modfit prefix with the MLP is written the same way (its table, `prefix_projection: false`,
  which PEFT loads for inference and for further training alike).

Positions: on causal stacks (GPT-2, Llama-style) PEFT's prefix and modfit's are both cache entries in
front of the tokens, which then take positions n, n+1, ... On encoders (BERT family) PEFT's prefix is a
cache too and shifts the tokens' positions by n, while modfit keeps them at 0..L-1: the weights carry
over, the outputs differ, and reading or writing such a prefix warns. Encoder-decoder prefixes are
refused (PEFT gives the decoder's cross-attention prefixes too).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.prefix import PrefixConfig, PrefixStackUnit
from ..methods.prompt import PromptConfig, PromptUnit
from ..targets import ModelView
from .peft_common import Checkpoint, Export, reads, task_type, writes
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

KEY = "prompt_embeddings"
PROMPT_HANDLED = {
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
}
PREFIX_HANDLED = {
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "prefix_projection",
    "init_weights",
}
POSITIONS_WARNING = (
    "prefix on the encoder of a {model_type} model: PEFT shifts the real tokens to positions n..n+L-1, "
    "modfit keeps them at 0..L-1, so the same prefix gives other outputs here than in PEFT"
)


def _table(ckpt: Checkpoint) -> torch.Tensor:
    extra = sorted(set(ckpt.tensors) - {KEY})
    if extra:
        raise InteropError(f"{ckpt.key(extra[0])}: a {ckpt.config['peft_type']} checkpoint holds only {KEY}")
    if KEY not in ckpt.tensors:
        raise InteropError(f"{ckpt.weights_path}: {KEY} is missing")
    return ckpt.tensors[KEY]


def _single_stack(ckpt: Checkpoint, view: ModelView) -> None:
    submodules = ckpt.config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise InteropError(
            f"{ckpt.field('num_transformer_submodules')} is {submodules}: virtual tokens for the decoder too "
            "have no modfit equivalent (modfit's prompt goes to the encoder only)"
        )


@reads("PROMPT_TUNING")
def read_prompt(ckpt: Checkpoint, view: ModelView) -> Imported:
    """A PEFT prompt-tuning checkpoint as a modfit prompt module."""
    ckpt.check_fields(PROMPT_HANDLED)
    _single_stack(ckpt, view)
    n = ckpt.require("num_virtual_tokens", int)
    table = _table(ckpt)
    config = PromptConfig(num_virtual_tokens=n, init="random")
    (attachment,) = config.build(view)
    expected = tuple(cast(PromptUnit, attachment.unit).prompt_embeddings.shape)
    if tuple(table.shape) != expected:
        raise InteropError(
            f"{ckpt.key(KEY)}: shape {tuple(table.shape)}, expected {expected} "
            f"({ckpt.field('num_virtual_tokens')} × the model's embedding width)"
        )
    return Imported(config, {f"units.{attachment.path}.prompt_embeddings": table})


@reads("PREFIX_TUNING")
def read_prefix(ckpt: Checkpoint, view: ModelView) -> Imported:
    """A PEFT prefix-tuning checkpoint (with or without prefix_projection) as a plain modfit prefix."""
    ckpt.check_fields(PREFIX_HANDLED)
    _single_stack(ckpt, view)
    n = ckpt.require("num_virtual_tokens", int)
    table = _table(ckpt)
    config = PrefixConfig(num_virtual_tokens=n)
    stack = _stack(config, view, ckpt.config_path)
    expected = tuple(stack.unit.embedding.weight.shape)
    if tuple(table.shape) != expected:
        raise InteropError(
            f"{ckpt.key(KEY)}: shape {tuple(table.shape)}, expected {expected} (n × layers · 2 · key/value "
            f"width on this model; the config says num_layers={ckpt.config.get('num_layers')}, "
            f"token_dim={ckpt.config.get('token_dim')})"
        )
    if not stack.unit.causal:
        warnings.warn(POSITIONS_WARNING.format(model_type=view.model_type), stacklevel=3)
    return Imported(config, {f"units.{stack.path}.embedding.weight": table})


class _Stack:
    def __init__(self, path: str, unit: PrefixStackUnit) -> None:
        self.path, self.unit = path, unit


def _stack(config: PrefixConfig, view: ModelView, where: Any) -> _Stack:
    stacks = [_Stack(a.path, a.unit) for a in config.build(view) if isinstance(a.unit, PrefixStackUnit)]
    if len(stacks) != 1:
        raise InteropError(
            f"{where}: prefix tuning of an encoder-decoder ({view.model_type}) does not convert: PEFT's "
            "prefix covers the decoder's cross-attention too"
        )
    return stacks[0]


def _model_config(view: ModelView) -> Any:
    config = cast(Any, view.model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@writes("prompt")
def write_prompt(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit prompt module as PEFT prompt tuning (random init recorded: the values are the file's)."""
    view = mm.view
    ((_, unit),) = list(mm.units(name))
    table = cast(PromptUnit, unit).prompt_embeddings
    config = _model_config(view)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type(view, options),
        "num_virtual_tokens": int(table.shape[0]),
        "token_dim": int(table.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": int(config.num_attention_heads),
        "num_layers": int(config.num_hidden_layers),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }, {KEY: table}


@writes("prefix")
def write_prefix(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit prefix module as PEFT prefix tuning: the table (computed, with the MLP reparametrisation)."""
    view = mm.view
    config = cast(PrefixConfig, mm.records[name].config)
    if config.use_gating:
        raise InteropError(f"module '{name}': prefix.use_gating (a learned gate) has no PEFT equivalent")
    stacks = [(p, u) for p, u in mm.units(name) if isinstance(u, PrefixStackUnit)]
    if len(stacks) != 1:
        raise InteropError(
            f"module '{name}': prefix tuning of an encoder-decoder ({view.model_type}) has no PEFT form"
        )
    unit = stacks[0][1]
    if not unit.causal:
        warnings.warn(POSITIONS_WARNING.format(model_type=view.model_type), stacklevel=3)
    with torch.no_grad():
        table = unit.values().reshape(unit.n, -1)  # (n, layers · 2 · width)
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type(view, options),
        "num_virtual_tokens": unit.n,
        "token_dim": unit.width,
        "num_transformer_submodules": 1,
        "num_attention_heads": unit.heads,
        "num_layers": unit.layers,
        "encoder_hidden_size": unit.width,
        "prefix_projection": False,
    }, {KEY: table}
