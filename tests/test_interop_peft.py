"""PEFT's checkpoint format without PEFT installed: folders laid out exactly as PEFT 0.21.2 writes them
(config keys, key names, shapes; see shared/research/anchors.md §2a) load with `mm.load` and give the
outputs of the method's formula, computed here on the base weights; modfit -> PEFT -> modfit is exact;
what cannot be expressed is refused naming the file and the key or field. (The comparison with the real
PEFT is tests/test_interop_peft_oracle.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modfit
from modfit.cli import main
from modfit.interop import InteropError, detect_format
from modfit.persistence import module_state

P = "base_model.model."
# adapter_config.json of a LoRA as PEFT 0.21.2 writes it (get_peft_model(BertModel, LoraConfig(...)))
LORA_CONFIG: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": {
        "base_model_class": "BertModel",
        "parent_library": "transformers.models.bert.modeling_bert",
    },
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 4,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["value", "query"],
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
IA3_CONFIG: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "feedforward_modules": ["output.dense"],
    "inference_mode": True,
    "init_ia3_weights": True,
    "modules_to_save": None,
    "peft_type": "IA3",
    "peft_version": "0.21.2",
    "revision": None,
    "target_modules": ["key", "value", "output.dense"],
    "task_type": None,
}
PROMPT_CONFIG: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "modules_to_save": None,
    "num_attention_heads": 4,
    "num_layers": 2,
    "num_transformer_submodules": 1,
    "num_virtual_tokens": 3,
    "peft_type": "PROMPT_TUNING",
    "peft_version": "0.21.2",
    "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_text": None,
    "revision": None,
    "task_type": "FEATURE_EXTRACTION",
    "token_dim": 32,
    "tokenizer_kwargs": None,
    "tokenizer_name_or_path": None,
}
PREFIX_CONFIG: dict[str, Any] = {
    **{
        k: PROMPT_CONFIG[k] for k in ("auto_mapping", "base_model_name_or_path", "inference_mode", "revision")
    },
    "encoder_hidden_size": 32,
    "init_weights": None,
    "modules_to_save": None,
    "num_attention_heads": 4,
    "num_layers": 2,
    "num_transformer_submodules": 1,
    "num_virtual_tokens": 3,
    "peft_type": "PREFIX_TUNING",
    "peft_version": "0.21.2",
    "prefix_projection": True,
    "task_type": "CAUSAL_LM",
    "token_dim": 32,
}


def write_peft(
    folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], bin: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if bin:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def _loaded_output(family: Any, folder: Path) -> torch.Tensor:
    mm = modfit.wrap(family.build())
    mm.activate(mm.load(folder))
    with torch.no_grad():
        return family.run(mm.model)


def _lora_tensors(
    model: nn.Module, names: list[str], ranks: dict[str, int], dora: bool = False
) -> dict[str, Any]:
    """Random A, B (and magnitudes) for PEFT module names; returns tensors (PEFT keys)."""
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        weight = module.weight
        in_f, out_f = (
            (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else weight.shape[::-1]
        )
        r = ranks.get(name, 4)
        out[f"{P}{name}.lora_A.weight"] = _rand(r, in_f, seed=2 * i)
        out[f"{P}{name}.lora_B.weight"] = _rand(out_f, r, seed=2 * i + 1)
        if dora:
            out[f"{P}{name}.lora_magnitude_vector"] = _rand(out_f, seed=100 + i).abs() + 0.5
    return out


@torch.no_grad()
def _apply_lora(
    model: nn.Module, tensors: dict[str, Any], scale: dict[str, float], dora: bool = False
) -> None:
    """W' = W + s·BA (transposed for Conv1D); DoRA: W' = m ⊙ (W + s·BA) / ||W + s·BA|| per output row."""
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        name = key[len(P) : -len(".lora_A.weight")]
        module = model.get_submodule(name)
        delta = scale[name] * tensors[f"{P}{name}.lora_B.weight"] @ tensors[key]  # (out, in)
        conv1d = type(module).__name__ == "Conv1D"
        w = module.weight.t() if conv1d else module.weight  # (out, in)
        new = w + delta
        if dora:
            m = tensors[f"{P}{name}.lora_magnitude_vector"]
            new = m[:, None] * new / new.norm(dim=1, keepdim=True)
        module.weight.copy_(new.t() if conv1d else new)


LORA_CASES = {
    "plain": ("bert", {}, ["query", "value"], {}),
    "rslora": ("bert", {"use_rslora": True, "lora_alpha": 6}, ["query", "value"], {}),
    "dora": ("bert", {"use_dora": True}, ["query", "value"], {}),
    "gpt2-fan-in-fan-out": ("gpt2", {"fan_in_fan_out": True, "target_modules": ["c_attn"]}, ["c_attn"], {}),
    "patterns-and-layers": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj"],
            "layers_to_transform": [1],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"q_proj": 16},
        },
        ["q_proj", "v_proj"],
        {"v_proj": 2},
    ),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_lora_folder_gives_the_formula(tiny: Any, tmp_path: Path, case: str) -> None:
    family_name, overrides, leaves, leaf_ranks = LORA_CASES[case]
    family = tiny(family_name)
    config = {**LORA_CONFIG, **overrides}
    base = family.build()
    names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in leaves]
    layers = config["layers_to_transform"]
    if layers:
        names = [n for n in names if f".{layers[0]}." in n]
    ranks = {n: leaf_ranks[n.rsplit(".", 1)[-1]] for n in names if n.rsplit(".", 1)[-1] in leaf_ranks}
    tensors = _lora_tensors(base, names, ranks, dora=config["use_dora"])
    scale = {}
    for n in names:
        r = ranks.get(n, config["r"])
        alpha = config["alpha_pattern"].get(n.rsplit(".", 1)[-1], config["lora_alpha"])
        scale[n] = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    folder = write_peft(tmp_path / "adapter", config, tensors)
    _apply_lora(base, tensors, scale, dora=config["use_dora"])
    with torch.no_grad():
        expected = family.run(base)
    assert torch.allclose(_loaded_output(family, folder), expected, atol=1e-5)


def test_rank_pattern_becomes_a_union_and_round_trips(tiny: Any, tmp_path: Path) -> None:
    family = tiny("llama")
    _, overrides, leaves, _ = LORA_CASES["patterns-and-layers"]
    base = family.build()
    names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in leaves and ".1." in n]
    tensors = _lora_tensors(base, names, {n: 2 for n in names if n.endswith("v_proj")})
    folder = write_peft(tmp_path / "adapter", {**LORA_CONFIG, **overrides}, tensors)
    mm = modfit.wrap(family.build())
    name = mm.load(folder)
    config = mm.records[name].config
    assert config.method == "union"
    assert [(c.r, c.alpha, c.targets, c.layers) for c in config.components] == [  # type: ignore[attr-defined]
        (4, 16.0, ("q_proj",), (1,)),
        (2, 8.0, ("v_proj",), (1,)),
    ]
    mm.save(name, tmp_path / "back", format="peft")
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"] and written["layers_to_transform"] == [1]
    assert written["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
    assert written["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 8}
    assert written["r"] == 4 and written["lora_alpha"] == 16


@torch.no_grad()
def test_peft_ia3_folder_gives_the_formula(tiny: Any, tmp_path: Path) -> None:
    family = tiny("bert")
    base = family.build()
    tensors, i = {}, 0
    for name, module in base.named_modules():
        leaf = name.split(".")[-2:]
        if leaf[-1] in ("key", "value"):  # output scaling: rows of W and b
            vector = 1 + _rand(module.out_features, 1, seed=i)
            module.weight.mul_(vector)
            module.bias.mul_(vector[:, 0])
        elif leaf == ["output", "dense"]:  # input scaling (PEFT's endswith also marks attention.output.dense)
            vector = 1 + _rand(1, module.in_features, seed=i)
            module.weight.mul_(vector)
        else:
            continue
        tensors[f"{P}{name}.ia3_l"] = vector
        i += 1
    folder = write_peft(tmp_path / "adapter", IA3_CONFIG, tensors)
    assert torch.allclose(_loaded_output(family, folder), family.run(base), atol=1e-5)


@torch.no_grad()
def test_peft_prompt_folder_gives_the_formula(tiny: Any, tmp_path: Path) -> None:
    family = tiny("bert")
    base = family.build()
    prompt = _rand(3, 32, seed=5)
    folder = write_peft(tmp_path / "adapter", PROMPT_CONFIG, {"prompt_embeddings": prompt})
    inputs = family.inputs()
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    full = torch.cat([prompt.expand(2, -1, -1), embeds], dim=1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    expected = base(inputs_embeds=full, attention_mask=mask)[0][:, 3:]
    assert torch.allclose(_loaded_output(family, folder), expected, atol=1e-5)


@torch.no_grad()
def test_peft_prefix_projection_folder_reads_as_the_table(tiny: Any, tmp_path: Path) -> None:
    family = tiny("gpt2")
    table = _rand(3, 2 * 2 * 32, seed=6)  # (n, layers · 2 · width): the table PEFT's MLP computed
    folder = write_peft(tmp_path / "adapter", PREFIX_CONFIG, {"prompt_embeddings": table})
    mm = modfit.wrap(family.build())
    name = mm.load(folder)
    assert mm.records[name].config.prefix_projection is False  # type: ignore[attr-defined]
    ((_, unit),) = list(mm.units(name))
    assert torch.equal(unit.embedding.weight, table)  # type: ignore[union-attr]
    reference = modfit.wrap(family.build())
    reference.add("r", modfit.config("prefix", num_virtual_tokens=3))
    ((_, ref_unit),) = list(reference.units("r"))
    ref_unit.embedding.weight.copy_(table)  # type: ignore[union-attr, operator]
    reference.activate("r")
    mm.activate(name)
    assert torch.equal(family.run(mm.model), family.run(reference.model))


ROUND_TRIPS = {
    "lora-bert": ("bert", "lora", dict(r=4, alpha=8, targets=("query", "value", "ffn_out"), layers=(1,))),
    "lora-gpt2": ("gpt2", "lora", dict(r=2, alpha=3, rslora=True, targets=("c_attn", "c_proj"))),
    "dora-llama": ("llama", "dora", dict(r=2, alpha=4, targets=("q_proj", "o_proj"))),
    "union-bert": (
        "bert",
        "union",
        dict(
            components=[
                {"method": "lora", "r": 4, "targets": ["query"]},
                {"method": "lora", "r": 2, "targets": ["value"]},
            ]
        ),
    ),
    "ia3-bert": ("bert", "ia3", {}),
    "ia3-gpt2": ("gpt2", "ia3", {}),
    "prompt-llama": ("llama", "prompt", dict(num_virtual_tokens=2, init="random")),
    "prefix-llama": ("llama", "prefix", dict(num_virtual_tokens=2, prefix_projection=True)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_modfit_peft_modfit_is_exact(tiny: Any, tmp_path: Path, case: str) -> None:
    family_name, method, params = ROUND_TRIPS[case]
    family = tiny(family_name)
    mm = modfit.wrap(family.build())
    mm.add("m", modfit.config(method, **params))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in mm.module_parameters("m"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    mm.activate("m")
    with torch.no_grad():
        expected = family.run(mm.model)
    mm.save("m", tmp_path / "peft", format="peft")
    assert detect_format(tmp_path / "peft") is not None and not (tmp_path / "peft" / "module.json").exists()
    back = modfit.wrap(family.build())
    name = back.load(tmp_path / "peft")
    back.activate(name)
    with torch.no_grad():
        assert torch.equal(family.run(back.model), expected)
    if method != "prefix":  # a prefix with the MLP comes back as its table
        assert {p: type(u) for p, u in back.units(name)} == {p: type(u) for p, u in mm.units("m")}
        before, after = module_state(mm, "m"), module_state(back, name)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_legacy_bin_reads_with_weights_only(tiny: Any, tmp_path: Path) -> None:
    family = tiny("bert")
    base = family.build()
    names = [n for n, _ in base.named_modules() if n.endswith(("query", "value"))]
    tensors = _lora_tensors(base, names, {})
    safe = write_peft(tmp_path / "safe", LORA_CONFIG, tensors)
    legacy = write_peft(tmp_path / "bin", LORA_CONFIG, tensors, bin=True)
    assert torch.equal(_loaded_output(family, safe), _loaded_output(family, legacy))
    # a pickle that needs more than tensors (here: an object of a class) is refused, not executed
    torch.save({"x": _Pickled()}, legacy / "adapter_model.bin")
    with pytest.raises(InteropError, match=r"adapter_model.bin: cannot read as a weights-only"):
        modfit.wrap(family.build()).load(legacy)


class _Pickled:
    """A class a weights-only unpickler must refuse to build."""


def _bert_lora(
    tmp_path: Path, tiny: Any, config: dict[str, Any], extra: dict[str, torch.Tensor] | None = None
) -> Path:
    base = tiny("bert").build()
    names = [n for n, _ in base.named_modules() if n.endswith(("query", "value"))]
    return write_peft(tmp_path / "adapter", config, {**_lora_tensors(base, names, {}), **(extra or {})})


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        ({"bias": "all"}, None, r'adapter_config.json: "bias" is \'all\''),
        (
            {"layer_replication": [[0, 1]]},
            None,
            r'"layer_replication" is \[\[0, 1\]\]: modfit has no equivalent',
        ),
        ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
        ({"rank_pattern": {"value": 2}}, None, r"value: rank 4, but .*rank_pattern\[\"value\"\]\" says 2"),
        ({"peft_type": "LOHA"}, None, r'"peft_type" is "LOHA"; modfit converts IA3, LORA'),
        (
            {},
            {f"{P}embeddings.word_embeddings.lora_embedding_A": torch.zeros(4, 100)},
            "LoRA on an embedding",
        ),
        ({}, {f"{P}pooler.dense.weight": torch.zeros(32, 32)}, r"pooler.dense.weight: not a LoRA weight"),
        (
            {},
            {f"{P}encoder.layer.9.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
            "does not exist",
        ),
        (
            {},
            {f"{P}encoder.layer.0.attention.self.key.lora_A.weight": torch.zeros(4, 32)},
            "lora_B.weight is missing",
        ),
    ],
    ids=[
        "bias",
        "unknown-field",
        "pissa",
        "rank-pattern",
        "peft-type",
        "embedding",
        "modules-to-save",
        "no-module",
        "no-B",
    ],
)
def test_what_cannot_be_expressed_is_refused_by_name(
    tiny: Any, tmp_path: Path, config: dict[str, Any], extra: dict[str, torch.Tensor] | None, message: str
) -> None:
    folder = _bert_lora(tmp_path, tiny, {**LORA_CONFIG, **config}, extra)
    mm = modfit.wrap(tiny("bert").build())
    with pytest.raises(InteropError, match=message):
        mm.load(folder)
    assert mm.module_names == []


def test_file_errors_name_the_file(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    folder = _bert_lora(tmp_path, tiny, LORA_CONFIG)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(InteropError, match=r"neither adapter_model.safetensors nor adapter_model.bin"):
        mm.load(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": }')
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(InteropError, match=r"adapter_config.json:2: invalid JSON"):
        mm.load(folder)


def test_prompt_for_the_decoder_too_and_ia3_shape_errors(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    config = {**PROMPT_CONFIG, "num_transformer_submodules": 2}
    folder = write_peft(tmp_path / "p", config, {"prompt_embeddings": torch.zeros(6, 32)})
    with pytest.raises(InteropError, match='"num_transformer_submodules" is 2'):
        mm.load(folder)
    key = f"{P}encoder.layer.0.attention.self.key.ia3_l"
    folder = write_peft(tmp_path / "i", IA3_CONFIG, {key: torch.ones(1, 32)})  # (1, in): input scaling
    with pytest.raises(InteropError, match=r"scales the input, but .*feedforward_modules.* does not mark"):
        mm.load(folder)


def test_exports_refuse_what_peft_cannot_hold(tiny: Any, tmp_path: Path) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add("adapter", modfit.config("pfeiffer"))
    with pytest.raises(InteropError, match="method 'pfeiffer' has no PEFT equivalent"):
        mm.save("adapter", tmp_path / "a", format="peft")
    mm.add("cls", modfit.config("lora"), head=modfit.head("seq-cls", ["a", "b"]))
    with pytest.raises(InteropError, match=r"has a seq-cls head.*drop_head=True"):
        mm.save("cls", tmp_path / "b", format="peft")
    assert not (tmp_path / "b").exists()
    mm.save("cls", tmp_path / "b", format="peft", drop_head=True)
    mm.add("gated", modfit.config("lora", use_gating=True))
    with pytest.raises(InteropError, match=r"lora.use_gating"):
        mm.save("gated", tmp_path / "c", format="peft")
    mm.add("prefix", modfit.config("prefix", num_virtual_tokens=2))
    with pytest.warns(UserWarning, match="PEFT shifts the real tokens"):
        mm.save("prefix", tmp_path / "d", format="peft")


def test_cli_convert_both_ways(tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir = tmp_path / "base"
    tiny("bert").build().save_pretrained(str(base_dir))
    adapter = _bert_lora(tmp_path, tiny, LORA_CONFIG)
    module = tmp_path / "module"
    assert (
        main(["convert", "--from", "peft", str(adapter), "--out", str(module), "--base", str(base_dir)]) == 0
    )
    card = json.loads((module / "module.json").read_text())
    assert (
        card["method"] == "lora"
        and card["name"] == "module"
        and card["config"]["targets"] == ["query", "value"]
    )
    again = tmp_path / "again"
    assert (
        main(["convert", "--to", "peft", str(module), "--out", str(again), "--base", str(base_dir), "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["to"] == "peft"
    before = json.loads((adapter / "adapter_config.json").read_text())
    after = json.loads((again / "adapter_config.json").read_text())
    assert (after["r"], after["lora_alpha"], sorted(after["target_modules"])) == (
        before["r"],
        8,
        ["query", "value"],
    )
    from safetensors.torch import load_file

    original, written = (
        load_file(str(adapter / "adapter_model.safetensors")),
        load_file(str(again / "adapter_model.safetensors")),
    )
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    # errors: one line naming the file and field, status 2, nothing written
    (adapter / "adapter_config.json").write_text(json.dumps({**LORA_CONFIG, "bias": "all"}))
    bad = tmp_path / "bad"
    assert main(["convert", "--from", "peft", str(adapter), "--out", str(bad), "--base", str(base_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modfit: error: ") and 'adapter_config.json: "bias"' in err and not bad.exists()
    assert main(["convert", "--from", "peft", str(module), "--out", str(bad), "--base", str(base_dir)]) == 2
    assert "not a peft checkpoint folder" in capsys.readouterr().err
    assert main(["convert", "--to", "nosuch", str(module), "--out", str(bad), "--base", str(base_dir)]) == 2
    assert "unknown checkpoint format 'nosuch'" in capsys.readouterr().err


def test_keys_of_the_model_with_a_head_load_into_the_bare_model_and_back(tiny: Any, tmp_path: Path) -> None:
    """PEFT names modules inside the class it wrapped (`bert.encoder...` for BertForSequenceClassification);
    a bare BertModel finds them without the prefix, and an export from the class with a head adds it."""
    import transformers

    family = tiny("bert")
    base = family.build()
    names = [n for n, _ in base.named_modules() if n.endswith(("query", "value"))]
    tensors = {k.replace(P, P + "bert."): v for k, v in _lora_tensors(base, names, {}).items()}
    folder = write_peft(tmp_path / "with_head", LORA_CONFIG, tensors)
    bare = {k.replace("bert.", ""): v for k, v in tensors.items()}
    plain = write_peft(tmp_path / "bare", LORA_CONFIG, bare)
    assert torch.equal(_loaded_output(family, folder), _loaded_output(family, plain))
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(family.config_obj).eval()
    mm = modfit.wrap(classifier)
    name = mm.load(plain, name="x")
    mm.save(name, tmp_path / "out", format="peft")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))) == set(tensors)
