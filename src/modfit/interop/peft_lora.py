"""PEFT LoRA (and DoRA) <-> modfit `lora` / `dora` (a `union` of them for rank and alpha patterns).

Both compute h = W x + s · B A x with A = `lora_A.weight` (r, in), B = `lora_B.weight` (out, r) and
s = alpha / r, or alpha / sqrt(r) with `use_rslora`; DoRA adds the magnitude m (`lora_magnitude_vector`,
(out,), no `.weight` in the file) and rescales each output feature by m / ||W + s·BA||_c. GPT-2's
`Conv1D` keeps the same A and B shapes (PEFT's `fan_in_fan_out`: only the merged delta is transposed),
and modfit reads the layout from the module itself, so the flag needs no translation.

Per-module settings: PEFT's `rank_pattern` / `alpha_pattern` give some modules their own r or alpha;
a modfit LoRA config has one of each, so such a checkpoint becomes a `union` with one LoRA member per
(r, alpha) group (the default group first). The modules come from the weights (every module with a
`lora_A`), checked against the config (each module's rank must be what `r` / `rank_pattern` say);
`target_modules`, `layers_to_transform` and `exclude_modules` thus need no re-interpretation, and the
modfit targets are the shortest names that select exactly those modules (`compact.py`).

Refused by name: `bias` other than "none" (it trains the base biases), `lora_bias`, `modules_to_save`,
initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, EVA), LoRA on
embeddings or convolutions, and any other set field (`layer_replication`, `target_parameters`, ...).
Exporting refuses a gated LoRA (UniPELT's `use_gating`) and unions with other members.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.dora import DoraConfig, DoraUnit
from ..methods.lora import LoraConfig, LoraUnit
from ..methods.union import UnionConfig, UnionUnit, member_names
from ..targets import ModelView, is_projection, projection_shape
from .compact import modfit_targets
from .peft_common import Checkpoint, Export, is_conv1d, model_order, number, reads, task_type, writes
from .peft_paths import KEY_PREFIX, pattern_key, peft_name, site_for, target_config
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

HANDLED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "bias",
    "init_lora_weights",
}
# Initialisations after which the saved A and B only make sense on a changed base (unless converted).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}


@reads("LORA")
def read_lora(ckpt: Checkpoint, view: ModelView) -> Imported:
    """A PEFT LoRA/DoRA checkpoint as a modfit lora/dora module (a union of them with patterns)."""
    ckpt.check_fields(HANDLED)
    cfg = ckpt.config
    if cfg.get("bias", "none") != "none":
        raise InteropError(
            f"{ckpt.field('bias')} is {cfg['bias']!r}: it trains the base biases, which a modfit LoRA "
            'does not hold; only "none" converts'
        )
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise InteropError(
            f"{ckpt.field('init_lora_weights')} is {cfg['init_lora_weights']!r}: this initialisation "
            "changes the base weights, so the saved A and B do not apply to the original base (convert it "
            "to a plain LoRA with PEFT's path_initial_model_for_weight_conversion first)"
        )
    r, alpha = ckpt.require("r", int), float(ckpt.require("lora_alpha", (int, float)))
    use_dora, rslora = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    rank_pattern = cast(dict[str, int], cfg.get("rank_pattern") or {})
    alpha_pattern = cast(dict[str, float], cfg.get("alpha_pattern") or {})
    modules = _group_tensors(ckpt)
    groups: dict[tuple[int, float], list[str]] = {(r, alpha): []}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, parts in modules.items():
        where = ckpt.key(KEY_PREFIX + name)
        site = site_for(view, name, where)
        module = view.module(site)
        if not is_projection(module):
            raise InteropError(f"{where}: LoRA on a {type(module).__name__} has no modfit equivalent")
        for slot in ("lora_A", "lora_B") + (("magnitude",) if use_dora else ()):
            if slot not in parts:
                missing = next(k for k, v in SUFFIXES.items() if v == slot)
                raise InteropError(f"{ckpt.weights_path}: {KEY_PREFIX}{name}{missing} is missing")
        if "magnitude" in parts and not use_dora:
            raise InteropError(f"{where}: a DoRA magnitude vector, but {ckpt.field('use_dora')} is not true")
        in_f, out_f, _ = projection_shape(module)
        rank = int(parts["lora_A"].shape[0])
        expected = {"lora_A": (rank, in_f), "lora_B": (out_f, rank), "magnitude": (out_f,)}
        for slot, value in parts.items():
            if tuple(value.shape) != expected[slot]:
                raise InteropError(
                    f"{where}: {slot} has shape {tuple(value.shape)}, the module needs {expected[slot]}"
                )
        r_key, a_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        configured = int(rank_pattern[r_key]) if r_key is not None else r
        if configured != rank:
            source = f'rank_pattern["{r_key}"]' if r_key is not None else "r"
            raise InteropError(f"{where}: rank {rank}, but {ckpt.field(source)} says {configured}")
        group = (rank, float(alpha_pattern[a_key]) if a_key is not None else alpha)
        groups.setdefault(group, []).append(site)
        found[site] = parts
    groups = {g: model_order(view, sites) for g, sites in groups.items() if sites}
    if not groups:
        raise InteropError(f"{ckpt.weights_path}: no LoRA weights (no key ends in .lora_A.weight)")
    kind = DoraConfig if use_dora else LoraConfig
    dropout = float(cfg.get("lora_dropout") or 0.0)
    members = []
    for (rank, group_alpha), sites in groups.items():
        targets, layers = modfit_targets(view, sites)
        members.append(
            kind(r=rank, alpha=group_alpha, dropout=dropout, targets=targets, layers=layers, rslora=rslora)
        )
    names = member_names(tuple(members))
    tensors: dict[str, torch.Tensor] = {}
    for member, sites in zip(names, groups.values(), strict=True):
        inner = "" if len(members) == 1 else f"members.{member}."
        for site in sites:
            for slot, value in found[site].items():
                tensors[f"units.{site}.{inner}{slot}"] = value
    config = members[0] if len(members) == 1 else UnionConfig(components=tuple(members))
    return Imported(config, tensors)


def _group_tensors(ckpt: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT module name -> {"lora_A", "lora_B", "magnitude"} tensors; any other key is refused by name."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.tensors.items():
        slot = next(((s, v) for s, v in SUFFIXES.items() if key.endswith(s)), None)
        if not key.startswith(KEY_PREFIX) or slot is None:
            raise InteropError(f"{ckpt.key(key)}: {_why_not(key)}")
        name = key[len(KEY_PREFIX) : -len(slot[0])]
        modules.setdefault(name, {})[slot[1]] = value
    return modules


def _why_not(key: str) -> str:
    if "lora_embedding_" in key:
        return "LoRA on an embedding layer has no modfit equivalent"
    if key.endswith(".lora_B.bias"):
        return "a bias on lora_B (lora_bias) has no modfit equivalent"
    if ".lora_" in key:
        return "not a LoRA weight modfit reads"
    return "not a LoRA weight: fully trained modules (modules_to_save, resized embeddings) do not convert"


@writes("lora", "dora", "union")
def write_lora(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit lora/dora module (or a union of only lora, or only dora, members) as PEFT LoRA."""
    config = mm.records[name].config
    members = _members(name, config)
    kind = type(members[0][1])
    for member, c in members:
        label = f"module '{name}'" + (f" member '{member}'" if member else "")
        if type(c) is not kind:
            raise InteropError(
                f"{label}: a PEFT LoRA is all LoRA or all DoRA; this union mixes {kind.method} and {c.method}"
            )
        if c.use_gating:
            raise InteropError(f"{label}: {c.method}.use_gating (a learned gate) has no PEFT equivalent")
        if (c.rslora, c.dropout) != (members[0][1].rslora, members[0][1].dropout):
            raise InteropError(f"{label}: PEFT has one rslora and one dropout per adapter; members differ")
    by_member = dict(members)
    view = mm.view
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, float]] = {}  # PEFT name -> (r, alpha)
    conv1d = False
    for path, unit in mm.units(name):
        parts = cast(UnionUnit, unit).members.items() if isinstance(unit, UnionUnit) else [(None, unit)]
        for member, part in parts:
            lora = cast(LoraUnit, part)
            member_config = by_member[member]
            full = peft_name(view, path)
            tensors[f"{KEY_PREFIX}{full}.lora_A.weight"] = lora.lora_A
            tensors[f"{KEY_PREFIX}{full}.lora_B.weight"] = lora.lora_B
            if isinstance(lora, DoraUnit):
                tensors[f"{KEY_PREFIX}{full}.lora_magnitude_vector"] = lora.magnitude
            settings[full] = (member_config.r, member_config.alpha)
            conv1d = conv1d or is_conv1d(view.module(path))
    r, alpha = members[0][1].r, members[0][1].alpha
    sites = model_order(view, [p for p, _ in mm.units(name)])
    fields = target_config(view, sites)
    rank_pattern, alpha_pattern = _patterns(settings, r, alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type(view, options),
        "r": r,
        "lora_alpha": number(alpha),
        "lora_dropout": members[0][1].dropout,
        "use_rslora": members[0][1].rslora,
        **({"use_dora": True} if kind is DoraConfig else {}),
        **fields,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
    }, tensors


def _members(name: str, config: Any) -> list[tuple[str | None, LoraConfig]]:
    if isinstance(config, LoraConfig):
        return [(None, config)]
    members = cast(UnionConfig, config).members()
    for member, c in members.items():
        if not isinstance(c, LoraConfig):
            raise InteropError(
                f"module '{name}': union member '{member}' ({c.method}) has no place in a PEFT LoRA adapter"
            )
    return [(m, cast(LoraConfig, c)) for m, c in members.items()]


def _patterns(
    settings: dict[str, tuple[int, float]], r: int, alpha: float
) -> tuple[dict[str, int], dict[str, Any]]:
    """`rank_pattern` / `alpha_pattern` keyed by module name, checked to give every module its setting
    (plain names first; escaped as regular expressions if a plain name would also match another module)."""
    for escape in (False, True):
        key = re.escape if escape else str
        ranks = {key(n): rank for n, (rank, _) in settings.items() if rank != r}
        alphas = {key(n): number(a) for n, (_, a) in settings.items() if a != alpha}
        if all(
            _lookup(ranks, n, r) == rank and _lookup(alphas, n, alpha) == a
            for n, (rank, a) in settings.items()
        ):
            return ranks, alphas
    raise InteropError("cannot express the per-module ranks as a PEFT rank_pattern")  # pragma: no cover


def _lookup(pattern: dict[str, Any], name: str, default: float) -> float:
    found = pattern_key(pattern, name)
    return float(pattern[found]) if found is not None else float(default)
