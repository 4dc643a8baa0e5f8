"""Trainable-parameter counts on BERT-base against published numbers and hand computation.

LoRA r=8 on query and value: 12 layers × 2 × 8 × (768 + 768) = 294,912 (Hu et al. 2021).
Pfeiffer at reduction factor 16 (bottleneck 48): 12 × (768·48 + 48 + 48·768 + 768) = 894,528;
Houlsby adapts both sub-layers: twice that.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit
from modfit.model import ModularModel

H, L = 768, 12


def _adapter(hidden: int, bottleneck: int) -> int:
    """down (weight + bias) and up (weight + bias) of one bottleneck adapter."""
    return hidden * bottleneck + bottleneck + bottleneck * hidden + hidden


@pytest.fixture(scope="module")
def bert_base() -> ModularModel:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    assert model.config.hidden_size == H and model.config.num_hidden_layers == L
    return modfit.wrap(model)


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("lora", {"r": 8}, 294_912),
        ("lora", {"r": 8, "targets": ("query", "value")}, L * 2 * 8 * (H + H)),
        ("lora", {"r": 4, "targets": ("ffn_in",)}, L * 4 * (H + 4 * H)),
        ("lora", {"r": 8, "layers": (0,)}, 24_576),
        ("lora", {"r": 8, "layers": (10, 11)}, 2 * 24_576),
        ("pfeiffer", {"reduction_factor": 16}, 894_528),
        ("pfeiffer", {}, L * _adapter(H, 48)),
        ("pfeiffer", {"bottleneck_size": 64}, L * _adapter(H, 64)),
        ("pfeiffer", {"reduction_factor": 16, "layers": (0, 1, 2)}, 3 * _adapter(H, 48)),
        ("houlsby", {"reduction_factor": 16}, 1_789_056),
        ("houlsby", {"bottleneck_size": 48}, 1_789_056),
        ("houlsby", {"bottleneck_size": 32}, 2 * L * _adapter(H, 32)),
        ("houlsby", {"layers": (11,)}, 2 * _adapter(H, 48)),
        ("parallel", {"reduction_factor": 16}, 894_528),
        ("scaled_parallel", {"reduction_factor": 16}, 894_528),
    ],
)
def test_module_parameter_count(
    bert_base: ModularModel, method: str, params: dict[str, object], expected: int
) -> None:
    mm = bert_base
    mm.add("m", modfit.config(method, **params))
    try:
        assert mm.trainable_parameters("m") == expected
        assert sum(p.numel() for p in mm.module_parameters("m", include_head=False)) == expected
    finally:
        mm.remove("m")


def test_published_numbers_by_hand() -> None:
    assert L * 2 * 8 * (H + H) == 294_912
    assert L * _adapter(H, H // 16) == 894_528
    assert 2 * L * _adapter(H, H // 16) == 1_789_056


def test_head_counts_separately(bert_base: ModularModel) -> None:
    mm = bert_base
    mm.add("m", modfit.config("lora", r=8), head=modfit.head("seq-cls", ["a", "b", "c"]))
    try:
        head = (H * H + H) + (H * 3 + 3)  # dense + out
        assert mm.trainable_parameters("m") == 294_912
        assert mm.trainable_parameters("m", include_head=True) == 294_912 + head
        assert sum(p.numel() for p in mm.train_only("m")) == 294_912 + head
        assert sum(p.numel() for p in mm.model.parameters() if p.requires_grad) == 294_912 + head
    finally:
        mm.remove("m")
