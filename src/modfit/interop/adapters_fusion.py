"""adapters' AdapterFusion layers (`adapter_fusion_config.json` + `pytorch_model_adapter_fusion.bin` /
`model_adapter_fusion.safetensors`) <-> modfit `fusion` over bottleneck modules.

At a bottleneck layer with residual res (h, or LN(h + r) with residual_before_ln false) and the fused
adapters' branches b_i = s · up_i(act(down_i(x))), adapters computes, with value: false::

    alpha = softmax_i((Q q) . (K b_i))           q = h (query_before_ln, or no original_ln_before)
    out   = res + sum_i alpha_i b_i               (then the base LayerNorm)

modfit's fusion attends over the modules' whole outputs o_i = res + b_i with q = h and a value map V:
K o_i = K res + K b_i, and the first term (the same for every i) cancels in the softmax, so with
V = identity (bias 0) both give res + sum_i alpha_i b_i. Hence what converts: fusions whose value
projection is the identity (adapters' `value: false`, e.g. its "static" config), without
`temperature`, over sequential bottleneck adapters that share their placement and layer-norm
options, have no gate and no `ln_after` (adapters fuses the branch before those), and, when they
read LN(h + r) (`original_ln_before`), with `query_before_ln: true`. `query: false` / `key: false`
become identity maps. Everything else is refused by name, notably adapters' default "dynamic" fusion
(`value: true`): it adds the residual outside its value projection, which modfit's V cannot express.

The fused adapters must be on the model before the fusion is read (load their folders first), and
a modfit fusion exports only after its modules were exported under the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ..methods.bottleneck import BottleneckConfig
from ..methods.fusion import FusionConfig, FusionUnit
from ..targets import ModelView
from .adapters_common import Part, bottleneck_points, require_layout, wrapper
from .registry import Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

HANDLED = {
    "key",
    "query",
    "value",
    "query_before_ln",
    "regularization",  # a training loss only
    "residual_before",  # the same result when the value map is the identity (the alphas sum to 1)
    "temperature",
    "value_before_softmax",  # read with value
    "value_initialized",  # initialisation only
    "dropout_prob",
}


def _children(mm: ModularModel, names: list[str], where: str, query_before_ln: bool) -> BottleneckConfig:
    """The fused modules' shared config, after checking they fuse the same way in both libraries."""
    configs = []
    for child in names:
        record = mm.records.get(child)
        if record is None:
            raise InteropError(f"{where}: fuses '{child}', which is not on this model; load its folder first")
        config = record.config
        if not isinstance(config, BottleneckConfig):
            raise InteropError(
                f"{where}: fuses '{child}' ({config.method}); adapters fuses bottleneck adapters only"
            )
        for flag, why in (
            (config.mode == "parallel", "a parallel adapter (adapters' query is then the sub-layer input)"),
            (config.use_gating, "a gated adapter (adapters fuses the branch before the gate)"),
            (config.ln_after, "an adapter with ln_after (adapters fuses the branch before that LayerNorm)"),
        ):
            if flag:
                raise InteropError(f"{where}: '{child}' is {why}")
        configs.append(config)
    options = {(c.placement, c.original_ln_before, c.residual_before_ln, c.layers) for c in configs}
    if len(options) != 1:
        raise InteropError(
            f"{where}: the fused adapters differ in placement, layers or layer-norm options; adapters runs "
            "them all with the last one's"
        )
    if configs[0].original_ln_before and not query_before_ln:
        raise InteropError(
            f'{where}: "query_before_ln" is false over adapters with original_ln_before: adapters\' query is '
            "then LN(h + r), modfit's the sub-layer output h"
        )
    return configs[0]


def read_fusion(part: Part, view: ModelView) -> Imported:
    """An adapters fusion folder as a modfit fusion over the modules already on the model."""
    from ..model import wrap

    require_layout(view, str(part.config_path))
    cfg = part.config
    unknown = sorted(k for k in cfg if k not in HANDLED)
    if unknown:
        raise InteropError(f"{part.field(unknown[0])} is {cfg[unknown[0]]!r}: modfit has no equivalent")
    for key, why in (
        (
            "value",
            "adapters adds the residual outside its value projection; modfit's value map cannot express it",
        ),
        ("temperature", "adapters' temperature decays with every forward pass"),
    ):
        if cfg.get(key):
            raise InteropError(f"{part.field(key)} is true: {why}")
    names = part.wrapper.get("adapter_names") or part.name.split(",")
    if not isinstance(names, list) or len(names) < 2:
        raise InteropError(
            f'{part.config_path}: "adapter_names" is {names!r}: a fusion needs at least 2 adapters'
        )
    child = _children(wrap(view.model), names, str(part.config_path), bool(cfg.get("query_before_ln")))
    points = bottleneck_points(view, child.placement)
    marker = f".adapter_fusion_layer.{','.join(names)}."
    tensors: dict[str, torch.Tensor] = {}
    for key, value in part.tensors.items():
        loc, _, param = key.partition(marker)
        site = next((s for p, (s, _, _) in points.items() if loc == p or loc.endswith("." + p)), None)
        layer = param.split(".", 1)[0]
        if site is None or layer not in ("query", "key") or not cfg.get(layer, True):
            raise InteropError(f"{part.key(key)}: not a query or key weight of fusion '{','.join(names)}'")
        tensors[f"units.{site}.{param}"] = value
    sites = sorted({k.split(".", 1)[1].rsplit(".", 2)[0] for k in tensors})
    for site in sites:
        width = int(view.hidden_size or 0)
        for layer in ("query", "key", "value"):
            if layer == "value" or not cfg.get(layer, True):
                tensors[f"units.{site}.{layer}.weight"] = torch.eye(width)
                tensors[f"units.{site}.{layer}.bias"] = torch.zeros(width)
    dropout = cfg.get("dropout_prob")
    return Imported(FusionConfig(children=tuple(names), dropout=float(dropout or 0.0)), tensors, name=None)


def fusion_files(mm: ModularModel, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_fusion_config.json, tensors under adapters' keys) for modfit fusion module `name`."""
    view = mm.view
    require_layout(view, f"module '{name}'")
    config = cast(FusionConfig, mm.records[name].config)
    where = f"module '{name}'"
    invalid = [c for c in config.children if c not in mm.records]
    if invalid:
        raise InteropError(f"{where}: fuses {invalid[0]!r}; adapters fuses adapters by name, not expressions")
    if config.temperature != 1.0:
        raise InteropError(f"{where}: fusion.temperature {config.temperature} has no adapters equivalent")
    child = _children(mm, list(config.children), where, query_before_ln=True)
    points = {site: path for path, (site, _, _) in bottleneck_points(view, child.placement).items()}
    joined = ",".join(config.children)
    tensors: dict[str, torch.Tensor] = {}
    for site, unit in mm.units(name):
        fusion = cast(FusionUnit, unit)
        eye = torch.eye(fusion.value.weight.shape[0], dtype=fusion.value.weight.dtype)
        if not (
            torch.equal(fusion.value.weight.detach().cpu(), eye) and not fusion.value.bias.detach().any()
        ):
            raise InteropError(
                f"{where}: the value map at {site} is not the identity; adapters adds the residual outside "
                "its value projection, so only fusions with an identity value map convert"
            )
        if site not in points:
            raise InteropError(f"{where}: no adapters bottleneck layer for site {site}")
        for layer in ("query", "key"):
            for param, value in getattr(fusion, layer).state_dict(keep_vars=True).items():
                tensors[f"{points[site]}.adapter_fusion_layer.{joined}.{layer}.{param}"] = value
    fields = {
        "key": True,
        "query": True,
        "value": False,
        "query_before_ln": True,
        "regularization": False,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": False,
        "dropout_prob": config.dropout or None,
    }
    return {"adapter_names": list(config.children), **wrapper(view, joined, fields)}, tensors
