"""Polytropon learning on the packaged MiniLM: a reduced run of bench/poly.py (shared-skill synthetic
data; multi-task training, then few-shot adaptation to held-out tasks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "poly.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_poly", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.heavy  # not passing yet (Polytropon is in progress): run with `pytest -m heavy`
def test_polytropon_transfers_to_new_tasks_from_few_shots() -> None:
    bench = _bench()
    settings = bench.Settings(**bench.REDUCED)
    result = bench.run(settings)
    accuracy = result["mean"]
    # measured: see bench.REDUCED
    assert result["multitask"]["poly"] > 0.75
    assert accuracy["poly-alloc"] > 0.65
    assert accuracy["poly-alloc"] > accuracy["private"] + 0.03
