"""The architecture table against real (tiny, random-init) HuggingFace models.

Every row is checked on a model built from a config in code (no downloads): the paths resolve, the
projection roles name Linear/Conv1D modules, and the hook points mean what `archs.py` says they mean,
observed with forward hooks during a real forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from modfit.archs import (
    ARCHS,
    HOOK_POINT_ROLES,
    PROJECTION_ROLES,
    ArchSpec,
    HookPoint,
    InputRef,
    LayerSpec,
    arch_for,
    supported_model_types,
)

VOCAB = 100
BATCH, SEQ = 2, 7

# Dropout is set non-zero on purpose: the semantic test also runs in train mode, where a table
# naming a module *before* the dropout (instead of the dropout right before the residual add) fails.
_BERTLIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.1,
)
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    dropout_rate=0.1,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


@dataclass(frozen=True)
class Case:
    """One tiny model: its model_type, how to build it, and whether it needs decoder_input_ids."""

    model_type: str
    build: Callable[[], nn.Module]
    seq2seq: bool = False


def _builder(cls: str, config_cls: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, cls)(config)

    return build


CASES: dict[str, Case] = {
    "bert": Case("bert", _builder("BertForSequenceClassification", "BertConfig", **_BERTLIKE)),
    "roberta": Case("roberta", _builder("RobertaForSequenceClassification", "RobertaConfig", **_BERTLIKE)),
    "xlm-roberta": Case(
        "xlm-roberta", _builder("XLMRobertaForSequenceClassification", "XLMRobertaConfig", **_BERTLIKE)
    ),
    # embedding_size != hidden_size, so ElectraModel adds `embeddings_project`.
    "electra": Case(
        "electra",
        _builder("ElectraForSequenceClassification", "ElectraConfig", embedding_size=16, **_BERTLIKE),
    ),
    "distilbert": Case(
        "distilbert",
        _builder(
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            dropout=0.1,
        ),
    ),
    "gpt2": Case(
        "gpt2",
        _builder(
            "GPT2LMHeadModel",
            "GPT2Config",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama": Case("llama", _builder("LlamaForCausalLM", "LlamaConfig", **_DECODER)),
    "mistral": Case("mistral", _builder("MistralForCausalLM", "MistralConfig", **_DECODER)),
    "qwen2": Case("qwen2", _builder("Qwen2ForCausalLM", "Qwen2Config", **_DECODER)),
    "qwen3": Case("qwen3", _builder("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, **_DECODER)),
    "gemma": Case("gemma", _builder("GemmaForCausalLM", "GemmaConfig", head_dim=8, **_DECODER)),
    "phi3": Case("phi3", _builder("Phi3ForCausalLM", "Phi3Config", resid_pdrop=0.1, **_DECODER)),
    "t5": Case(
        "t5",
        _builder("T5ForConditionalGeneration", "T5Config", feed_forward_proj="relu", **_T5),
        seq2seq=True,
    ),
    # T5 v1.1 / Flan-T5: same model_type, gated FFN (wi_0/wi_1 instead of wi).
    "t5-gated": Case(
        "t5", _builder("T5Model", "T5Config", feed_forward_proj="gated-gelu", **_T5), seq2seq=True
    ),
}


@functools.cache
def _model(case_id: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case_id].build()


def _spec(case_id: str) -> ArchSpec:
    spec = arch_for(CASES[case_id].model_type)
    assert spec is not None
    return spec


def _hook_points(layer: LayerSpec) -> list[tuple[str, HookPoint]]:
    """The layer's hook points in forward order: attention, cross attention (if any), FFN."""
    points = [("attn_output", layer.attn_output)]
    if layer.cross_attn_output is not None:
        points.append(("cross_attn_output", layer.cross_attn_output))
    points.append(("ffn_output", layer.ffn_output))
    return points


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _read(ref: InputRef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The value an InputRef names: positional `arg` if it was passed positionally, else keyword `kwarg`."""
    if len(args) > ref.arg:
        return args[ref.arg]
    assert ref.kwarg in kwargs, f"{ref} not passed: args={len(args)}, kwargs={sorted(kwargs)}"
    return kwargs[ref.kwarg]


def test_every_model_type_has_a_case() -> None:
    assert {c.model_type for c in CASES.values()} == set(supported_model_types())


def test_supported_model_types() -> None:
    types = supported_model_types()
    assert types == sorted(types)
    assert len(types) == len(set(types)), "a model_type is in two rows"
    for expected in ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "gpt2", "llama", "t5"):
        assert expected in types


def test_arch_for() -> None:
    for spec in ARCHS:
        for model_type in spec.model_types:
            assert arch_for(model_type) is spec
    for model_type, family in [("roberta", "bert"), ("qwen2", "llama"), ("t5", "t5"), ("gemma", "gemma")]:
        spec = arch_for(model_type)
        assert spec is not None and spec.family == family
    assert arch_for("no-such-model") is None
    assert arch_for("") is None
    families = [spec.family for spec in ARCHS]
    assert len(families) == len(set(families))


def test_row_shape() -> None:
    for spec in ARCHS:
        assert spec.groups, spec.family
        for group in spec.groups:
            for role in PROJECTION_ROLES:
                assert getattr(group.layer, role), f"{spec.family}.{group.name}: empty role {role}"
            for role in HOOK_POINT_ROLES:
                assert isinstance(getattr(group.layer, role), HookPoint)
            assert set(group.layer.optional) <= {p for r in PROJECTION_ROLES for p in getattr(group.layer, r)}
    assert {s.family for s in ARCHS if s.decoder_only} == {"gpt2", "llama", "gemma", "phi3"}


@pytest.mark.parametrize("case_id", list(CASES))
def test_paths_resolve(case_id: str) -> None:
    spec, model = _spec(case_id), _model(case_id)
    base = model.base_model
    embeddings = base.get_submodule(spec.embeddings)
    assert isinstance(embeddings, nn.Embedding)
    assert embeddings is model.get_input_embeddings()
    for group in spec.groups:
        layers = base.get_submodule(group.path)
        assert isinstance(layers, nn.ModuleList) and len(layers) == 2, group.path
        layer_spec = group.layer
        for i, layer in enumerate(layers):
            where = f"{case_id}:{group.name}[{i}]"
            for role in PROJECTION_ROLES:
                found = []
                for path in getattr(layer_spec, role):
                    try:
                        module = layer.get_submodule(path)
                    except AttributeError:
                        assert path in layer_spec.optional, f"{where}: {role} path {path!r} missing"
                        continue
                    assert isinstance(module, (nn.Linear, Conv1D)), f"{where}: {path} is {type(module)}"
                    found.append(module)
                assert found, f"{where}: role {role} resolves to nothing"
            for _, point in _hook_points(layer_spec):
                layer.get_submodule(point.module)
                layer.get_submodule(point.residual.module)
                if point.norm is not None:
                    assert isinstance(layer.get_submodule(point.norm), nn.LayerNorm)


def _run_with_hooks(case_id: str, train: bool) -> dict[str, Any]:
    """One forward with hooks on every hook point of every layer; returns what they captured.

    Keys: (group, layer index, role, what) with what in "h", "r", "norm_in"; and (group, i, "layer",
    "in"/"out") for the layer's own input (item 0 of its positional args) and output (item 0 if a tuple).
    """
    spec, model = _spec(case_id), _model(case_id)
    base = model.base_model
    seen: dict[Any, Any] = {}
    handles = []

    def once(key: Any, value: Any) -> None:
        assert key not in seen, f"{key} captured twice in one forward"
        seen[key] = value.detach().clone()

    def on_output(key: Any) -> Callable[..., None]:
        return lambda module, args, output: once(key, _first(output))

    def on_input(key: Any, ref: InputRef) -> Callable[..., None]:
        return lambda module, args, kwargs: once(key, _read(ref, args, kwargs))

    for group in spec.groups:
        for i, layer in enumerate(base.get_submodule(group.path)):
            layer_in = InputRef("", 0, "hidden_states")
            handles.append(
                layer.register_forward_pre_hook(
                    on_input((group.name, i, "layer", "in"), layer_in), with_kwargs=True
                )
            )
            handles.append(layer.register_forward_hook(on_output((group.name, i, "layer", "out"))))
            for role, point in _hook_points(group.layer):
                h_mod = layer.get_submodule(point.module)
                r_mod = layer.get_submodule(point.residual.module)
                handles.append(h_mod.register_forward_hook(on_output((group.name, i, role, "h"))))
                handles.append(
                    r_mod.register_forward_pre_hook(
                        on_input((group.name, i, role, "r"), point.residual), with_kwargs=True
                    )
                )
                if point.norm is not None:
                    n_mod = layer.get_submodule(point.norm)
                    handles.append(
                        n_mod.register_forward_pre_hook(
                            on_input((group.name, i, role, "norm_in"), InputRef(point.norm, 0, "input")),
                            with_kwargs=True,
                        )
                    )
    generator = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = {
        "input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    if CASES[case_id].seq2seq:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, SEQ - 2), generator=generator)
    model.train(train)
    try:
        torch.manual_seed(2)
        with torch.no_grad():
            model(**inputs)
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
    return seen


# Train mode is what tells "the dropout right before the residual add" from "the projection before
# it" (in eval mode dropout is the identity). The Llama and Gemma rows have no such dropout, so for them
# a train-mode forward would only repeat the eval one.
_SEMANTIC_RUNS = [(case_id, "eval") for case_id in CASES] + [
    (case_id, "train") for case_id in CASES if _spec(case_id).family not in ("llama", "gemma")
]


@pytest.mark.parametrize(("case_id", "mode"), _SEMANTIC_RUNS)
def test_hook_points_semantics(case_id: str, mode: str) -> None:
    """h and r really are the two terms of each residual add, in every layer of every group.

    Post-LN (`norm` set): the LayerNorm's input must be h + r.

    Pre-LN (`norm` None): the add's result goes into no module we can hook directly, so we follow the
    residual stream through the layer. With hook points k = 0..n-1 in forward order (attention, cross
    attention, FFN) the stream is x_0 = layer input, x_{k+1} = x_k + h_k, layer output = x_n. We check
    r_0 == layer input, h_k + r_k == r_{k+1} (the residual the next sub-layer reads), and
    h_{n-1} + r_{n-1} == layer output, which is what the next layer (or the final norm) receives. Each
    check is exact: the model performs the very same single fp32 addition (commutative, so bitwise
    equal), while a wrong h or r (a projection before a dropout in train mode, a normalised input
    instead of the raw stream, another sub-layer's tensor) is off by O(1).

    Runs in eval mode, and in train mode with dropout > 0 (see `_SEMANTIC_RUNS`).
    """
    seen = _run_with_hooks(case_id, train=mode == "train")
    spec = _spec(case_id)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)

    def is_sum(target: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> bool:
        return h.shape == r.shape and close(target, h + r)

    for group in spec.groups:
        n_layers = len(_model(case_id).base_model.get_submodule(group.path))
        for i in range(n_layers):
            points = _hook_points(group.layer)
            for role, _ in points:
                for what in ("h", "r"):
                    assert (group.name, i, role, what) in seen, (
                        f"{case_id}: {group.name}[{i}].{role} no {what}"
                    )
            post_ln = [p.norm is not None for _, p in points]
            assert all(post_ln) or not any(post_ln), "mixed pre-/post-LN in one layer"
            for k, (role, point) in enumerate(points):
                h, r = seen[group.name, i, role, "h"], seen[group.name, i, role, "r"]
                where = f"{case_id} {mode} {group.name}[{i}].{role}"
                assert not close(h, torch.zeros_like(h)), f"{where}: h is zero"
                if point.norm is not None:
                    assert is_sum(seen[group.name, i, role, "norm_in"], h, r), f"{where}: norm input != h + r"
                    continue
                if k == 0:
                    assert close(r, seen[group.name, i, "layer", "in"]), f"{where}: r != layer input"
                if k + 1 < len(points):
                    nxt = points[k + 1][0]
                    assert is_sum(seen[group.name, i, nxt, "r"], h, r), f"{where}: h + r != r of {nxt}"
                else:
                    assert is_sum(seen[group.name, i, "layer", "out"], h, r), f"{where}: h + r != output"
            if i + 1 < n_layers:
                out, nxt_in = seen[group.name, i, "layer", "out"], seen[group.name, i + 1, "layer", "in"]
                assert close(out, nxt_in), f"{case_id}: {group.name}[{i}] output != next layer input"
