"""adapters' bottleneck adapters (seq_bn, double_seq_bn, par_bn, scaled_par_bn, compacter, compacter++)
<-> modfit's bottleneck methods (pfeiffer, houlsby, parallel, scaled_parallel, compacter, compacter++).

Both compute, at a sub-layer output h with residual r and the base model's LayerNorm LN::

    sequential: x = LN(h + r) if original_ln_before else h;  res = h if residual_before_ln else x
                h' = res + g · s · up(act(down(LN_b(x))))        (then LN(h' + r) by the base model)
    parallel:   h' = h + LN_a(g · s · up(act(down(LN_b(r)))))

with adapters' config fields mapped one to one: `mh_adapter` / `output_adapter` -> placement
(attn_output / ffn_output), `is_parallel` -> mode, `reduction_factor`, `non_linearity` -> activation,
`scaling` (a number, "learned", "channel"), `use_gating`, `original_ln_before`, `residual_before_ln`,
`ln_before` / `ln_after` (adapter-own LayerNorms), `dropout`, `leave_out` -> layers, `init_weights`
(bert, houlsby, mam_adapter = modfit's zero_up) and the `phm_*` fields of Compacter.

Keys, per adapters bottleneck layer L (`encoder.layer.0.output`, `...attention.output`) and name n::

    L.adapters.n.adapter_down.0.weight / .bias      down   (adapter_down.1 with ln_before: index 0 is
    L.adapters.n.adapter_norm_before.weight / .bias ln_before  the same LayerNorm, saved twice)
    L.adapters.n.adapter_up.weight / .bias          up
    L.adapters.n.adapter_norm_after.*, .gate.*, .scaling
    L.adapters.n.adapter_down.0.W_left, W_right, b  Compacter's PHM layers (W, phm_rule per layer when
    shared_parameters.n.phm_rule                    not shared); shared tensors once per adapter

Refused by name: `original_ln_after: false` (modfit's sites always leave the base LayerNorm in place),
`residual_before_ln: "post_add"`, `ln_after` on a sequential adapter with
`adapter_residual_before_ln: false` (adapters then adds the residual after its own LayerNorm; modfit
before), per-layer `reduction_factor` mappings that differ, invertible adapters (`inv_adapter`),
`stochastic_depth`, `cross_adapter`, and the "leakyrelu" activation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.bottleneck import (
    BottleneckConfig,
    BottleneckUnit,
    HoulsbyConfig,
    ParallelConfig,
    PfeifferConfig,
    ScaledParallelConfig,
)
from ..methods.compacter import CompacterConfig, CompacterPlusPlusConfig
from ..targets import ModelView
from .adapters_common import (
    Export,
    Part,
    bottleneck_points,
    chosen_layers,
    leave_out,
    number,
    reads,
    require_layout,
    writes,
)
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

ROLES = {"mh_adapter": "attn_output", "output_adapter": "ffn_output"}
INITS = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "zero_up"}
PHM_FIELDS = (
    "phm_dim",
    "phm_rank",
    "shared_phm_rule",
    "factorized_phm_rule",
    "shared_W_phm",
    "factorized_phm_W",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "phm_bias",
)
HANDLED = {
    *ROLES,
    "is_parallel",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "ln_before",
    "ln_after",
    "init_weights",
    "init_weights_seed",
    "scaling",
    "use_gating",
    "dropout",
    "leave_out",
    "phm_layer",
    "hypercomplex_nonlinearity",  # initialisation only
    "inv_adapter_reduction_factor",  # read with inv_adapter
    *PHM_FIELDS,
}
NEUTRAL = {"stochastic_depth": 0.0}
# adapters' shared Compacter tensors -> the PHM layer ("down"/"up", or both) and its tensor name
SHARED = {
    "phm_rule": (("down", "up"), "phm_rule"),
    "phm_rule_left": (("down", "up"), "phm_rule_left"),
    "phm_rule_right": (("down", "up"), "phm_rule_right"),
    "W_down_left": (("down",), "W_left"),
    "W_down_right": (("down",), "W_right"),
    "W_up_left": (("up",), "W_left"),
    "W_up_right": (("up",), "W_right"),
    "W_down": (("down",), "W"),
    "W_up": (("up",), "W"),
}


@reads("bottleneck")
def read_bottleneck(part: Part, view: ModelView) -> Imported:
    """An adapters bottleneck (or Compacter) adapter as the modfit method of the same computation."""
    require_layout(view, str(part.config_path))
    part.check_fields(HANDLED, NEUTRAL)
    config = _config(part, view)
    name = _adapter_name(part)
    points = bottleneck_points(view, config.placement)
    ln_before = config.ln_before
    tensors: dict[str, torch.Tensor] = {}
    marker = f".adapters.{name}."
    shared_prefix = f"shared_parameters.{name}."
    for key, value in part.tensors.items():
        bare = key.split(shared_prefix, 1)[1] if shared_prefix in key else None
        if bare is not None:
            if bare not in SHARED:
                raise InteropError(f"{part.key(key)}: not a shared Compacter tensor modfit reads")
            layers, tensor = SHARED[bare]
            for site, _, _ in points.values():
                for layer in layers:
                    tensors[f"units.{site}.{layer}.{tensor}"] = value
            continue
        loc, _, theirs = key.partition(marker)
        location = _location(points, loc) if theirs else None
        if location is None:
            raise InteropError(
                f"{part.key(key)}: not a weight of bottleneck adapter '{name}' at a site modfit maps"
            )
        rest = _modfit_suffix(theirs, ln_before)
        if rest is None:
            raise InteropError(f"{part.key(key)}: '{theirs}' is not a bottleneck adapter weight modfit reads")
        if rest:
            tensors[f"units.{location}.{rest}"] = value
    shares = isinstance(config, CompacterConfig) and (config.shared_phm_rule or config.shared_W_phm)
    if shares and not any(shared_prefix in key for key in part.tensors):
        raise InteropError(
            f"{part.weights_path}: no {shared_prefix}* tensors, but {part.field('shared_phm_rule')} or "
            '"shared_W_phm" shares them: adapters leaves them out when it saves from a model without the '
            "family prefix (adapters.init on a bare model); save the adapter from a *AdapterModel"
        )
    return Imported(config, tensors, name=name or None)


def _adapter_name(part: Part) -> str:
    names = {m.group(1) for k in part.tensors for m in [re.search(r"\.adapters\.([^.]+)\.", k)] if m}
    names |= {m.group(1) for k in part.tensors for m in [re.search(r"shared_parameters\.([^.]+)\.", k)] if m}
    if len(names) != 1:
        raise InteropError(
            f"{part.weights_path}: expected the weights of one adapter, found {sorted(names) or 'none'}"
        )
    return names.pop()


def _location(points: dict[str, tuple[str, int, str]], loc: str) -> str | None:
    """modfit's site for adapters' layer path `loc` (with or without the family prefix)."""
    for path, (site, _, _) in points.items():
        if loc == path or loc.endswith("." + path):
            return site
    return None


def _modfit_suffix(rest: str, ln_before: bool) -> str | None:
    """modfit's unit key for adapters' key after `adapters.<name>.`; "" to skip (a duplicate)."""
    down = "adapter_down.1." if ln_before else "adapter_down.0."
    if ln_before and rest.startswith("adapter_down.0."):
        return ""  # adapter_norm_before again (it is also index 0 of adapter_down)
    for theirs, ours in (
        (down, "down."),
        ("adapter_up.", "up."),
        ("adapter_norm_before.", "ln_before."),
        ("adapter_norm_after.", "ln_after."),
        ("gate.", "gate."),
    ):
        if rest.startswith(theirs):
            return ours + rest[len(theirs) :]
    return "scaling" if rest == "scaling" else None


def _config(part: Part, view: ModelView) -> BottleneckConfig:
    cfg = part.config
    placement = tuple(role for flag, role in ROLES.items() if cfg.get(flag))
    if not placement:
        raise InteropError(
            f'{part.field("mh_adapter")} and "output_adapter" are both false: the adapter is nowhere'
        )
    if cfg.get("original_ln_after", True) is not True:
        raise InteropError(
            f"{part.field('original_ln_after')} is {cfg['original_ln_after']!r}: modfit always applies the "
            "base model's LayerNorm after the adapter"
        )
    residual_before_ln = cfg.get("residual_before_ln", True)
    if not isinstance(residual_before_ln, bool):
        raise InteropError(
            f"{part.field('residual_before_ln')} is {residual_before_ln!r}: modfit's residual is h (true) or "
            "LN(h + r) (false)"
        )
    parallel = bool(cfg.get("is_parallel"))
    if cfg.get("ln_after") and not parallel and not cfg.get("adapter_residual_before_ln"):
        raise InteropError(
            f'{part.field("adapter_residual_before_ln")} is false with "ln_after": adapters adds the '
            "residual after its own LayerNorm, modfit's ln_after normalises the sum "
            "(adapter_residual_before_ln: true)"
        )
    if cfg.get("inv_adapter"):
        raise InteropError(
            f"{part.field('inv_adapter')} is {cfg['inv_adapter']!r}: invertible adapters do not convert"
        )
    activation = str(cfg.get("non_linearity") or "")
    if activation.lower() in ("", "leakyrelu"):
        raise InteropError(
            f"{part.field('non_linearity')} is {activation!r}: no modfit activation of that name"
        )
    init = INITS.get(str(cfg.get("init_weights", "bert")))
    if init is None:
        raise InteropError(
            f"{part.field('init_weights')} is {cfg.get('init_weights')!r}: unknown initialisation"
        )
    scaling = cfg.get("scaling", 1.0)
    values: dict[str, Any] = dict(
        reduction_factor=float(_reduction(part, view)),
        placement=placement,
        mode="parallel" if parallel else "sequential",
        activation=activation.lower(),
        scaling=scaling if isinstance(scaling, str) else float(scaling),
        use_gating=bool(cfg.get("use_gating")),
        original_ln_before=bool(cfg.get("original_ln_before")),
        residual_before_ln=residual_before_ln,
        ln_before=bool(cfg.get("ln_before")),
        ln_after=bool(cfg.get("ln_after")),
        dropout=float(cfg.get("dropout") or 0.0),
        init=init,
        layers=chosen_layers(view, part),
    )
    try:
        if cfg.get("phm_layer"):
            values["init"] = "zero_up" if init == "zero_up" else "bert"
            values.update({f: cfg[f] for f in PHM_FIELDS if f in cfg})
            kind: type[BottleneckConfig] = (
                CompacterConfig
                if "attn_output" in placement or not values["original_ln_before"]
                else CompacterPlusPlusConfig
            )
        elif parallel:
            kind = ScaledParallelConfig if values["scaling"] == 4.0 else ParallelConfig
        elif placement == ("ffn_output",) and values["original_ln_before"]:
            kind = PfeifferConfig
        else:
            kind = HoulsbyConfig
        return kind(**values)
    except ValueError as e:  # a modfit config check (ConfigError) names the field
        raise InteropError(f"{part.config_path}: {e}") from None


def _reduction(part: Part, view: ModelView) -> float:
    """One reduction factor: a number, or a mapping whose entries for the adapted layers agree."""
    factor = part.get("reduction_factor", 16)
    if isinstance(factor, Mapping):
        layers = chosen_layers(view, part) or [ref.index for ref in view.layers()]
        values = {factor.get(str(i), factor.get("default")) for i in layers}
        if len(values) != 1 or None in values:
            raise InteropError(
                f"{part.field('reduction_factor')} is {dict(factor)!r}: modfit has one bottleneck size "
                "per module"
            )
        factor = values.pop()
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise InteropError(f"{part.field('reduction_factor')} is {factor!r}: expected a positive number")
    return float(factor)


# -- writing -----------------------------------------------------------------------------------------


@writes("pfeiffer", "houlsby", "parallel", "scaled_parallel", "compacter", "compacter++")
def write_bottleneck(mm: ModularModel, name: str, options: dict[str, Any]) -> Export:
    """A modfit bottleneck/Compacter module as an adapters bottleneck adapter."""
    view = mm.view
    require_layout(view, f"module '{name}'")
    config = cast(BottleneckConfig, mm.records[name].config)
    hidden = int(view.hidden_size or 0)
    inner = config.inner_size(hidden)
    phm = isinstance(config, CompacterConfig)
    out: dict[str, Any] = {
        "architecture": None,
        "mh_adapter": "attn_output" in config.placement,
        "output_adapter": "ffn_output" in config.placement,
        "reduction_factor": number(_factor(hidden, inner, config)),
        "non_linearity": config.activation,
        "original_ln_before": config.original_ln_before,
        "original_ln_after": True,
        "ln_before": config.ln_before,
        "ln_after": config.ln_after,
        # adapters' "mam_adapter" init fails on PHM layers (it wants a .weight); init only matters in training
        "init_weights": "bert" if phm else {v: k for k, v in INITS.items()}[config.init],
        "init_weights_seed": None,
        "is_parallel": config.mode == "parallel",
        "scaling": config.scaling if isinstance(config.scaling, str) else float(config.scaling),
        "use_gating": config.use_gating,
        "residual_before_ln": config.residual_before_ln,
        "adapter_residual_before_ln": config.ln_after,
        "inv_adapter": None,
        "inv_adapter_reduction_factor": None,
        "cross_adapter": False,
        "leave_out": leave_out(view, config.layers),
        "dropout": config.dropout,
        "phm_layer": phm,
        "stochastic_depth": 0.0,
    }
    defaults = {f.name: f.default for f in fields(CompacterConfig) if f.name in PHM_FIELDS}
    out.update({f: getattr(config, f) if phm else defaults[f] for f in PHM_FIELDS})
    out["hypercomplex_nonlinearity"] = "glorot-uniform"
    points = {site: path for path, (site, _, _) in bottleneck_points(view, config.placement).items()}
    tensors: dict[str, torch.Tensor] = {}
    shared_names = _shared_names(config) if isinstance(config, CompacterConfig) else {}
    # modfit's unit layer -> adapters' (the down Linear is index 1 of adapter_down after its own norm)
    theirs = {
        "down": "adapter_down.1." if config.ln_before else "adapter_down.0.",
        "up": "adapter_up.",
        "ln_before": "adapter_norm_before.",
        "ln_after": "adapter_norm_after.",
        "gate": "gate.",
    }
    for site, unit in mm.units(name):
        if site not in points:
            raise InteropError(f"module '{name}': no adapters bottleneck layer for site {site}")
        base = f"{points[site]}.adapters.{name}."
        for key, value in cast(BottleneckUnit, unit).state_dict(keep_vars=True).items():
            layer, _, tensor = key.partition(".")
            if (layer, tensor) in shared_names:
                tensors[f"shared_parameters.{name}.{shared_names[layer, tensor]}"] = value
            elif key == "scaling":
                tensors[base + "scaling"] = value
            elif layer in theirs:
                tensors[base + theirs[layer] + tensor] = value
                if layer == "ln_before":
                    tensors[base + "adapter_down.0." + tensor] = value  # adapters saves it twice
            else:  # pragma: no cover - every BottleneckUnit tensor is listed above
                raise InteropError(f"module '{name}': unit tensor {key} has no adapters key")
    return out, tensors


def _factor(hidden: int, inner: int, config: BottleneckConfig) -> float:
    """A reduction factor with int(hidden // factor) == inner, adapters' bottleneck size."""
    if int(hidden // config.reduction_factor) == inner:
        return float(config.reduction_factor)
    for factor in (hidden / inner, hidden / (inner + 0.5)):
        if int(hidden // factor) == inner:
            return factor
    raise InteropError(  # pragma: no cover - hidden / (inner + 0.5) always floors to inner
        f"{config.method}: no reduction factor gives adapters a bottleneck of {inner} at width {hidden}"
    )


def _shared_names(config: CompacterConfig) -> dict[tuple[str, str], str]:
    """(PHM layer, tensor) -> adapters' shared_parameters name, for the tensors the config shares."""
    shared: list[str] = []
    if config.shared_phm_rule:
        shared += ["phm_rule_left", "phm_rule_right"] if config.factorized_phm_rule else ["phm_rule"]
    if config.shared_W_phm:
        shared += (
            ["W_down_left", "W_down_right", "W_up_left", "W_up_right"]
            if config.factorized_phm_W
            else ["W_down", "W_up"]
        )
    return {(layer, SHARED[s][1]): s for s in shared for layer in SHARED[s][0]}
