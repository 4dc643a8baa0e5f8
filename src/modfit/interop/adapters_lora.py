"""adapters' LoRA and (IA)³ (`architecture: "lora"`, composition_mode "add" / "scale") <-> modfit
`lora` / `ia3`.

LoRA: h = W x + b + s · B A x with A = `loras.<n>.lora_A` (r, in), B = `loras.<n>.lora_B` (out, r)
(raw parameters: no `.weight` in the key) and s = alpha / r, as modfit's. With `use_gating` adapters
multiplies by the gate g = mean over the sequence of sigmoid(W_g x + b_g) *instead of* s, modfit by
s · g, so a gated LoRA converts when alpha = r (s = 1).

(IA)³ ("scale"): h = (W x + b) ⊙ (alpha · l), l = `loras.<n>.lora_B` (out, 1): an output scaling, which
is modfit's `ia3` with every target outside `feedforward`; note that adapters' `intermediate_lora`
scales the *output* of the FFN's first projection (`intermediate.dense`, before the activation),
modfit's default (IA)³ the input of the second, so only output scalings convert.

The adapted projections, per layer (BERT's layout): `attn_matrices` q, k, v -> query, key, value (with
`selfattn_lora`), `intermediate_lora` -> ffn_in (intermediate.dense), `output_lora` -> ffn_out
(output.dense); `leave_out` -> layers. modfit modules on other projections (attn_out) or with different
projections in different layers are refused on export, as rsLoRA (adapters has no sqrt(r) scaling);
VeRA (`vera_d`, `vera_b`) and adapters' DoRA (`use_dora`: it rescales W x + b, the bias included, by
m / ||W + BA||, the norm without the scaling) are refused on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.ia3 import Ia3Config, Ia3InputUnit, Ia3Unit
from ..methods.lora import GatedLoraUnit, LoraConfig, LoraUnit
from ..targets import ModelView, TargetError
from .adapters_common import Export, Part, chosen_layers, leave_out, number, reads, require_layout, writes
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

MATRICES = {"q": "query", "k": "key", "v": "value"}
FLAGS = {"intermediate_lora": "ffn_in", "output_lora": "ffn_out"}
HANDLED = {
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "leave_out",
    "r",
    "alpha",
    "dropout",
    "attn_matrices",
    "composition_mode",
    "init_weights",
    "init_weights_seed",
    "use_gating",
    "dtype",
}


def _roles(part: Part) -> tuple[str, ...]:
    cfg = part.config
    matrices = cfg.get("attn_matrices", ["q", "v"]) if cfg.get("selfattn_lora", True) else []
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown:
        raise InteropError(f"{part.field('attn_matrices')} names {unknown}: modfit maps q, k and v")
    roles = tuple(MATRICES[m] for m in matrices) + tuple(r for f, r in FLAGS.items() if cfg.get(f))
    if not roles:
        raise InteropError(f"{part.config_path}: the LoRA adapts no projection (every *_lora flag is false)")
    return roles


@reads("lora")
def read_lora(part: Part, view: ModelView) -> Imported:
    """An adapters LoRA or (IA)³ adapter as a modfit lora / ia3 module."""
    require_layout(view, str(part.config_path))
    if part.get("use_dora"):
        raise InteropError(
            f"{part.field('use_dora')} is true: adapters' DoRA rescales the bias too and takes the norm of "
            "W + BA without the scaling, modfit's (as PEFT's and the paper's) neither, so it does not convert"
        )
    part.check_fields(HANDLED)
    cfg = part.config
    mode = cfg.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise InteropError(
            f"{part.field('composition_mode')} is {mode!r}: modfit reads 'add' (LoRA) and 'scale' (IA3)"
        )
    roles, layers = _roles(part), chosen_layers(view, part)
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("alpha", 8))
    gating = bool(cfg.get("use_gating"))
    if gating and (mode == "scale" or alpha != r):
        raise InteropError(
            f"{part.field('use_gating')} is true with alpha {number(alpha)} and r {r}: adapters' gate "
            "replaces the scaling alpha / r, modfit's multiplies it, so they agree only for a LoRA with "
            "alpha = r"
        )
    try:
        sites = view.projections(roles, layers)
    except TargetError as e:
        raise InteropError(f"{part.config_path}: {e}") from None
    name = _name(part)
    tensors: dict[str, torch.Tensor] = {}
    slots = (
        {"lora_B": "ia3_l"}
        if mode == "scale"
        else {"lora_A": "lora_A", "lora_B": "lora_B", "gate.weight": "gate.weight", "gate.bias": "gate.bias"}
    )
    marker = f".loras.{name}."
    for key, value in part.tensors.items():
        path, _, slot = key.partition(marker)
        site = next((s for s in sites if path == s or path.endswith("." + s)), None)
        if site is None or slot not in slots:
            raise InteropError(
                f"{part.key(key)}: not a {'(IA)3' if mode == 'scale' else 'LoRA'} weight on a projection "
                "the config names"
            )
        if mode == "scale":
            value = value.reshape(-1) * alpha  # (out, 1) -> (out,), the scaling folded in
        tensors[f"units.{site}.{slots[slot]}"] = value
    config: LoraConfig | Ia3Config
    if mode == "scale":
        config = Ia3Config(targets=roles, feedforward=(), layers=layers)
    else:
        config = LoraConfig(
            r=r,
            alpha=alpha,
            dropout=float(cfg.get("dropout") or 0.0),
            targets=roles,
            layers=layers,
            use_gating=gating,
        )
    return Imported(config, tensors, name=name)


def _name(part: Part) -> str:
    names = {k.split(".loras.", 1)[1].split(".", 1)[0] for k in part.tensors if ".loras." in k}
    if len(names) != 1:
        raise InteropError(
            f"{part.weights_path}: expected the LoRA weights of one adapter, found {sorted(names) or 'none'}"
        )
    return names.pop()


def _placement(mm: ModularModel, name: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """(roles, layers) of the projections module `name` adapts, the same roles in every layer."""
    view = mm.view
    sites = [path for path, _ in mm.units(name)]
    refs = view.layers()
    per_layer: dict[int, set[str]] = {}
    for site in sites:
        ref = next((r for r in refs if site.startswith(r.path + ".")), None)
        role = None
        if ref is not None:
            role = next(
                (
                    x
                    for x in (*MATRICES.values(), *FLAGS.values())
                    if site in view.projections([x], [ref.index])
                ),
                None,
            )
        if ref is None or role is None:
            raise InteropError(
                f"module '{name}': {site} is not a projection adapters adapts (query, key, value, "
                "intermediate.dense, output.dense)"
            )
        per_layer.setdefault(ref.index, set()).add(role)
    role_sets = {frozenset(v) for v in per_layer.values()}
    if len(role_sets) != 1:
        raise InteropError(
            f"module '{name}': adapters adapts the same projections in every layer; this module does not"
        )
    order = (*MATRICES.values(), *FLAGS.values())
    chosen = role_sets.pop()
    roles = tuple(r for r in order if r in chosen)
    layers = tuple(sorted(per_layer))
    return roles, (None if len(layers) == len(refs) else layers)


def _fields(roles: tuple[str, ...], layers: tuple[int, ...] | None, view: ModelView) -> dict[str, Any]:
    matrices = [m for m, role in MATRICES.items() if role in roles]
    return {
        "selfattn_lora": bool(matrices),
        "intermediate_lora": "ffn_in" in roles,
        "output_lora": "ffn_out" in roles,
        "leave_out": leave_out(view, layers),
        "attn_matrices": matrices,
    }


@writes("lora")
def write_lora(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit lora module as an adapters LoRA."""
    view = mm.view
    require_layout(view, f"module '{name}'")
    config = cast(LoraConfig, mm.records[name].config)
    if config.rslora:
        raise InteropError(f"module '{name}': lora.rslora (alpha / sqrt(r)) has no adapters equivalent")
    if config.use_gating and config.alpha != config.r:
        raise InteropError(
            f"module '{name}': a gated LoRA converts only with alpha = r (adapters' gate replaces "
            "the scaling)"
        )
    roles, layers = _placement(mm, name)
    tensors: dict[str, torch.Tensor] = {}
    for path, unit in mm.units(name):
        lora = cast(LoraUnit, unit)
        tensors[f"{path}.loras.{name}.lora_A"] = lora.lora_A
        tensors[f"{path}.loras.{name}.lora_B"] = lora.lora_B
        if isinstance(lora, GatedLoraUnit):
            tensors[f"{path}.loras.{name}.gate.weight"] = lora.gate.weight
            tensors[f"{path}.loras.{name}.gate.bias"] = lora.gate.bias
    return {
        "architecture": "lora",
        **_fields(roles, layers, view),
        "r": config.r,
        "alpha": number(config.alpha),
        "dropout": config.dropout,
        "composition_mode": "add",
        "init_weights": "lora",
        "init_weights_seed": None,
        "use_gating": config.use_gating,
        "use_dora": False,
        "vera_d": None,
        "vera_b": None,
        "dtype": None,
    }, tensors


@writes("ia3")
def write_ia3(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit ia3 module whose vectors all scale outputs, as adapters (IA)³."""
    view = mm.view
    require_layout(view, f"module '{name}'")
    for path, unit in mm.units(name):
        if isinstance(unit, Ia3InputUnit):
            raise InteropError(
                f"module '{name}': {path} is scaled at its input (ia3.feedforward); adapters' (IA)3 scales "
                "outputs only (use feedforward=() and ffn_in for the FFN)"
            )
    roles, layers = _placement(mm, name)
    tensors = {
        f"{path}.loras.{name}.lora_B": cast(Ia3Unit, unit).ia3_l.reshape(-1, 1)
        for path, unit in mm.units(name)
    }
    return {
        "architecture": "lora",
        **_fields(roles, layers, view),
        "r": 1,
        "alpha": 1,
        "dropout": 0.0,
        "composition_mode": "scale",
        "init_weights": "ia3",
        "init_weights_seed": None,
        "use_gating": False,
        "use_dora": False,
        "vera_d": None,
        "vera_b": None,
        "dtype": None,
    }, tensors
