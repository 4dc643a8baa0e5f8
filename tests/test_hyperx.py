"""Hyper-X (`methods/hyperx.py`): generated shapes and parameter counts, the adapter and LoRA formulas on
small tensors, per-row batched application against single-row runs, the zero-initialised heads as an
identity, one generator run per forward pass, save/load, routing errors, and (slow) the unseen-pair
experiment of `bench/hyperx.py` against the no-module baseline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch
from torch import nn

import modfit
from load_script import load_script
from modfit.config import ConfigError
from modfit.methods.hyperx import HyperGenerator, HyperXAdapterUnit, HyperXLoraUnit, HyperXUnit
from modfit.model import ModularModel
from modfit.routing import RouteError, routed
from modfit.routing.lang_tasks_data import LANGUAGES, TASKS, encode_examples, examples, translate
from modfit.sites import SiteCall

if TYPE_CHECKING:
    from conftest import Family

TASK_NAMES = ("a", "b", "c")
LANGUAGE_NAMES = ("x", "y")


def _config(**changes: Any) -> modfit.ModuleConfig:
    values: dict[str, Any] = dict(
        tasks=TASK_NAMES,
        languages=LANGUAGE_NAMES,
        task_dim=5,
        language_dim=4,
        layer_dim=3,
        hidden_dim=7,
        source_dim=6,
        bottleneck_size=4,
        lora_r=2,
        lora_targets=("query", "value"),
    )
    return modfit.config("hyperx", **{**values, **changes})


def _units(mm: ModularModel, name: str) -> list[HyperXUnit]:
    return [p for _, u in mm.units(name) for p in u.parts() if isinstance(p, HyperXUnit)]


def _generator(mm: ModularModel, name: str) -> HyperGenerator:
    return _units(mm, name)[0].hyper


@torch.no_grad()
def _randomise(mm: ModularModel, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _route(tasks: list[int], languages: list[int]) -> dict[str, torch.Tensor]:
    return {"task": torch.tensor(tasks), "language": torch.tensor(languages)}


# -- shapes, counts, formulas ---------------------------------------------------------------------------


def test_generator_shapes_and_parameter_count(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")  # hidden 32, 2 layers
    mm = modfit.wrap(family.build())
    mm.add("h", _config(placement=("attn_output", "ffn_output")))
    units = _units(mm, "h")
    assert sorted(type(u).__name__ for u in units) == ["HyperXAdapterUnit"] * 4 + ["HyperXLoraUnit"] * 4
    assert sorted({u.layer for u in units}) == [0, 1]
    gen = _generator(mm, "h")
    assert all(u.hyper is gen for u in units)
    # (generated size, source_dim) per head
    heads = {k: tuple(cast(nn.Linear, v).weight.shape) for k, v in gen.heads.items()}
    assert heads == {
        "attn_output-down": (4 * 32 + 4, 6),
        "attn_output-up": (32 * 4 + 32, 6),
        "ffn_output-down": (4 * 32 + 4, 6),
        "ffn_output-up": (32 * 4 + 32, 6),
        "attention-self-query-A": (2 * 32, 6),
        "attention-self-query-B": (32 * 2, 6),
        "attention-self-value-A": (2 * 32, 6),
        "attention-self-value-B": (32 * 2, 6),
    }
    with routed(_route([0, 2, 0, 1], [1, 1, 1, 0])):
        sources = gen.sources(units[0], 4, torch.device("cpu"))
    assert sources.source.shape == (3, 2, 6)  # 3 distinct (task, language) pairs x 2 layers x source_dim
    assert sources.inverse.tolist() == [0, 2, 0, 1]  # pairs t·L + l = 1, 5, 1, 2 -> sorted 1, 2, 5
    assert gen.generate("ffn_output-down", 1, sources.source).shape == (3, 4 * 32 + 4)
    # the docstring's count: embeddings, source MLP, then (source_dim + 1) x generated size per head
    expected = (3 * 5 + 2 * 4 + 2 * 3) + (12 * 7 + 7) + (7 * 6 + 6)
    expected += 7 * 2 * ((4 * 32 + 4) + (32 * 4 + 32)) + 7 * 2 * (2 * 32 + 32 * 2)
    assert mm.trainable_parameters("h") == expected
    # without the source MLP the heads read e = [E_task; E_lang; E_layer] (5 + 4 + 3 = 12 numbers)
    mm.add("linear", _config(placement=("attn_output", "ffn_output"), source_mlp=False))
    assert _generator(mm, "linear").source_dim == 12
    expected = (3 * 5 + 2 * 4 + 2 * 3) + 13 * 2 * ((4 * 32 + 4) + (32 * 4 + 32)) + 13 * 2 * (2 * 32 + 32 * 2)
    assert mm.trainable_parameters("linear") == expected


def test_adapter_formula_on_small_tensors() -> None:
    """h' = h + U relu(D h + d) + u, [D; d] = G_down(s), [U; u] = G_up(s), s = MLP([E_t; E_l; E_layer])."""
    torch.manual_seed(0)
    config = _config(lora_targets=())
    gen = HyperGenerator(TASK_NAMES, LANGUAGE_NAMES, 2, config)  # type: ignore[arg-type]
    unit = HyperXAdapterUnit(gen, True, 1, "p", hidden=5, bottleneck=3, act="relu")
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape))
    h = torch.randn(2, 4, 5)
    call = SiteCall(inputs=(h,), residual=None, norm=None, base=nn.Identity())
    with routed(_route([2, 0], [1, 1])):
        out = unit(h, call)
    for row, (t, lang) in enumerate([(2, 1), (0, 1)]):
        e = torch.cat(
            [gen.task_embedding.weight[t], gen.language_embedding.weight[lang], gen.layer_embedding.weight[1]]
        )
        s = gen.source[2](torch.relu(gen.source[0](e)))
        down, up = gen.heads["p-down"](s), gen.heads["p-up"](s)
        d_w, d_b = down[:15].view(3, 5), down[15:]
        u_w, u_b = up[:15].view(5, 3), up[15:]
        expected = h[row] + torch.relu(h[row] @ d_w.T + d_b) @ u_w.T + u_b
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)


def test_linear_generator_is_additive_in_task_and_language() -> None:
    """Without the source MLP a generated matrix is linear in e: W(t, l) - W(t', l) does not depend on l."""
    torch.manual_seed(0)
    gen = HyperGenerator(TASK_NAMES, LANGUAGE_NAMES, 1, _config(source_mlp=False))  # type: ignore[arg-type]
    gen.add_head("k", 10, fan_in=4)
    e = torch.cat(
        [
            gen.task_embedding.weight[:, None].expand(3, 2, -1),
            gen.language_embedding.weight[None].expand(3, 2, -1),
            gen.layer_embedding.weight[0].expand(3, 2, -1),
        ],
        dim=-1,
    )  # (task, language, 12)
    w = gen.heads["k"](gen.source(e))  # (3, 2, 10)
    torch.testing.assert_close(w[0, 0] - w[2, 0], w[0, 1] - w[2, 1], atol=1e-6, rtol=0)


def test_down_heads_start_with_nn_linear_variance(tiny: Callable[[str], Family]) -> None:
    """The generated down and A matrices start with the variance of nn.Linear's default init, 1/(3·fan_in)."""
    torch.manual_seed(0)
    mm = modfit.wrap(tiny("bert").build())
    mm.add("h", _config(task_dim=64, language_dim=64, layer_dim=64, hidden_dim=192, source_dim=32))
    gen = _generator(mm, "h")
    with routed(_route([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1])):
        sources = gen.sources(_units(mm, "h")[0], 6, torch.device("cpu"))
    down = gen.generate("ffn_output-down", 0, sources.source)[:, : 4 * 32]
    a = gen.generate("attention-self-query-A", 1, sources.source)
    for generated, fan_in in ((down, 32), (a, 32)):
        ratio = float(generated.detach().pow(2).mean()) * 3 * fan_in
        assert 0.5 < ratio < 2.0, ratio


def test_lora_formula_on_small_tensors() -> None:
    """y = h + (alpha / r) B A x with A = G_A(s): (r, in) and B = G_B(s): (out, r)."""
    torch.manual_seed(0)
    config = _config()
    gen = HyperGenerator(TASK_NAMES, LANGUAGE_NAMES, 1, config)  # type: ignore[arg-type]
    unit = HyperXLoraUnit(gen, True, 0, "q", in_features=5, out_features=3, r=2, alpha=3.0)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape))
    x, h = torch.randn(1, 4, 5), torch.randn(1, 4, 3)
    call = SiteCall(inputs=(x,), residual=None, norm=None, base=nn.Identity())
    with routed({"task": ["b"], "language": ["x"]}):  # names, in the config's order
        out = unit(h, call)
    e = torch.cat(
        [gen.task_embedding.weight[1], gen.language_embedding.weight[0], gen.layer_embedding.weight[0]]
    )
    s = gen.source(e)
    a, b = gen.heads["q-A"](s).view(2, 5), gen.heads["q-B"](s).view(3, 2)
    torch.testing.assert_close(out[0], h[0] + 1.5 * x[0] @ a.T @ b.T, atol=1e-5, rtol=1e-5)


# -- behaviour on models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family_name", "targets"),
    [("bert", ("query", "value")), ("gpt2", ("c_attn",)), ("llama", ("q_proj", "ffn_out"))],
)
def test_mixed_batch_rows_equal_single_row_runs(
    tiny: Callable[[str], Family], family_name: str, targets: tuple[str, ...]
) -> None:
    """Each row of a batch mixing (task, language) pairs, and a no-module row (-1), equals that row run
    alone; on Llama the LoRA on down_proj shares its site with the FFN-output adapter."""
    family = tiny(family_name)
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("h", _config(lora_targets=targets))
    _randomise(mm, "h")
    mm.activate("h")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (5, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    tasks, languages = [0, 2, 1, -1, 2], [1, 0, 1, 0, 0]
    with torch.no_grad(), routed(_route(tasks, languages)):
        mixed = model(input_ids=ids, attention_mask=mask)[0]
    with torch.no_grad():
        mm.deactivate()
        base = model(input_ids=ids, attention_mask=mask)[0]
        mm.activate("h")
        for row in range(5):
            with routed(_route([tasks[row]], [languages[row]])):
                alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1])[0]
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
    assert torch.equal(mixed[3], base[3])  # the no-module row: the base output, bit for bit
    assert (mixed[0] - base[0]).abs().max() > 1e-3


def test_zero_initialised_heads_give_the_identity(tiny: Callable[[str], Family]) -> None:
    """Whatever the embeddings and the other heads hold, zero up/B heads generate U = 0, u = 0 and B = 0."""
    family = tiny("bert")
    model = family.build()
    base = family.run(model)
    mm = modfit.wrap(model)
    mm.add("h", _config())
    _randomise(mm, "h")
    with torch.no_grad():
        for key, head in _generator(mm, "h").heads.items():
            if key.endswith(("-up", "-B")):
                cast(nn.Linear, head).weight.zero_()
                cast(nn.Linear, head).bias.zero_()
    mm.activate("h")
    with torch.no_grad(), routed(_route([0, 2], [1, 0])):
        assert torch.equal(family.run(model), base)


def test_generator_runs_once_per_forward_pass(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("h", _config(placement=("attn_output", "ffn_output")))  # 8 units over 2 layers
    _randomise(mm, "h")
    mm.activate("h")
    gen = _generator(mm, "h")
    calls = {"source": 0, "heads": 0}
    gen.source.register_forward_hook(lambda *_: calls.__setitem__("source", calls["source"] + 1))
    for head in gen.heads.values():
        head.register_forward_hook(lambda *_: calls.__setitem__("heads", calls["heads"] + 1))
    route = _route([0, 1], [1, 1])
    with routed(route):
        first = family.run(model)
        assert calls == {"source": 1, "heads": 16}  # one source MLP run; each unit's two heads, once
        second = family.run(model)  # same route object, a new pass: generated again
    assert calls == {"source": 2, "heads": 32}
    assert torch.equal(first, second)
    with torch.no_grad():  # a changed generator is seen by the next pass
        gen.task_embedding.weight.add_(1.0)
    with routed(route):
        assert not torch.equal(family.run(model), first)
    # training: one backward through the shared generator reaches every parameter
    mm.train_only("h")
    with routed(route):
        family.run(model).pow(2).mean().backward()
    assert all(p.grad is not None for p in mm.module_parameters("h", include_head=False))


def test_save_load_identical(tiny: Callable[[str], Family], tmp_path: Path) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("h", _config(), head=modfit.head("seq-cls", ("no", "yes")))
    _randomise(mm, "h")
    mm.activate("h")
    route = {"task": ["c", "a"], "language": ["y", None]}  # by name; None: no module for that row
    with torch.no_grad():
        expected = mm(**family.encoder_inputs(), route=route).logits
    mm.save("h", tmp_path / "h")
    card = json.loads((tmp_path / "h" / "module.json").read_text())
    assert card["config"]["tasks"] == list(TASK_NAMES) and card["config"]["languages"] == list(LANGUAGE_NAMES)

    fresh = family.build()
    mm2 = modfit.wrap(fresh)
    mm2.load(tmp_path / "h")
    mm2.activate("h")
    with torch.no_grad():
        assert torch.equal(mm2(**family.encoder_inputs(), route=route).logits, expected)
    loaded = _units(mm2, "h")
    assert all(u.hyper is loaded[0].hyper for u in loaded)  # one generator after loading too
    state = mm2.container.state_dict()
    assert sum(k.endswith("task_embedding.weight") for k in state) == 1  # stored once


def test_routing_errors_name_the_key_and_the_valid_range(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("h", _config(), head=modfit.head("seq-cls", ("no", "yes")))
    mm.activate("h")
    inputs = family.encoder_inputs()
    with pytest.raises(RouteError, match=r"needs per-example 'task' ids \(valid ids: 0\.\.2 \(a, b, c\)"):
        mm(**inputs)
    with pytest.raises(RouteError, match=r"needs per-example 'language' ids \(valid ids: 0\.\.1 \(x, y\)"):
        mm(**inputs, task_ids=torch.tensor([0, 1]))
    with pytest.raises(RouteError, match=r"route 'task' id 3 is out of range; valid ids: 0\.\.2 \(a, b, c\)"):
        mm(**inputs, task_ids=torch.tensor([0, 3]), language_ids=torch.tensor([0, 0]))
    with pytest.raises(RouteError, match=r"route 'language' id -2 is out of range; valid ids: 0\.\.1"):
        mm(**inputs, task_ids=torch.tensor([0, 1]), language_ids=torch.tensor([-2, 0]))
    with pytest.raises(RouteError, match=r"unknown name 'z'; known: x, y; valid ids: 0\.\.1"):
        mm(**inputs, route={"task": ["a", "b"], "language": ["x", "z"]})
    with pytest.raises(RouteError, match=r"route 'task' has 3 entries for a batch of 2 rows"):
        mm(**inputs, task_ids=torch.tensor([0, 1, 2]), language_ids=torch.tensor([0, 0]))
    # one task and one language: the route may leave them out
    mm.add("single", _config(tasks=("only",), languages=("one",)), head=modfit.head("seq-cls", ("no", "yes")))
    mm.activate("single")
    assert mm(**inputs).logits.shape == (2, 2)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"hyperx.tasks: names a value twice"):
        modfit.config("hyperx", tasks=("a", "a"))
    with pytest.raises(ConfigError, match=r"hyperx.placement: generate something"):
        modfit.config("hyperx", placement=(), lora_targets=())
    with pytest.raises(ConfigError, match=r"hyperx.placement: 'middle' is not one of"):
        modfit.config("hyperx", placement=("middle",))
    with pytest.raises(ConfigError, match=r"hyperx.source_dim: must be >= 1"):
        modfit.config("hyperx", source_dim=0)
    assert modfit.config("hyperx", tasks="a,b", lora_targets="query").tasks == ("a", "b")  # type: ignore[attr-defined]


# -- the synthetic data ------------------------------------------------------------------------------------


def test_lang_tasks_data_is_deterministic_balanced_and_split(minilm_tokenizer: Any) -> None:
    pairs = [(t, lang) for t in TASKS for lang in LANGUAGES]
    train = examples(pairs, 20, seed=3)
    assert train == examples(pairs, 20, seed=3)
    assert train != examples(pairs, 20, seed=4)
    assert examples([("topic", "suf")], 20, seed=3) == [
        e for e in train if (e.task, e.language) == ("topic", "suf")
    ]
    for task, lang in pairs:
        labels = [e.label for e in train if (e.task, e.language) == (task, lang)]
        assert labels.count("yes") == labels.count("no") == 10
    test_en = {e.text for e in examples([(t, "en") for t in TASKS], 200, seed=3, split="test")}
    train_en = {e.text for e in examples([(t, "en") for t in TASKS], 200, seed=3)}
    assert not test_en & train_en
    words = ["we", "saw", "it"]
    assert [translate(words, lang) for lang in ("en", "rev", "suf", "fil")] == [
        "we saw it",
        "it saw we",
        "weku sawku itku",
        "we zo ba saw zo ba it zo ba",
    ]
    distracted = translate(words, "dis").split()  # w, "zo", a cue word, for every w; fixed per sentence
    assert distracted[0::3] == words and distracted[1::3] == ["zo"] * 3
    assert translate(words, "dis") == translate(words, "dis") != translate(["we", "saw", "her"], "dis")
    features = encode_examples(train[:3], minilm_tokenizer)
    assert {f["task_ids"] for f in features} == {0} and {f["language_ids"] for f in features} == {0}
    assert all(f["labels"] in (0, 1) for f in features)
    with pytest.raises(KeyError, match="unknown language 'xx'; known: en, rev, suf, dis, fil"):
        translate(words, "xx")


# -- learning: an unseen (task, language) pair ---------------------------------------------------------------


def _bench() -> Any:
    return load_script("bench/hyperx.py", "bench_hyperx")


@pytest.mark.heavy  # ~3-4 min: run with `pytest -m heavy`; bench/hyperx.py runs the full experiment
def test_unseen_pair_beats_the_no_module_baseline() -> None:
    """A reduced `bench/hyperx.py`: 3 tasks x 4 languages, (person, dis) and (sentiment, suf) never
    trained; 48 examples per training pair, 120 steps. The baseline: MiniLM + a head per held-out task
    trained 96 steps on every training pair of that task.

    Measured (seed 0, one thread, 100 test examples): (sentiment, suf) Hyper-X 0.99, baseline 0.92;
    (person, dis) 0.76 and 0.72. About 195 s (186 s of CPU on one thread), over the ~60 s the learning
    tests aim at: the unseen pair generalises only after ~100 steps on the 10-pair grid (at 64 and 80
    steps an earlier version of this grid stayed at or below chance on its held-out pair).
    At this size the outcome depends on the training mix: holding out (sentiment, suf) alone gave
    0.89 against 0.92. The full bench (128 per pair, 240 steps, seeds 0 and 1) gives 1.0 against
    0.955 and 0.965 on (sentiment, suf) and loses on (person, dis); see README.
    """
    result = _bench().run(
        tasks=TASKS,
        languages=LANGUAGES,
        held_out=(("person", "dis"), ("sentiment", "suf")),
        per_pair=48,
        test_per_pair=100,
        steps=120,
        baseline_steps=96,
        lr=1e-3,
        baseline_lrs=(1e-3,),
        hyperx={"bottleneck_size": 32},
        score_seen=False,
        compare_language=None,
    )
    scores = result["held_out"]["sentiment/suf"]
    assert scores["hyperx"] > scores["baseline"] + 0.04, result["held_out"]
