"""What a fusion attends to: its softmax weights per layer, averaged over a data set.

AdapterFusion's analysis (Pfeiffer et al. 2021, arXiv:2005.00247, Figure 5) is a heatmap of layers
x fused modules: how much of each layer's output comes from each module on one task's data. Here::

    w[l, i] = sum over real tokens t of the sites s in layer l of alpha_s,t,i / (their count)

alpha_s,t: the fusion unit's softmax over the n branches at site s for token t (`FusionUnit.fuse`).
Padding does not count (the batch's attention mask goes to `fusion.set_mask`). A layer holding
several fusion sites (e.g. fused LoRA modules on query and value, Houlsby's two adapters) gets the
token-weighted mean of its sites, so every row still sums to 1. Layers come from the model's
architecture table (`ModelView.layers()`); for a family the table does not know, each site is its
own row, named by its path.

    result = fusion_weights(mm, "fu", batches)      # the active composition must run "fu"
    print(format_table(result)); plot_fusion_weights(result, "fusion.png")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..plotting import new_figure, save_png
from ..targets import TargetError

if TYPE_CHECKING:
    from ..model import ModularModel


class FusionWeights(NamedTuple):
    """The averaged fusion weights of one fusion module.

    Attributes:
        layers: row labels, in model order ("3"; "encoder 3" for a family with several layer
            groups; a site's path where the layer is unknown).
        modules: column labels: the fused branches, in the fusion's order (e.g. "a", "stack(l, b)").
        matrix: (layers, modules) float64; each row sums to 1.
        tokens: how many real (not padding) token positions one site averaged over.
    """

    layers: list[str]
    modules: list[str]
    matrix: torch.Tensor
    tokens: int


@torch.no_grad()
def fusion_weights(
    mm: ModularModel, fusion: str, batches: Iterable[Mapping[str, torch.Tensor]]
) -> FusionWeights:
    """Run `batches` through the active composition and average fusion `fusion`'s weights per layer.

    Each batch is run as evaluation runs it: in head mode (`mm(...)`) when the composition has a
    head, else through the HF model (an encoder-decoder then gets the input as its decoder input
    too, so the decoder's fusion sites see the same tokens). The model is in eval mode meanwhile
    (no dropout) and returns to its mode afterwards. Under `batchsplit(...)` a branch sees only its
    rows, so a fusion inside one cannot be given the mask: there padding counts too.

    Args:
        mm: the model, with a composition active that runs fusion module `fusion`.
        fusion: the fusion module's name.
        batches: dicts with `input_ids` and `attention_mask` (0 on padding), e.g. from `collate`;
            `token_type_ids` is passed on, anything else (labels) is ignored.

    Returns:
        A `FusionWeights` (layers, modules, matrix, tokens).

    Raises:
        KeyError: no module `fusion` on `mm`.
        ValueError: `fusion` is not a fusion module, does not run in the active composition, or no
            token reached it.
    """
    from ..methods.fusion import FusionUnit, recording, set_mask

    record = mm._record(fusion)
    modules = [str(child) for child in getattr(record.config, "children", ())]
    if not modules or not any(isinstance(unit, FusionUnit) for _, unit in mm.units(fusion)):
        raise ValueError(f"module '{fusion}' ({record.config.method}) is not a fusion module")
    if fusion not in mm.active_names():
        raise ValueError(
            f"fusion '{fusion}' does not run in the active composition {mm.active}; "
            f"activate the composition that uses it, e.g. {record.card.get('composition') or 'fuse(...)'}"
        )
    was_training = mm.training
    mm.eval()
    try:
        with recording(mm, fusion) as records:
            for batch in batches:
                set_mask(records, batch.get("attention_mask"))
                _run(mm, batch)
    finally:
        mm.train(was_training)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for path, rec in records.items():
        if rec.get("count", 0) > 0:  # a site the pass never reached (a decoder in head mode) is left out
            sums[path], counts[path] = rec["sum"], int(rec["count"])
    if not sums:
        raise ValueError(f"no token reached the fusion layers of '{fusion}': empty data, or nothing ran")
    rows = _rows(mm, list(sums))
    matrix = torch.stack(
        [
            sum((sums[p] for p in paths), torch.zeros(len(modules), dtype=torch.float64))
            for paths in rows.values()
        ]
    )
    totals = torch.tensor([sum(counts[p] for p in paths) for paths in rows.values()], dtype=torch.float64)
    return FusionWeights(list(rows), modules, matrix / totals[:, None], max(counts.values()))


def _run(mm: ModularModel, batch: Mapping[str, torch.Tensor]) -> None:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    device = next(mm.model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if mm.head_name is not None or _has_branch_heads(mm):
        mm(**inputs)
        return
    if getattr(getattr(mm.model, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"]
        if "attention_mask" in inputs:
            inputs["decoder_attention_mask"] = inputs["attention_mask"]
    mm.model(**inputs)


def _has_branch_heads(mm: ModularModel) -> bool:
    try:
        return mm._branch_heads() is not None
    except ValueError:  # a branch without a head: no head mode
        return False


def _rows(mm: ModularModel, paths: list[str]) -> dict[str, list[str]]:
    """Row label -> the site paths in that layer, rows in model order."""
    try:
        layers = mm.view.layers()
    except TargetError:  # a family the architecture table does not know: one row per site
        return {path: [path] for path in paths}
    several_groups = len({ref.group.path for ref in layers}) > 1
    rows: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    for path in paths:
        # the layer whose path is the longest prefix of the site's path
        owners = [
            (i, ref) for i, ref in enumerate(layers) if path == ref.path or path.startswith(ref.path + ".")
        ]
        if owners:
            i, ref = max(owners, key=lambda item: len(item[1].path))
            label = f"{ref.group.name} {ref.index}" if several_groups else str(ref.index)
        else:  # a site outside every layer (an embedding)
            i, label = -1, path
        rows.setdefault(label, []).append(path)
        order.setdefault(label, i)
    return {label: rows[label] for label in sorted(rows, key=lambda label: order[label])}


def format_table(result: FusionWeights, digits: int = 3) -> str:
    """The weights as a text table: one row per layer, one column per fused module."""
    head = ["layer", *result.modules]
    body = [
        [label, *(f"{v:.{digits}f}" for v in row.tolist())]
        for label, row in zip(result.layers, result.matrix, strict=True)
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(cells) for cells in [head, *body])


def plot_fusion_weights(result: FusionWeights, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the heatmap of AdapterFusion's Figure 5 (layers x modules, values written in the cells,
    a colour bar on the fixed scale 0..1) and write it as a PNG, atomically.

    Uses matplotlib's Agg canvas directly: no pyplot, no global backend change.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (`pip install 'modfit[plot]'`).
    """
    matrix = result.matrix.numpy()
    n_layers, n_modules = matrix.shape
    fig = new_figure(
        "the fusion heatmap", figsize=(2.2 + 1.2 * n_modules, 1.4 + 0.42 * n_layers), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(n_layers):
        for col in range(n_modules):
            value = float(matrix[row, col])
            ax.text(
                col, row, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.6 else "black"
            )
    ax.set_xticks(range(n_modules), result.modules, rotation=30 if n_modules > 4 else 0)
    ax.set_yticks(range(n_layers), result.layers)
    ax.set_xlabel("fused module")
    ax.set_ylabel("layer")
    ax.set_title(title or f"fusion weights ({result.tokens:,} tokens)")
    fig.colorbar(image, ax=ax, label="mean softmax weight")
    return save_png(fig, path)


def as_json(result: FusionWeights) -> dict[str, Any]:
    """JSON-ready form: {"layers", "modules", "weights" (rows of floats), "tokens"}."""
    return {
        "layers": result.layers,
        "modules": result.modules,
        "weights": result.matrix.tolist(),
        "tokens": result.tokens,
    }
