"""modfit against the real AdapterHub `adapters` 1.3.0 (skipped where it is not installed; run them in the
peer venv: `make peer-test`): the same weights give the same outputs (max abs difference <= 1e-5), both
directions, for bottleneck adapters (seq_bn, double_seq_bn, par_bn, scaled_par_bn with their layer-norm,
residual, scaling and gating options), Compacter / Compacter++, LoRA (incl. gated), IA3, prefix tuning
(MLP and flat), classification and tagging heads, and an AdapterFusion.

adapters -> modfit: adapters builds the adapter on a tiny BERT (`adapters.init`, or `BertAdapterModel` for
heads), randomises it and saves it (`save_adapter`); modfit loads the folder with `mm.load`.
modfit -> adapters: modfit builds and randomises, saves with `format="adapters"`, adapters loads it with
`load_adapter(..., use_safetensors=True)` (or the `.bin` default, `use_safetensors=False`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import modfit
from modfit.heads import head
from modfit.methods.bottleneck import HoulsbyConfig, ParallelConfig, PfeifferConfig, ScaledParallelConfig
from modfit.methods.compacter import CompacterConfig, CompacterPlusPlusConfig
from modfit.methods.ia3 import Ia3Config
from modfit.methods.lora import LoraConfig
from modfit.methods.prefix import PrefixConfig
from modfit.persistence import module_state

adapters = pytest.importorskip("adapters")

if TYPE_CHECKING:
    from conftest import Family

TOL = 1e-5


def _ah(kind: str, **kw: Any) -> Any:
    return getattr(adapters, kind)(**kw)


# (id, adapters config, modfit config): the same computation
CASES: list[tuple[str, Any, Any]] = [
    ("seq_bn", lambda: _ah("SeqBnConfig"), PfeifferConfig()),
    (
        "seq_bn_ln_before_gating_learned",
        lambda: _ah("SeqBnConfig", ln_before=True, use_gating=True, scaling="learned"),
        PfeifferConfig(ln_before=True, use_gating=True, scaling="learned"),
    ),
    (
        "seq_bn_residual_after_ln",
        lambda: _ah("SeqBnConfig", residual_before_ln=False, non_linearity="gelu", reduction_factor=4),
        PfeifferConfig(residual_before_ln=False, activation="gelu", reduction_factor=4),
    ),
    ("double_seq_bn", lambda: _ah("DoubleSeqBnConfig"), HoulsbyConfig()),
    (
        "double_seq_bn_ln_after_channel_leave_out",
        lambda: _ah(
            "DoubleSeqBnConfig",
            ln_after=True,
            adapter_residual_before_ln=True,
            scaling="channel",
            leave_out=[0],
        ),
        HoulsbyConfig(ln_after=True, scaling="channel", layers=(1,)),
    ),
    ("par_bn", lambda: _ah("ParBnConfig", scaling=1.0), ParallelConfig(reduction_factor=2)),
    ("scaled_par_bn", lambda: _ah("ParBnConfig"), ScaledParallelConfig(reduction_factor=2)),
    (
        "par_bn_norms_gating",
        lambda: _ah("ParBnConfig", ln_before=True, ln_after=True, use_gating=True, scaling=2.0),
        ParallelConfig(reduction_factor=2, ln_before=True, ln_after=True, use_gating=True, scaling=2.0),
    ),
    ("compacter", lambda: _ah("CompacterConfig", reduction_factor=8), CompacterConfig(reduction_factor=8)),
    (
        "compacter++",
        lambda: _ah("CompacterPlusPlusConfig", reduction_factor=8),
        CompacterPlusPlusConfig(reduction_factor=8),
    ),
    (
        "compacter_own_rules_full_W",
        lambda: _ah("CompacterConfig", reduction_factor=8, shared_phm_rule=False, factorized_phm_W=False),
        CompacterConfig(reduction_factor=8, shared_phm_rule=False, factorized_phm_W=False),
    ),
    (
        "compacter_shared_W",
        lambda: _ah(
            "CompacterPlusPlusConfig", reduction_factor=8, shared_W_phm=True, factorized_phm_rule=True
        ),
        CompacterPlusPlusConfig(reduction_factor=8, shared_W_phm=True, factorized_phm_rule=True),
    ),
    (
        "lora",
        lambda: _ah(
            "LoRAConfig",
            r=4,
            alpha=8,
            attn_matrices=["q", "k", "v"],
            intermediate_lora=True,
            output_lora=True,
        ),
        LoraConfig(r=4, alpha=8, targets=("query", "key", "value", "ffn_in", "ffn_out")),
    ),
    (
        "lora_gated_leave_out",
        lambda: _ah("LoRAConfig", r=4, alpha=4, use_gating=True, leave_out=[1]),
        LoraConfig(r=4, alpha=4, use_gating=True, layers=(0,)),
    ),
    ("ia3", lambda: _ah("IA3Config"), Ia3Config(targets=("key", "value", "ffn_in"), feedforward=())),
    (
        "prefix",
        lambda: _ah("PrefixTuningConfig", prefix_length=3, bottleneck_size=8),
        PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
    ),
    (
        "prefix_flat",
        lambda: _ah("PrefixTuningConfig", prefix_length=3, flat=True),
        PrefixConfig(num_virtual_tokens=3),
    ),
]
# adapters cannot write these with safetensors itself (tensors saved twice share memory)
BIN_ONLY = {"seq_bn_ln_before_gating_learned", "par_bn_norms_gating", "prefix", "prefix_flat"}


@torch.no_grad()
def _randomise(tensors: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def _adapter_params(model: torch.nn.Module, name: str) -> list[torch.Tensor]:
    return [
        p
        for n, p in model.named_parameters()
        if any(
            f"{part}.{name}." in n or n.endswith(f"{part}.{name}")
            for part in ("adapters", "loras", "prefix_tunings", "shared_parameters", "heads")
        )
        or f"adapter_fusion_layer.{name}." in n
    ]


def _run(model: torch.nn.Module, family: Family, **kw: Any) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**family.inputs(), **kw)
    return out[0] if not isinstance(out, torch.Tensor) else out


def _record(label: str, diff: float) -> float:
    print(f"max-abs-diff {label}: {diff:.3g}")
    return diff


def _changes(family: Family, output: torch.Tensor) -> None:
    base = _run(family.build(), family)
    assert float((output - base).abs().max()) > 1e-3


def _ah_model(family: Family) -> Any:
    model = family.build()
    adapters.init(model)
    return model


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_adapters_to_modfit(
    case: tuple[str, Any, Any], tiny: Callable[[str], Family], tmp_path: Path
) -> None:
    label, make, _ = case
    family = tiny("bert")
    # adapters saves a Compacter's shared tensors only from a model with the family prefix
    am = _head_model(family) if label.startswith("compacter") else _ah_model(family)
    am.add_adapter("x", config=make())
    _randomise(_adapter_params(am, "x"), 1)
    am.set_active_adapters("x")
    am.eval()
    theirs = _run(am, family)
    _changes(family, theirs)
    am.save_adapter(str(tmp_path), "x", use_safetensors=label not in BIN_ONLY)
    model = family.build()
    mm = modfit.wrap(model)
    name = mm.load(tmp_path)
    mm.activate(name)
    ours = _run(model, family)
    assert _record(f"adapters->modfit {label}", float((ours - theirs).abs().max())) <= TOL


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_modfit_to_adapters(
    case: tuple[str, Any, Any], safetensors: bool, tiny: Callable[[str], Family], tmp_path: Path
) -> None:
    label, _, config = case
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("x", config)
    _randomise(list(module_state(mm, "x").values()), 2)
    mm.activate("x")
    ours = _run(model, family)
    _changes(family, ours)
    mm.save("x", tmp_path, format="adapters", use_safetensors=safetensors)
    am = _ah_model(family)
    am.load_adapter(str(tmp_path), set_active=True, use_safetensors=safetensors)
    am.eval()
    theirs = _run(am, family)
    assert (
        _record(
            f"modfit->adapters {label} ({'st' if safetensors else 'bin'})", float((ours - theirs).abs().max())
        )
        <= TOL
    )


# -- heads -------------------------------------------------------------------------------------------


def _head_model(family: Family) -> Any:
    model = adapters.BertAdapterModel(family.build().config)
    missing, unexpected = model.bert.load_state_dict(family.build().state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prompt_tuning.") for k in missing)  # adapters' own tied copy
    return model.eval()


HEADS = [("classification", "seq-cls", 3), ("tagging", "token-cls", 4)]


@pytest.mark.parametrize("kind", HEADS, ids=[h[0] for h in HEADS])
def test_head_both_directions(
    kind: tuple[str, str, int], tiny: Callable[[str], Family], tmp_path: Path
) -> None:
    head_type, task, n = kind
    family = tiny("bert")
    inputs = family.encoder_inputs()
    # adapters -> modfit
    am = _head_model(family)
    am.add_adapter("h", config=adapters.SeqBnConfig())
    labels = {i: f"L{i}" for i in range(n)}
    adder = am.add_classification_head if head_type == "classification" else am.add_tagging_head
    adder("h", num_labels=n, id2label=labels)
    _randomise(_adapter_params(am, "h"), 3)
    am.set_active_adapters("h")
    am.eval()
    with torch.no_grad():
        theirs = am(**inputs).logits
    am.save_adapter(str(tmp_path / "ah"), "h", with_head=True, use_safetensors=True)
    model = family.build()
    mm = modfit.wrap(model)
    name = mm.load(tmp_path / "ah")
    assert mm.records[name].head is not None and mm.records[name].head.labels == tuple(labels.values())
    mm.activate(name)
    with torch.no_grad():
        ours = mm(**inputs)
    ours = ours if isinstance(ours, torch.Tensor) else ours.logits
    assert _record(f"adapters->modfit {head_type} head", float((ours - theirs).abs().max())) <= TOL
    # modfit -> adapters
    mm2 = modfit.wrap(family.build())
    mm2.add("g", PfeifferConfig(), head(task, [f"c{i}" for i in range(n)], pooling="first"))
    _randomise(list(module_state(mm2, "g").values()), 4)
    mm2.activate("g")
    with torch.no_grad():
        ours2 = mm2(**inputs)
    ours2 = ours2 if isinstance(ours2, torch.Tensor) else ours2.logits
    mm2.save("g", tmp_path / "mf", format="adapters")
    am2 = _head_model(family)
    am2.load_adapter(str(tmp_path / "mf"), set_active=True, use_safetensors=True)
    am2.eval()
    with torch.no_grad():
        theirs2 = am2(**inputs).logits
    assert _record(f"modfit->adapters {head_type} head", float((ours2 - theirs2).abs().max())) <= TOL


# -- fusion ------------------------------------------------------------------------------------------

FUSION_CHILDREN = [("double_seq_bn", "DoubleSeqBnConfig"), ("seq_bn", "SeqBnConfig")]


@pytest.mark.parametrize("child", FUSION_CHILDREN, ids=[c[0] for c in FUSION_CHILDREN])
def test_fusion_both_directions(
    child: tuple[str, str], tiny: Callable[[str], Family], tmp_path: Path
) -> None:
    label, ah_kind = child
    family = tiny("bert")
    # adapters -> modfit: a static fusion (value: false), the query read before the LayerNorm
    am = _ah_model(family)
    for n in ("a", "b"):
        am.add_adapter(n, config=_ah(ah_kind))
    fusion_config = adapters.AdapterFusionConfig.load("static", query_before_ln=True)
    am.add_adapter_fusion(adapters.composition.Fuse("a", "b"), config=fusion_config)
    for i, n in enumerate(("a", "b", "a,b")):
        _randomise(_adapter_params(am, n), 10 + i)
    am.set_active_adapters(adapters.composition.Fuse("a", "b"))
    am.eval()
    theirs = _run(am, family)
    for n in ("a", "b"):
        am.save_adapter(str(tmp_path / n), n, use_safetensors=True)
    am.save_adapter_fusion(str(tmp_path / "ab"), "a,b", use_safetensors=True)
    model = family.build()
    mm = modfit.wrap(model)
    for n in ("a", "b"):
        mm.load(tmp_path / n)
    fused = mm.load(tmp_path / "ab")
    mm.activate("fuse(a, b)")
    ours = _run(model, family)
    _changes(family, ours)
    assert mm.records[fused].config.method == "fusion"
    assert _record(f"adapters->modfit fusion of {label}", float((ours - theirs).abs().max())) <= TOL
    # modfit -> adapters: the loaded fusion (identity value map) with retrained query and key
    with torch.no_grad():
        for _, unit in mm.units(fused):
            _randomise([unit.query.weight, unit.key.weight, unit.key.bias], 20)
    ours2 = _run(model, family)
    assert float((ours2 - ours).abs().max()) > 1e-4  # the fusion weights matter
    out = tmp_path / "out"
    for n in ("a", "b"):
        mm.save(n, out / n, format="adapters")
    mm.save(fused, out / "ab", format="adapters")
    am2 = _ah_model(family)
    for n in ("a", "b"):
        am2.load_adapter(str(out / n), use_safetensors=True)
    am2.load_adapter_fusion(str(out / "ab"), use_safetensors=True, set_active=True)
    am2.eval()
    theirs2 = _run(am2, family)
    assert _record(f"modfit->adapters fusion of {label}", float((ours2 - theirs2).abs().max())) <= TOL


# -- the other BERT-layout families ------------------------------------------------------------------

OTHER = [c for c in CASES if c[0] in ("double_seq_bn", "par_bn_norms_gating", "lora", "ia3", "prefix")]


@pytest.mark.parametrize("family_name", ["roberta", "xlm-roberta", "electra"])
@pytest.mark.parametrize("case", OTHER, ids=[c[0] for c in OTHER])
def test_other_families_both_directions(
    case: tuple[str, Any, Any], family_name: str, tiny: Callable[[str], Family], tmp_path: Path
) -> None:
    label, make, config = case
    family = tiny(family_name)
    am = _ah_model(family)
    am.add_adapter("x", config=make())
    _randomise(_adapter_params(am, "x"), 1)
    am.set_active_adapters("x")
    am.eval()
    theirs = _run(am, family)
    am.save_adapter(str(tmp_path / "ah"), "x", use_safetensors=label not in BIN_ONLY)
    model = family.build()
    mm = modfit.wrap(model)
    mm.activate(mm.load(tmp_path / "ah"))
    diff = float((_run(model, family) - theirs).abs().max())
    assert _record(f"adapters->modfit {label} ({family_name})", diff) <= TOL
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("y", config)
    _randomise(list(module_state(mm, "y").values()), 2)
    mm.activate("y")
    ours = _run(model, family)
    _changes(family, ours)
    mm.save("y", tmp_path / "mf", format="adapters")
    am = _ah_model(family)
    am.load_adapter(str(tmp_path / "mf"), set_active=True, use_safetensors=True)
    am.eval()
    diff = float((ours - _run(am, family)).abs().max())
    assert _record(f"modfit->adapters {label} ({family_name})", diff) <= TOL
