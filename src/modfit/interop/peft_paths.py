"""PEFT's module names, and its rules for picking modules, as modfit needs them for conversion.

A PEFT state-dict key is `base_model.model.<module name>.<param>`, the module name taken inside the
model PEFT wrapped: `encoder.layer.0.attention.self.query` for a `BertModel`, `bert.encoder...` for a
`BertForSequenceClassification`, `model.layers.0.self_attn.q_proj` for a `LlamaForCausalLM`. modfit's
site paths are relative to `base_model`, so reading tries the name without the model's own prefix,
as it is, and without the family's `base_model_prefix` (an adapter trained on the bare model loads into
the model with a head and back). Writing uses the names inside the wrapped model (`view.prefix + site`),
what PEFT itself writes for that class.

The matching rules below restate PEFT's documented behaviour (`target_modules` as a list of name
suffixes or one regular expression matched in full, `layers_to_transform` with `layers_pattern`,
`exclude_modules`, the `rank_pattern`/`alpha_pattern` lookup, IA3's `feedforward_modules`), so that an
exported config can be checked to select exactly the modules it must, before it is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..targets import ModelView
from .registry import InteropError

KEY_PREFIX = "base_model.model."


def module_names(view: ModelView) -> list[str]:
    """Every module name of the wrapped model, as PEFT sees it (modfit's own container left out)."""
    own = getattr(view.model, "modfit", None)
    own_ids = {id(m) for m in own.modules()} if isinstance(own, nn.Module) else set()
    return [n for n, m in view.model.named_modules() if n and id(m) not in own_ids]


def peft_name(view: ModelView, site: str) -> str:
    """The PEFT module name of a modfit site (relative to base_model)."""
    return view.prefix + site


def site_for(view: ModelView, name: str, where: str) -> str:
    """The modfit site path (relative to base_model) of PEFT module `name`.

    Raises:
        InteropError: no module of that name on this model (`where` names the file and key).
    """
    candidates = []
    if view.prefix and name.startswith(view.prefix):
        candidates.append(name[len(view.prefix) :])
    candidates.append(name)
    family_prefix = getattr(view.model, "base_model_prefix", "") or ""
    if family_prefix and name.startswith(family_prefix + "."):
        candidates.append(name[len(family_prefix) + 1 :])
    for path in candidates:
        try:
            view.base_model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise InteropError(f"{where}: module '{name}' does not exist on this {view.model_type} model")


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index PEFT reads from a module name: the number after the first `<part>.` (or after
    one of `layers_pattern`), e.g. 3 in `model.layers.3.self_attn.q_proj`."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(found["idx"]) if found else None
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if found:
            return int(found["idx"])
    return None


def is_target(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT's `target_modules` / `layers_to_transform` / `exclude_modules` pick module `name`."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not targets:
        return False
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(name, config.get("layers_pattern"))
    wanted = [layers] if isinstance(layers, int) else list(layers)
    return index is not None and index in wanted


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first `rank_pattern` / `alpha_pattern` key that matches the end of module `name`, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def is_feedforward(feedforward: str | Sequence[str] | None, name: str) -> bool:
    """IA3: whether `feedforward_modules` marks module `name` (a plain `endswith`, no dot, as PEFT's)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(f) for f in feedforward or [])


def _regex(names: Sequence[str]) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def target_config(
    view: ModelView,
    sites: Sequence[str],
    feedforward: Sequence[str] | None = None,
    *,
    use_layers: bool = True,
) -> dict[str, Any]:
    """PEFT config fields that select exactly `sites` (and, for IA3, mark exactly `feedforward`).

    Tries short name suffixes (last one, two, three components), with `layers_to_transform` when the
    sites sit in some layers only, and checks each candidate with PEFT's rules against every module
    of the model; falls back to a regular expression of the exact names.

    Args:
        feedforward: IA3's input-scaled subset of `sites`.
        use_layers: whether the config has `layers_to_transform` (LoRA's has, IA3's has not).

    Returns:
        {"target_modules"} (+ "layers_to_transform" with `use_layers`, "feedforward_modules" with
        `feedforward`).
    """
    names = [peft_name(view, s) for s in sites]
    wanted, all_names = set(names), module_names(view)
    ff_wanted = {peft_name(view, s) for s in feedforward or []}
    indices = sorted({i for i in (layer_index(n, None) for n in names) if i is not None})
    every = sorted({i for i in (layer_index(n, None) for n in all_names) if i is not None})
    layer_options: list[list[int] | None] = [None]
    if use_layers and indices and all(layer_index(n, None) is not None for n in names) and indices != every:
        layer_options.append(indices)
    for depth in (1, 2, 3):
        suffixes = list(dict.fromkeys(".".join(n.split(".")[-depth:]) for n in names))
        for layers in layer_options:
            fields: dict[str, Any] = {"target_modules": suffixes}
            if use_layers:
                fields["layers_to_transform"] = layers
            if {n for n in all_names if is_target(fields, n)} != wanted:
                continue
            if feedforward is None:
                return fields
            # IA3 wants feedforward_modules to be a subset of target_modules (as strings)
            ff = [s for s in suffixes if all(n in ff_wanted for n in names if n.endswith("." + s) or n == s)]
            if {n for n in names if is_feedforward(ff, n)} == ff_wanted:
                return {**fields, "feedforward_modules": ff}
    fields = {"target_modules": _regex(names), **({"layers_to_transform": None} if use_layers else {})}
    if feedforward is not None:
        fields["feedforward_modules"] = _regex(sorted(ff_wanted)) if ff_wanted else []
    return fields
