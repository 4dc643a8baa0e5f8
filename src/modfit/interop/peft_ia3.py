"""PEFT IA3 <-> modfit `ia3`.

Both scale a projection's output, h = (W x + b) ⊙ l, or, for PEFT's `feedforward_modules`, its input,
h = W (x ⊙ l) + b. PEFT stores l as `<module>.ia3_l`, (out, 1) for an output scaling and (1, in) for an
input one; modfit's `ia3_l` is 1-D. The shape says which scaling a module has, and it must agree with
the config's `feedforward_modules` (PEFT's plain `endswith` match). The scaled modules come from the
weights, as for LoRA, and modfit's `targets` / `feedforward` are the shortest names that select them.

Refused by name: `modules_to_save` and any other set field PEFT adds later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.ia3 import Ia3Config, Ia3InputUnit, Ia3Unit
from ..targets import ModelView, is_projection, projection_shape
from .compact import modfit_targets
from .peft_common import Checkpoint, Export, is_conv1d, model_order, reads, task_type, writes
from .peft_paths import KEY_PREFIX, is_feedforward, peft_name, site_for, target_config
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

HANDLED = {"target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out", "init_ia3_weights"}
SUFFIX = ".ia3_l"


@reads("IA3")
def read_ia3(ckpt: Checkpoint, view: ModelView) -> Imported:
    """A PEFT IA3 checkpoint as a modfit ia3 module."""
    ckpt.check_fields(HANDLED)
    feedforward_cfg = ckpt.config.get("feedforward_modules")
    vectors: dict[str, torch.Tensor] = {}
    inputs: list[str] = []
    for key, value in ckpt.tensors.items():
        where = ckpt.key(key)
        if not key.startswith(KEY_PREFIX) or not key.endswith(SUFFIX):
            raise InteropError(
                f"{where}: not an IA3 vector (fully trained modules, modules_to_save, do not convert)"
            )
        name = key[len(KEY_PREFIX) : -len(SUFFIX)]
        site = site_for(view, name, where)
        module = view.module(site)
        if not is_projection(module):
            raise InteropError(f"{where}: IA3 on a {type(module).__name__} has no modfit equivalent")
        in_f, out_f, _ = projection_shape(module)
        shape = tuple(value.shape)
        scales_input = shape == (1, in_f) and shape != (out_f, 1)
        if shape not in ((1, in_f), (out_f, 1)):
            raise InteropError(f"{where}: shape {shape}, expected ({out_f}, 1) or, feed-forward, (1, {in_f})")
        if scales_input != is_feedforward(feedforward_cfg, name):
            raise InteropError(
                f"{where}: shape {shape} scales the {'input' if scales_input else 'output'}, but "
                f"{ckpt.field('feedforward_modules')} {'does not mark' if scales_input else 'marks'} '{name}'"
            )
        vectors[site] = value.reshape(-1)
        if scales_input:
            inputs.append(site)
    if not vectors:
        raise InteropError(f"{ckpt.weights_path}: no IA3 vectors (no key ends in {SUFFIX})")
    sites = model_order(view, vectors)
    targets, layers = modfit_targets(view, sites)
    feedforward = modfit_targets(view, model_order(view, inputs), layers)[0] if inputs else ()
    config = Ia3Config(targets=targets, feedforward=feedforward, layers=layers)
    return Imported(config, {f"units.{site}.ia3_l": v for site, v in vectors.items()})


@writes("ia3")
def write_ia3(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit ia3 module as PEFT IA3."""
    view = mm.view
    tensors: dict[str, torch.Tensor] = {}
    sites, inputs, conv1d = [], [], False
    for path, unit in mm.units(name):
        vector = cast(Ia3Unit, unit).ia3_l
        scales_input = isinstance(unit, Ia3InputUnit)
        shaped = vector.reshape(1, -1) if scales_input else vector.reshape(-1, 1)  # (1, in) or (out, 1)
        tensors[f"{KEY_PREFIX}{peft_name(view, path)}{SUFFIX}"] = shaped
        sites.append(path)
        if scales_input:
            inputs.append(path)
        conv1d = conv1d or is_conv1d(view.module(path))
    fields = target_config(view, model_order(view, sites), model_order(view, inputs), use_layers=False)
    return {
        "peft_type": "IA3",
        "task_type": task_type(view, options),
        **fields,
        "fan_in_fan_out": conv1d,
        "modules_to_save": None,
        "init_ia3_weights": True,
    }, tensors
