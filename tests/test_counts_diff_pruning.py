"""Diff pruning's trainable-parameter counts: two per targeted entry while training (the diff w and
the gate's log α, as Guo et al.'s code keeps `p1` and `alpha` per parameter); after `finalize`,
the entries it keeps. Neither PEFT nor `adapters` has diff pruning. BERT-base's projections hold
84,934,656 entries. Shapes only (meta device).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit

H, L = 768, 12


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, 2 * 84_934_656),
        ({"targets": ("query", "value")}, 2 * L * 2 * H * H),
        ({"targets": ("ffn_in",), "layers": (0,)}, 2 * H * 4 * H),
    ],
)
def test_bert_base(params: dict[str, object], expected: int) -> None:
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("diff_pruning", **params))
    assert mm.trainable_parameters("m") == expected
