"""Compacter and gated / learned-scaling adapter counts against AdapterHub `adapters`.

The expected numbers are adapters' own: adapters 1.3.0 (with transformers 4.57.6), `adapters.init(
BertModel(BertConfig()))`, `add_adapter("a", config=...)`, `train_adapter("a")`, counting parameters
with requires_grad (the shared PHM rule, in `shared_parameters`, included). The outputs also matched
adapters' (max difference 5e-7) on a tiny BERT with random weights, for Compacter, Compacter++,
factorised rules, shared W, unshared rules with full W, and gating with learned and per-channel
scaling (a cross-check run outside this suite, which does not depend on adapters).

By hand, BERT-base, bottleneck 768 / 32 = 24, phm_dim 4, rank 1 (per-axis sizes 192 and 6):
down W_left 4·192 + W_right 4·6 + b 24 = 816; up 4·6 + 4·192 + b 768 = 1,560; one adapter 2,376;
the shared rule 4·4·4 = 64. Compacter (after attention and FFN): 24 · 2,376 + 64 = 57,088 (the
issue's number); Compacter++ (after the FFN): 12 · 2,376 + 64 = 28,576.

Gating adds Linear(768, 1) = 769 per adapter; "learned" scaling one scalar, "channel" 768.

Models are built on the meta device: shapes only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

import modfit

H, L = 768, 12


def _count(method: str, **params: Any) -> int:
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("m", modfit.config(method, **params))
    return mm.trainable_parameters("m")


def test_by_hand() -> None:
    down = 4 * (H // 4) + 4 * (24 // 4) + 24
    up = 4 * (24 // 4) + 4 * (H // 4) + H
    assert (down, up) == (816, 1_560)
    assert 2 * L * (down + up) + 4**3 == 57_088
    assert L * (down + up) + 4**3 == 28_576


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("compacter", {}, 57_088),  # adapters' CompacterConfig()
        ("compacter++", {}, 28_576),  # CompacterPlusPlusConfig()
        ("compacter", {"phm_rank": 4}, 171_136),
        ("compacter", {"shared_W_phm": True}, 20_656),
        ("compacter", {"factorized_phm_rule": True}, 57_056),
        ("compacter", {"factorized_phm_W": False}, 240_256),
        ("compacter", {"phm_dim": 8, "reduction_factor": 16}, 59_264),
        ("compacter", {"phm_bias": False}, 38_080),
        # adapters counts 57,088 here: its train_adapter() turns the fixed rule's gradient back on
        ("compacter", {"learn_phm": False}, 57_088 - 64),
        ("compacter", {"layers": (0,)}, 2 * 2_376 + 64),
        # SeqBnConfig / DoubleSeqBnConfig with learned scaling and gating
        ("pfeiffer", {"scaling": "learned"}, 894_528 + L),
        ("pfeiffer", {"scaling": "channel"}, 894_528 + L * H),
        ("pfeiffer", {"use_gating": True}, 894_528 + L * (H + 1)),
        ("houlsby", {"use_gating": True, "scaling": "channel"}, 1_789_056 + 2 * L * (H + 1 + H)),
        ("houlsby", {"use_gating": True, "scaling": "channel"}, 1_825_944),
    ],
)
def test_bert_base_equals_adapters(method: str, params: dict[str, Any], expected: int) -> None:
    assert _count(method, **params) == expected


def test_plain_presets_unchanged() -> None:
    assert _count("pfeiffer", reduction_factor=16) == 894_528
    assert _count("houlsby", reduction_factor=16) == 1_789_056
