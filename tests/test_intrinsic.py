"""Intrinsic-dimension fine-tuning (`methods/intrinsic.py`): the Walsh–Hadamard transform, the
Fastfood projection and its transpose, reproducible factors, one θ_d shared by every unit (saved
once), SAID's scalars, the no-gradient cache, and memory on BERT-base (no dense d × D matrix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

import modfit
from modfit.methods.intrinsic import Fastfood, IntrinsicUnit, _Projection, fwht
from modfit.model import ModularModel
from modfit.persistence import WEIGHTS, load_weights

if TYPE_CHECKING:
    from conftest import Family


@pytest.fixture
def bert(tiny: Callable[[str], Family]) -> Family:
    return tiny("bert")


def _units(mm: ModularModel, name: str) -> list[IntrinsicUnit]:
    return [unit for _, unit in mm.units(name) if isinstance(unit, IntrinsicUnit)]


def _dense(ff: Fastfood) -> torch.Tensor:
    """P as a dense (D, d) matrix, one basis vector at a time."""
    return torch.stack([ff.project(e) for e in torch.eye(ff.d, dtype=torch.float64)], dim=1)


# -- the transform -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 32, 64, 2048])
def test_fwht_is_the_hadamard_matrix(length: int) -> None:
    """H[i, j] = (-1)^popcount(i & j) (Sylvester order), built here independently of the module."""
    i = torch.arange(length)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    for b in range(max(length.bit_length(), 1)):
        parity ^= (bits >> b) & 1
    h = (1 - 2 * parity).double()
    x = torch.randn(3, length, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h)
    torch.testing.assert_close(fwht(fwht(x)), length * x)


def test_fwht_rejects_other_lengths() -> None:
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 12))


@pytest.mark.parametrize(("d", "size"), [(37, 300), (64, 64), (50, 20), (1, 7)])
def test_fastfood_transpose_and_norms(d: int, size: int) -> None:
    """project_t is exactly Pᵀ; the columns of P have unit norm on average (several blocks, a
    truncated last block, d > D, d = 1)."""
    ff = Fastfood.generate(d, size, seed=0, index=3)
    p = _dense(ff)
    assert p.shape == (size, d)
    pt = torch.stack([ff.project_t(e) for e in torch.eye(size, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(pt, p.t(), atol=1e-12, rtol=0)
    if size >= d:
        assert abs(p.norm(dim=0).pow(2).mean().item() - 1) < 0.1


def test_projection_gradients() -> None:
    ff = Fastfood.generate(13, 100, seed=1, index=0)
    theta = torch.randn(13, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: _Projection.apply(t, s, ff), (theta, lam))
    assert torch.autograd.gradcheck(lambda t: _Projection.apply(t, None, ff), (theta,))


def test_factors_come_from_the_seed() -> None:
    """The same (seed, index) gives the same P anywhere; another index or seed another P. The pinned
    values guard saved modules: their projection is regenerated, so the stream must never change."""
    a, b = Fastfood.generate(10, 40, 0, 0), Fastfood.generate(10, 40, 0, 0)
    assert all(torch.equal(x, y) for x, y in [(a.signs, b.signs), (a.perm, b.perm), (a.gauss, b.gauss)])
    assert not torch.equal(_dense(a), _dense(Fastfood.generate(10, 40, 0, 1)))
    assert not torch.equal(_dense(a), _dense(Fastfood.generate(10, 40, 1, 0)))
    assert a.signs.shape == (3, 16) and a.signs.dtype == torch.int8 and a.perm.dtype == torch.int16
    assert a.perm[0, :6].tolist() == PINNED_PERM
    assert a.signs[0, :6].tolist() == PINNED_SIGNS
    assert a.gauss[0, :3].tolist() == PINNED_GAUSS


PINNED_PERM = [5, 2, 10, 11, 3, 1]
PINNED_SIGNS = [1, 1, 1, -1, 1, -1]
PINNED_GAUSS = [-1.81640625, 0.4619140625, 1.236328125]  # float16 values, exact


# -- the module ----------------------------------------------------------------------------------


@pytest.mark.parametrize("said", [True, False])
def test_one_shared_theta_saved_once(bert: Family, tmp_path: Path, said: bool) -> None:
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("intrinsic", d=50, said=said))
    units = _units(mm, "m")
    first_path = next(iter(mm.units("m")))[0]
    assert len(units) == 12  # 2 layers × 6 projections
    theta = units[0].theta_d
    assert all(u.theta_d is theta for u in units)
    assert mm.trainable_parameters("m") == 50 + (12 if said else 0)
    with torch.no_grad():
        for p in mm.module_parameters("m"):
            p.copy_(torch.randn(p.shape) * 0.1)
    mm.activate("m")
    expected = bert.run(mm.model).detach()
    mm.save("m", tmp_path / "m")

    tensors = load_file(str(tmp_path / "m" / WEIGHTS))
    assert sum(t.numel() for t in tensors.values()) == 50 + (12 if said else 0)
    assert [k for k, t in tensors.items() if t.numel() == 50] == [f"units.{first_path}.theta"]

    mm2 = modfit.wrap(bert.build())
    mm2.load(tmp_path / "m")
    mm2.activate("m")
    loaded = _units(mm2, "m")
    assert all(u.theta_d is loaded[0].theta_d for u in loaded)  # still one tensor after loading
    assert torch.equal(bert.run(mm2.model), expected)
    load_weights(mm2, "m", tmp_path / "m")  # in place (resuming): keeps the sharing
    assert all(u.theta_d is loaded[0].theta_d for u in loaded)
    with torch.no_grad():
        loaded[0].theta_d.zero_()  # one change reaches every unit
        if said:
            assert all(u.said_lambda is not None for u in loaded)
        torch.testing.assert_close(bert.run(mm2.model), bert.run(bert.build()))


def test_said_scalars_scale_each_tensor(bert: Family) -> None:
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("intrinsic", d=20, said=True))
    units = _units(mm, "m")
    with torch.no_grad():
        units[0].theta_d.copy_(torch.randn(20))
        before = [u.delta_weight().clone() for u in units[:2]]
        assert units[0].said_lambda is not None and units[1].said_lambda is not None
        units[0].said_lambda.fill_(0.0)
        units[1].said_lambda.fill_(2.0)
        assert torch.equal(units[0].delta_weight(), torch.zeros_like(before[0]))
        torch.testing.assert_close(units[1].delta_weight(), 2 * before[1])
    # ‖ΔW‖_F ≈ λ‖θ‖: unit columns (the reference normalisation)
    ratio = before[1].norm() / units[0].theta_d.norm()
    assert 0.7 < ratio.item() < 1.3


def test_delta_layout_follows_the_weight(tiny: Callable[[str], Family]) -> None:
    """GPT-2's Conv1D stores its weight as (in, out): the delta and merge follow that layout."""
    gpt2 = tiny("gpt2")
    mm = modfit.wrap(gpt2.build())
    mm.add("m", modfit.config("intrinsic", d=16))
    for path, unit in mm.units("m"):
        weight = mm.view.module(path).weight
        assert isinstance(unit, IntrinsicUnit) and unit.fan_in_fan_out
        assert unit.delta_weight().shape == weight.shape


def test_cache_when_no_gradient_is_needed(bert: Family) -> None:
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("intrinsic", d=20))
    unit = _units(mm, "m")[3]
    theta = unit.theta_d
    with torch.no_grad():
        theta.copy_(torch.randn(20))
        first = unit.delta_weight()
        assert unit.delta_weight() is first  # unchanged parameters: cached
        theta.mul_(2)
        second = unit.delta_weight()
        assert second is not first
        torch.testing.assert_close(second, 2 * first)
    with_grad = unit.delta_weight()  # θ_d trainable and grad mode on: fresh, with a graph
    assert with_grad.requires_grad and unit._cache is None
    mm.train_only("m")
    mm.model.eval()
    with torch.no_grad():
        assert not unit.delta_weight().requires_grad


def test_config_validation() -> None:
    with pytest.raises(modfit.ConfigError, match=r"intrinsic\.d"):
        modfit.config("intrinsic", d=0)
    with pytest.raises(modfit.ConfigError, match=r"intrinsic\.seed"):
        modfit.config("intrinsic", seed=-1)
    config = modfit.config("intrinsic", d="64", said="false", targets="query,value", seed="7")
    assert (config.d, config.said, config.targets, config.seed) == (64, False, ("query", "value"), 7)


def test_builds_without_generating_factors() -> None:
    """Factors appear on first use only, so adding a module on a meta-device model is free."""
    import transformers

    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("intrinsic"))
    assert all(u._fastfood is None for u in _units(mm, "m"))


# -- memory on BERT-base ---------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource, torch, transformers, modfit
    from modfit.methods.intrinsic import IntrinsicUnit

    def rss():  # resident bytes now
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(1000, 2000, (2, 8))
    model(input_ids=ids)  # allocator warm-up on the base alone
    gc.collect()
    before = rss()
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("intrinsic", d=1000, targets=("all-linear",)))
    mm.train_only("m")
    out = model(input_ids=ids).last_hidden_state
    out.pow(2).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    units = [u for _, u in mm.units("m") if isinstance(u, IntrinsicUnit)]
    factors = sum(
        sum(t.numel() * t.element_size() for t in (u._fastfood.signs, u._fastfood.perm, u._fastfood.gauss))
        for u in units
    )
    deltas = sum(4 * u._fastfood.size for u in units)  # ΔW kept for backward, float32
    theta = units[0].theta_d
    print(json.dumps({
        "base_bytes": base_bytes, "peak_delta": peak - before, "factors": factors, "deltas": deltas,
        "units": len(units), "targeted": sum(u._fastfood.size for u in units),
        "theta_grad": bool(theta.grad is not None and theta.grad.abs().sum() > 0),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_memory_on_bert_base_is_a_small_factor() -> None:
    """d = 1000 over all 72 layer projections of a random-init BERT-base (85M targeted weights): one
    forward/backward on a (2, 8) batch, measured in a fresh process as peak RSS minus RSS before the
    module was added. A dense d × D projection would take 1000 × 84,934,656 × 4 B = 340 GB.

    Measured (438 MB of base parameters): the stored factors take 0.97× that (5 B per targeted entry),
    the ΔW kept until backward 0.78×; peak RSS grew by 2.0-2.2× (allocator overhead included).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    base = m["base_bytes"]
    assert m["units"] == 72 and m["targeted"] == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert m["theta_grad"]
    assert m["factors"] == 5 * m["targeted"]  # int8 + int16 + float16 per entry, no dense matrix
    assert (m["factors"] + m["deltas"]) / base < 2.0
    assert m["peak_delta"] / base < 3.0, f"peak RSS grew by {m['peak_delta'] / base:.2f}× the base"
