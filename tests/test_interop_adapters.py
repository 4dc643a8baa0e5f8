"""AdapterHub `adapters` folders without the `adapters` package: folders written here by hand in its layout
(the file names, config keys and state-dict keys adapters 1.3.0 writes, see the shared research notes)
load with the formula's outputs; modfit -> adapters -> modfit is exact for every method that converts;
refusals name the file and the field or key; `modfit convert --from/--to adapters`.

The oracle tests against the real package are in test_interop_adapters_oracle.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import modfit
from modfit.cli import main
from modfit.heads import head
from modfit.interop import InteropError, detect_format
from modfit.methods.bottleneck import HoulsbyConfig, ParallelConfig, PfeifferConfig, ScaledParallelConfig
from modfit.methods.compacter import CompacterConfig, CompacterPlusPlusConfig
from modfit.methods.fusion import FusionConfig
from modfit.methods.ia3 import Ia3Config
from modfit.methods.lora import LoraConfig
from modfit.methods.prefix import PrefixConfig
from modfit.methods.prompt import PromptConfig
from modfit.persistence import module_state

H = 32  # the tiny models' width

# adapter_config.json of `SeqBnConfig()` as adapters 1.3.0 writes it (every BnConfig field)
SEQ_BN = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "mh_adapter": False,
    "non_linearity": "relu",
    "original_ln_after": True,
    "original_ln_before": True,
    "output_adapter": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "reduction_factor": 16,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}
LORA = {
    "alpha": 8,
    "architecture": "lora",
    "attn_matrices": ["q", "v"],
    "composition_mode": "add",
    "dropout": 0.0,
    "dtype": None,
    "init_weights": "lora",
    "init_weights_seed": None,
    "intermediate_lora": False,
    "leave_out": [],
    "output_lora": False,
    "r": 4,
    "selfattn_lora": True,
    "use_dora": False,
    "use_gating": False,
    "vera_b": None,
    "vera_d": None,
}
IA3 = {
    **LORA,
    "alpha": 1,
    "r": 1,
    "attn_matrices": ["k", "v"],
    "composition_mode": "scale",
    "init_weights": "ia3",
}
IA3["intermediate_lora"] = True
HEAD = {
    "activation_function": "tanh",
    "bias": True,
    "dropout_prob": None,
    "head_type": "classification",
    "label2id": {"neg": 0, "pos": 1, "mixed": 2},
    "layers": 2,
    "num_labels": 3,
    "use_pooler": False,
}


def _write(
    folder: Path, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], pickled: bool
) -> None:
    """One adapters folder: adapter_config.json + pytorch_adapter.bin (pickle) or adapter.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = {
        "config": config,
        "hidden_size": H,
        "model_class": "BertAdapterModel",
        "model_name": "",
        "model_type": "bert",
        "name": name,
        "version": "adapters.1.3.0",
    }
    (folder / "adapter_config.json").write_text(json.dumps(wrapper))
    if pickled:
        torch.save(tensors, folder / "pytorch_adapter.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter.safetensors"))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def _patch_outputs(
    model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor, nn.LayerNorm, int], torch.Tensor]
) -> None:
    """Make every BertOutput compute LN(fn(h, r, LN, layer) + r) with h = dropout(dense(x)): the formula."""
    for i, layer in enumerate(model.encoder.layer):
        out = layer.output

        def forward(
            hidden_states: torch.Tensor, input_tensor: torch.Tensor, out: Any = out, i: int = i
        ) -> torch.Tensor:
            h = out.dropout(out.dense(hidden_states))
            return out.LayerNorm(fn(h, input_tensor, out.LayerNorm, i) + input_tensor)

        out.forward = forward


def _load(tiny: Any, folder: Path) -> tuple[nn.Module, str, Any]:
    model = tiny("bert").build()
    mm = modfit.wrap(model)
    name = mm.load(folder)
    mm.activate(name)
    return model, name, mm


def _run(model: nn.Module, tiny: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny("bert").inputs())[0]


@pytest.mark.parametrize("pickled", [True, False], ids=["bin", "safetensors"])
def test_seq_bn_folder_loads_with_the_formula(tiny: Any, tmp_path: Path, pickled: bool) -> None:
    """Pfeiffer: x = LN(h + r); h' = h + up(relu(down(x))); then the base LN(h' + r)."""
    w = {
        i: (_rand(2, H, seed=i), _rand(2, seed=i + 10), _rand(H, 2, seed=i + 20), _rand(H, seed=i + 30))
        for i in (0, 1)
    }
    tensors = {}
    for i, (dw, db, uw, ub) in w.items():
        base = f"bert.encoder.layer.{i}.output.adapters.seq."
        tensors.update(
            {base + "adapter_down.0.weight": dw, base + "adapter_down.0.bias": db}
            | {base + "adapter_up.weight": uw, base + "adapter_up.bias": ub}
        )
    _write(tmp_path, "seq", SEQ_BN, tensors, pickled)
    assert detect_format(tmp_path) is not None and detect_format(tmp_path).name == "adapters"
    model, name, mm = _load(tiny, tmp_path)
    assert name == "seq" and mm.records[name].config.method == "pfeiffer"

    def formula(h: torch.Tensor, r: torch.Tensor, ln: nn.LayerNorm, i: int) -> torch.Tensor:
        dw, db, uw, ub = w[i]
        x = ln(h + r)
        return h + torch.relu(x @ dw.T + db) @ uw.T + ub

    expected = tiny("bert").build()
    _patch_outputs(expected, formula)
    assert torch.allclose(_run(model, tiny), _run(expected, tiny), atol=1e-6)


def test_par_bn_folder_with_scaling_and_leave_out(tiny: Any, tmp_path: Path) -> None:
    """Parallel: h' = h + s · up(relu(down(r))), layer 0 left out."""
    dw, db, uw, ub = _rand(16, H, seed=1), _rand(16, seed=2), _rand(H, 16, seed=3), _rand(H, seed=4)
    base = "encoder.layer.1.output.adapters.par."  # a bare model's keys: no "bert." prefix
    tensors = {base + "adapter_down.0.weight": dw, base + "adapter_down.0.bias": db}
    tensors |= {base + "adapter_up.weight": uw, base + "adapter_up.bias": ub}
    config = {**SEQ_BN, "is_parallel": True, "original_ln_before": False, "reduction_factor": 2}
    _write(
        tmp_path,
        "par",
        config | {"scaling": 4.0, "leave_out": [0], "init_weights": "mam_adapter"},
        tensors,
        True,
    )
    model, name, mm = _load(tiny, tmp_path)
    assert mm.records[name].config.method == "scaled_parallel" and mm.records[name].config.layers == (1,)

    def formula(h: torch.Tensor, r: torch.Tensor, ln: nn.LayerNorm, i: int) -> torch.Tensor:
        return h + 4.0 * (torch.relu(r @ dw.T + db) @ uw.T + ub) if i == 1 else h

    expected = tiny("bert").build()
    _patch_outputs(expected, formula)
    assert torch.allclose(_run(model, tiny), _run(expected, tiny), atol=1e-6)


def test_lora_and_ia3_folders_load_with_the_formula(tiny: Any, tmp_path: Path) -> None:
    """LoRA: W' = W + (alpha / r) B A on query and value; IA3: outputs of key, value, intermediate.dense
    scaled by alpha · l."""
    lora = {}
    expected = tiny("bert").build()
    for i, layer in enumerate(expected.encoder.layer):
        for j, proj in enumerate(("query", "value")):
            a, b = _rand(4, H, seed=10 * i + j), _rand(H, 4, seed=10 * i + j + 5)
            key = f"bert.encoder.layer.{i}.attention.self.{proj}.loras.lo."
            lora |= {key + "lora_A": a, key + "lora_B": b}
            with torch.no_grad():
                getattr(layer.attention.self, proj).weight += 2.0 * b @ a
    _write(tmp_path / "lo", "lo", LORA, lora, False)
    model, name, mm = _load(tiny, tmp_path / "lo")
    assert mm.records[name].config.method == "lora" and mm.records[name].config.targets == ("query", "value")
    assert torch.allclose(_run(model, tiny), _run(expected, tiny), atol=1e-5)

    ia3, expected = {}, tiny("bert").build()
    for i, layer in enumerate(expected.encoder.layer):
        for path, proj in (
            ("attention.self.key", layer.attention.self.key),
            ("attention.self.value", layer.attention.self.value),
            ("intermediate.dense", layer.intermediate.dense),
        ):
            vec = 1 + _rand(proj.out_features, 1, seed=i + proj.out_features)
            ia3[f"bert.encoder.layer.{i}.{path}.loras.ia.lora_B"] = vec
            with torch.no_grad():  # alpha 2: the scaling is 2 · l
                proj.weight *= 2 * vec
                proj.bias *= 2 * vec[:, 0]
    _write(tmp_path / "ia", "ia", IA3 | {"alpha": 2}, ia3, True)
    model, name, mm = _load(tiny, tmp_path / "ia")
    assert mm.records[name].config.method == "ia3"
    assert torch.allclose(_run(model, tiny), _run(expected, tiny), atol=1e-5)


def test_classification_head_folder(tiny: Any, tmp_path: Path) -> None:
    """heads.<n>.1 = dense, .4 = out: logits = out(tanh(dense(hidden[:, 0]))), labels from label2id."""
    dense_w, dense_b, out_w, out_b = (
        _rand(H, H, seed=1),
        _rand(H, seed=2),
        _rand(3, H, seed=3),
        _rand(3, seed=4),
    )
    zero_lora = {
        f"bert.encoder.layer.{i}.attention.self.{p}.loras.cls.{m}": torch.zeros(
            (4, H) if m == "lora_A" else (H, 4)
        )
        for i in (0, 1)
        for p in ("query", "value")
        for m in ("lora_A", "lora_B")
    }
    _write(tmp_path, "cls", LORA, zero_lora, True)
    head_wrapper = {
        "config": HEAD,
        "hidden_size": H,
        "model_class": "BertAdapterModel",
        "model_name": "",
        "model_type": "bert",
        "name": "cls",
        "version": "adapters.1.3.0",
    }
    (tmp_path / "head_config.json").write_text(json.dumps(head_wrapper))
    torch.save(
        {
            "heads.cls.1.weight": dense_w,
            "heads.cls.1.bias": dense_b,
            "heads.cls.4.weight": out_w,
            "heads.cls.4.bias": out_b,
        },
        tmp_path / "pytorch_model_head.bin",
    )
    _, name, mm = _load(tiny, tmp_path)
    record = mm.records[name]
    assert (
        record.head is not None
        and record.head.labels == ("neg", "pos", "mixed")
        and record.head.pooling == "first"
    )
    inputs = tiny("bert").encoder_inputs()
    with torch.no_grad():
        logits = mm(**inputs)
        hidden = tiny("bert").build()(**inputs)[0]
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    expected = torch.tanh(hidden[:, 0] @ dense_w.T + dense_b) @ out_w.T + out_b
    assert torch.allclose(logits, expected, atol=1e-5)


# -- modfit -> adapters -> modfit --------------------------------------------------------------------

ROUND_TRIP: list[tuple[str, Any, Any]] = [
    ("pfeiffer", PfeifferConfig(ln_before=True, use_gating=True, scaling="learned"), None),
    (
        "houlsby",
        HoulsbyConfig(ln_after=True, scaling="channel", layers=(1,)),
        head("seq-cls", ["a", "b", "c"], pooling="first"),
    ),
    ("parallel", ParallelConfig(ln_after=True), head("token-cls", ["x", "y"])),
    ("scaled_parallel", ScaledParallelConfig(), None),
    ("compacter", CompacterConfig(reduction_factor=8), None),
    (
        "compacter++",
        CompacterPlusPlusConfig(reduction_factor=8, shared_W_phm=True, factorized_phm_rule=True),
        None,
    ),
    ("lora", LoraConfig(r=4, alpha=8, targets=("query", "value", "ffn_in", "ffn_out")), None),
    ("lora_gated", LoraConfig(r=4, alpha=4, use_gating=True, layers=(0,)), None),
    ("ia3", Ia3Config(targets=("key", "value", "ffn_in"), feedforward=()), None),
    ("prefix_flat", PrefixConfig(num_virtual_tokens=3), None),
    ("prefix_mlp", PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8), None),
]


def _forward(mm: Any, tiny: Any, with_head: bool) -> torch.Tensor:
    with torch.no_grad():
        if with_head:
            out = mm(**tiny("bert").encoder_inputs())
            return out if isinstance(out, torch.Tensor) else out.logits
        return mm.model(**tiny("bert").inputs())[0]


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", ROUND_TRIP, ids=[c[0] for c in ROUND_TRIP])
def test_round_trip_is_exact(
    case: tuple[str, Any, Any], safetensors: bool, tiny: Any, tmp_path: Path
) -> None:
    _, config, head_config = case
    mm = modfit.wrap(tiny("bert").build())
    mm.add("m", config, head_config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in module_state(mm, "m").values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    mm.activate("m")
    before = _forward(mm, tiny, head_config is not None)
    mm.save("m", tmp_path, format="adapters", use_safetensors=safetensors)
    weights = "adapter.safetensors" if safetensors else "pytorch_adapter.bin"
    assert (tmp_path / weights).is_file() and json.loads((tmp_path / "adapter_config.json").read_text())[
        "name"
    ] == "m"
    if head_config is not None:
        assert (tmp_path / ("model_head.safetensors" if safetensors else "pytorch_model_head.bin")).is_file()
    mm2 = modfit.wrap(tiny("bert").build())
    name = mm2.load(tmp_path)
    mm2.activate(name)
    assert mm2.records[name].config.method == config.method
    state, state2 = module_state(mm, "m"), module_state(mm2, name)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(before, _forward(mm2, tiny, head_config is not None))


def test_keys_are_adapters_own(tiny: Any, tmp_path: Path) -> None:
    """The exact names adapters uses: the family prefix, the adapter name inside the key, the norm twice."""
    mm = modfit.wrap(tiny("bert").build())
    mm.add("pf", PfeifferConfig(ln_before=True))
    mm.add("cp", CompacterPlusPlusConfig(reduction_factor=8))
    mm.add("pre", PrefixConfig(num_virtual_tokens=3))
    for name in ("pf", "cp", "pre"):
        mm.save(name, tmp_path / name, format="adapters")
    keys = set(load_file(str(tmp_path / "pf" / "adapter.safetensors")))
    base = "bert.encoder.layer.0.output.adapters.pf."
    assert {
        base + k
        for k in (
            "adapter_norm_before.weight",
            "adapter_down.0.weight",
            "adapter_down.1.weight",
            "adapter_up.weight",
        )
    } <= keys
    keys = set(load_file(str(tmp_path / "cp" / "adapter.safetensors")))
    assert (
        "bert.shared_parameters.cp.phm_rule" in keys
        and "bert.encoder.layer.1.output.adapters.cp.adapter_down.0.W_left" in keys
    )
    assert not any(k.endswith("phm_rule") and ".adapters." in k for k in keys)
    prefix = load_file(str(tmp_path / "pre" / "adapter.safetensors"))
    assert list(prefix) == ["bert.prefix_tuning.prefix_tunings.pre.self_prefix.control_trans"]
    assert prefix["bert.prefix_tuning.prefix_tunings.pre.self_prefix.control_trans"].shape == (3 * 2 * 2 * H,)
    config = json.loads((tmp_path / "cp" / "adapter_config.json").read_text())["config"]
    assert (
        config["phm_layer"]
        and config["output_adapter"]
        and not config["mh_adapter"]
        and config["reduction_factor"] == 8
    )


def test_fusion_round_trip(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    for name in ("a", "b"):
        mm.add(name, HoulsbyConfig())
    mm.add("ab", FusionConfig(children=("a", "b")))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in ("a", "b"):
            for t in module_state(mm, name).values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        for _, unit in mm.units("ab"):
            for t in (unit.query.weight, unit.query.bias, unit.key.weight):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    mm.activate("fuse(a, b)")
    before = _forward(mm, tiny, False)
    for name in ("a", "b", "ab"):
        mm.save(name, tmp_path / name, format="adapters")
    config = json.loads((tmp_path / "ab" / "adapter_fusion_config.json").read_text())
    assert (
        config["adapter_names"] == ["a", "b"]
        and config["name"] == "a,b"
        and config["config"]["value"] is False
    )
    keys = set(load_file(str(tmp_path / "ab" / "model_adapter_fusion.safetensors")))
    assert "bert.encoder.layer.0.attention.output.adapter_fusion_layer.a,b.query.weight" in keys
    mm2 = modfit.wrap(tiny("bert").build())
    with pytest.raises(InteropError, match="fuses 'a', which is not on this model"):
        mm2.load(tmp_path / "ab")
    for name in ("a", "b", "ab"):
        mm2.load(tmp_path / name)
    mm2.activate("fuse(a, b)")
    assert torch.equal(before, _forward(mm2, tiny, False))


# -- refusals ----------------------------------------------------------------------------------------


def _one_adapter(tmp_path: Path, config: dict[str, Any], name: str = "x") -> Path:
    tensors = {
        f"bert.encoder.layer.{i}.output.adapters.{name}.{k}": v
        for i in (0, 1)
        for k, v in (
            ("adapter_down.0.weight", _rand(2, H)),
            ("adapter_down.0.bias", _rand(2)),
            ("adapter_up.weight", _rand(H, 2)),
            ("adapter_up.bias", _rand(H)),
        )
    }
    _write(tmp_path, name, config, tensors, True)
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"original_ln_after": False}, '"config.original_ln_after" is False'),
        ({"residual_before_ln": "post_add"}, "\"config.residual_before_ln\" is 'post_add'"),
        ({"ln_after": True}, '"config.adapter_residual_before_ln" is false with "ln_after"'),
        ({"inv_adapter": "nice"}, '"config.inv_adapter"'),
        ({"stochastic_depth": 0.1}, '"config.stochastic_depth" is 0.1'),
        ({"reduction_factor": {"0": 16, "default": 8}}, '"config.reduction_factor"'),
        ({"non_linearity": "leakyrelu"}, '"config.non_linearity"'),
        ({"architecture": "reft"}, '"config.architecture" is "reft"'),
        ({"architecture": "prompt_tuning"}, "after the embedding layer"),
    ],
)
def test_refusals_name_the_field(tiny: Any, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    folder = _one_adapter(tmp_path, {**SEQ_BN, **change})
    mm = modfit.wrap(tiny("bert").build())
    with pytest.raises(InteropError, match=r"adapter_config\.json") as raised:
        mm.load(folder)
    assert message in str(raised.value) and not mm.records


def test_refusals_of_files_and_keys(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    folder = _one_adapter(tmp_path / "key", SEQ_BN)
    tensors = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    tensors["bert.encoder.layer.0.output.adapters.x.adapter_upp.weight"] = tensors.pop(
        "bert.encoder.layer.0.output.adapters.x.adapter_up.weight"
    )
    torch.save(tensors, folder / "pytorch_adapter.bin")
    with pytest.raises(
        InteropError, match=r"pytorch_adapter.bin: bert.encoder.layer.0.output.adapters.x.adapter_upp.weight"
    ):
        mm.load(folder)
    # a pickle that is more than tensors is not unpickled
    torch.save({"w": torch.zeros(1), "evil": Path("x")}, folder / "pytorch_adapter.bin")
    with pytest.raises(InteropError, match="cannot read as a weights-only torch file"):
        mm.load(folder)
    (folder / "pytorch_adapter.bin").unlink()
    with pytest.raises(InteropError, match=r"neither adapter\.safetensors nor pytorch_adapter\.bin"):
        mm.load(folder)
    legacy = _one_adapter(tmp_path / "legacy", SEQ_BN)
    wrapper = json.loads((legacy / "adapter_config.json").read_text())
    (legacy / "adapter_config.json").write_text(json.dumps({**wrapper, "version": "3.2.1"}))
    with pytest.raises(InteropError, match="adapter-transformers"):
        mm.load(legacy)
    dora = tmp_path / "dora"
    _write(dora, "d", {**LORA, "use_dora": True}, {}, False)
    with pytest.raises(InteropError, match=r'"config\.use_dora" is true: adapters\' DoRA rescales the bias'):
        mm.load(dora)
    fusion = tmp_path / "fusion"
    fusion.mkdir()
    dynamic = {
        "key": True,
        "query": True,
        "value": True,
        "query_before_ln": False,
        "regularization": True,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": True,
        "dropout_prob": None,
    }
    (fusion / "adapter_fusion_config.json").write_text(
        json.dumps({"adapter_names": ["a", "b"], "config": dynamic, "name": "a,b", "model_type": "bert"})
    )
    torch.save({}, fusion / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(
        InteropError, match=r'"config\.value" is true: adapters adds the residual outside its value'
    ):
        mm.load(fusion)
    assert not mm.records


def test_export_refusals_name_the_setting(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    for name, config, head_config, message in [
        ("ia", Ia3Config(), None, "scaled at its input (ia3.feedforward)"),
        ("rs", LoraConfig(rslora=True), None, "lora.rslora"),
        ("ao", LoraConfig(targets=("attn_out",)), None, "is not a projection adapters adapts"),
        ("pm", PromptConfig(num_virtual_tokens=2, init="random"), None, "after the embedding layer"),
        ("mean", PfeifferConfig(), head("seq-cls", ["a", "b"]), "head.pooling is 'mean'"),
        ("mlm", PfeifferConfig(), head("mlm"), "adapters has no head for modfit's mlm head"),
    ]:
        mm.add(name, config, head_config)
        with pytest.raises(InteropError, match=message.replace("(", r"\(").replace(")", r"\)")):
            mm.save(name, tmp_path / name, format="adapters")
        assert not (tmp_path / name).exists()
    mm.save("mean", tmp_path / "dropped", format="adapters", drop_head=True)
    assert not (tmp_path / "dropped" / "head_config.json").exists()
    for name in ("a", "b"):
        mm.add(name, HoulsbyConfig())
    mm.add("ab", FusionConfig(children=("a", "b")))
    with torch.no_grad():
        next(unit for _, unit in mm.units("ab")).value.weight.mul_(2)
    with pytest.raises(InteropError, match=r"value map at \S+ is not the identity"):
        mm.save("ab", tmp_path / "ab", format="adapters")
    gpt2 = modfit.wrap(tiny("gpt2").build())
    gpt2.add("g", LoraConfig(targets=("c_attn",)))
    with pytest.raises(InteropError, match="not 'gpt2'"):
        gpt2.save("g", tmp_path / "g", format="adapters")


def test_cli_convert_both_ways(tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir = tmp_path / "base"
    tiny("bert").build().save_pretrained(str(base_dir))
    adapter = _one_adapter(tmp_path / "seq", SEQ_BN, name="seq")
    module = tmp_path / "module"
    assert (
        main(["convert", "--from", "adapters", str(adapter), "--out", str(module), "--base", str(base_dir)])
        == 0
    )
    card = json.loads((module / "module.json").read_text())
    assert card["method"] == "pfeiffer" and card["name"] == "module"
    again = tmp_path / "again"
    assert (
        main(
            [
                "convert",
                "--to",
                "adapters",
                str(module),
                "--out",
                str(again),
                "--base",
                str(base_dir),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["to"] == "adapters"
    original = torch.load(adapter / "pytorch_adapter.bin", weights_only=True)
    written = load_file(str(again / "adapter.safetensors"))
    renamed = {k.replace(".adapters.seq.", ".adapters.module."): v for k, v in original.items()}
    assert renamed.keys() == written.keys() and all(torch.equal(renamed[k], written[k]) for k in renamed)
    assert json.loads((again / "adapter_config.json").read_text())["config"] == {
        **SEQ_BN,
        "architecture": None,
        "init_weights": "bert",
    } | {"reduction_factor": 16}
    bad = tmp_path / "bad"
    _one_adapter(tmp_path / "broken", {**SEQ_BN, "original_ln_after": False})
    assert (
        main(
            [
                "convert",
                "--from",
                "adapters",
                str(tmp_path / "broken"),
                "--out",
                str(bad),
                "--base",
                str(base_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("modfit: error: ") and '"config.original_ln_after"' in err and not bad.exists()
