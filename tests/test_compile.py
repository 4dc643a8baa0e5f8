"""`torch.compile` over a wrapped model and `TrainSettings(compile=...)`.

The modules run through forward hooks on the HuggingFace model, so dynamo traces them into the
model's graph. These tests use the `aot_eager` backend (dynamo + AOTAutograd, no code generation),
which checks tracing, graph breaks and guards in a second; the inductor backend compiles the same
graphs to code (timed in bench/peers.py, not here).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import modfit
from modfit.config import ConfigError
from modfit.train import TrainSettings, train
from train_fixtures import collate_fn, module_state, seq_cls_features, seq_cls_model, tiny_bert

# Methods whose forward traces into one graph, no break (fullgraph=True); poly and hyperx read the
# call's task ids from a context variable, and prompt tuning edits the inputs in Python: those run
# compiled too, in several graphs (tested below).
ONE_GRAPH = (
    "lora",
    "dora",
    "ia3",
    "pfeiffer",
    "houlsby",
    "parallel",
    "compacter",
    "prefix",
    "sft",
    "pfeiffer_inv",
)


def _randomised(mm: modfit.ModularModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _with_active_module(method: str) -> nn.Module:
    """A tiny BERT with module "m" of `method` (default config, randomised parameters) active."""
    base = tiny_bert()
    mm = modfit.wrap(base)
    torch.manual_seed(1)
    mm.add("m", modfit.config(method))
    _randomised(mm, "m", seed=2)
    mm.activate("m")
    return base


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ONE_GRAPH)
def test_module_compiles_into_one_graph_with_the_eager_output(method: str) -> None:
    base = _with_active_module(method)
    ids = torch.randint(3, 24, (2, 7))
    eager = base(input_ids=ids).last_hidden_state
    compiled = torch.compile(base, backend="aot_eager", fullgraph=True)(input_ids=ids).last_hidden_state
    assert (compiled - eager).abs().max() < 1e-6
    assert (eager - modfit.wrap(tiny_bert()).model(input_ids=ids).last_hidden_state).abs().max() > 1e-4


@pytest.mark.parametrize("method", ONE_GRAPH)
def test_inference_compiles_into_one_graph_with_the_eager_output(method: str) -> None:
    """Under no_grad, eager units take their in-place or folded paths (sites.py, folding.py); compiled,
    neither is traced (storage pointers, the thread's kernel mode), and the graph stays whole."""
    base = _with_active_module(method)
    ids = torch.randint(3, 24, (4, 16))  # 64 tokens: LoRA folds in eager (tests/test_folding.py)
    with torch.no_grad():
        eager = base(input_ids=ids).last_hidden_state
        compiled = torch.compile(base, backend="aot_eager", fullgraph=True)(input_ids=ids).last_hidden_state
    assert (compiled - eager).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("prompt", {}),
        ("poly", {"tasks": ("a", "b"), "n_skills": 2, "r": 2}),
        ("hyperx", {"tasks": ("a", "b"), "languages": ("x", "y"), "bottleneck_size": 4, "lora_r": 2}),
    ],
)
def test_module_with_graph_breaks_still_computes_the_eager_output(
    method: str, params: dict[str, Any]
) -> None:
    base = tiny_bert()
    mm = modfit.wrap(base)
    torch.manual_seed(1)
    mm.add("m", modfit.config(method, **params), head=modfit.head("seq-cls", ("x", "y")))
    _randomised(mm, "m", seed=2)
    mm.activate("m")
    ids = torch.randint(3, 24, (2, 7))
    kwargs: dict[str, torch.Tensor] = {}
    if method in ("poly", "hyperx"):
        kwargs["task_ids"] = torch.tensor([1, 0])
    if method == "hyperx":
        kwargs["language_ids"] = torch.tensor([0, 1])
    eager = mm(input_ids=ids, **kwargs).logits
    compiled = torch.compile(mm, backend="aot_eager")(input_ids=ids, **kwargs).logits
    assert (compiled - eager).abs().max() < 1e-6


def test_compiled_model_follows_later_activation_removal_and_merging() -> None:
    # Dynamo guards the hooks' Python state: a changed route recompiles instead of replaying.
    base = tiny_bert()
    mm = modfit.wrap(base)
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        mm.add(name, modfit.config("lora", r=4))
        _randomised(mm, name, seed=seed + 5)
    ids = torch.randint(3, 24, (2, 7))

    def eager(route: str | None) -> torch.Tensor:
        mm.activate(route) if route else mm.deactivate()
        return base(input_ids=ids).last_hidden_state

    expected = {route: eager(route) for route in ("a", "b", "stack(a, b)", None)}
    compiled = torch.compile(base, backend="aot_eager")
    for route in ("a", "b", "stack(a, b)", None, "a"):
        mm.activate(route) if route else mm.deactivate()
        assert (compiled(input_ids=ids).last_hidden_state - expected[route]).abs().max() < 1e-6, route
    mm.remove("b")
    mm.activate("a")
    assert (compiled(input_ids=ids).last_hidden_state - expected["a"]).abs().max() < 1e-6
    mm.merge("a")
    assert (compiled(input_ids=ids).last_hidden_state - expected["a"]).abs().max() < 1e-5


def test_compiled_training_equals_eager_training() -> None:
    results, states = [], []
    for compiled in (False, "aot_eager"):
        mm = seq_cls_model()
        settings = TrainSettings(
            steps=6, lr=1e-2, batch_size=8, log_every=1, progress=False, compile=compiled
        )
        results.append(train(mm, "task", seq_cls_features(24), collate_fn=collate_fn, settings=settings))
        states.append(module_state(mm, "task"))
    eager_losses = [e["loss"] for e in results[0].history]
    compiled_losses = [e["loss"] for e in results[1].history]
    assert len(eager_losses) == 6
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for key, value in states[0].items():
        assert (states[1][key] - value).abs().max() < 1e-5, key


@pytest.mark.parametrize("value", ["", 3, None])
def test_compile_setting_must_be_a_flag_or_a_backend_name(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"train\.compile: must be True, False or a torch\.compile backend"):
        TrainSettings(compile=value)


@pytest.mark.parametrize("method", ["lora", "pfeiffer", "houlsby"])
def test_second_call_reuses_the_graph(method: str) -> None:
    # The sites' per-call state (the residual stash, the bypass flag) exists from the first call on,
    # so nothing the hooks read changes shape between calls and the second call replays the graph.
    mm = modfit.wrap(tiny_bert())
    mm.add("m", modfit.config(method))
    mm.activate("m")
    ids = torch.randint(3, 24, (2, 7))
    compiled = torch.compile(mm.model, backend="aot_eager")
    compiled(input_ids=ids).last_hidden_state.sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(input_ids=ids).last_hidden_state.sum().backward()
