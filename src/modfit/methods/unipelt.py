"""UniPELT and MAM: two published unions of methods, as presets of the union config.

* **UniPELT** (Mao et al. 2022, arXiv:2110.07577): LoRA on query and value, prefix tuning and a
  sequential (Pfeiffer) adapter, each scaled by a learned gate, so that training decides per layer
  and per example how much each method contributes. Defaults as in AdapterHub `adapters`: LoRA r=8,
  alpha=2; 10 virtual tokens through the MLP (inner 512); adapter reduction factor 16. On BERT-base
  that is 313,368 + 9,866,252 + 903,756 = 11,083,376 parameters, `adapters`' count.
* **MAM adapter** (He et al. 2022, arXiv:2110.04366, "mix-and-match"): prefix tuning in attention
  (30 virtual tokens, MLP inner 800) plus a scaled parallel adapter beside the FFN (reduction factor
  2, scaling 4). On BERT-base 15,402,272 + 7,091,712 = 22,493,984 parameters, as `adapters`.

Members can be changed like any union member, e.g. `--param lora.r=16 --param prefix.num_virtual_tokens=20`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ModuleConfig
from ..registry import register_method
from .bottleneck import ParallelConfig, PfeifferConfig
from .lora import LoraConfig
from .prefix import PrefixConfig
from .union import UnionConfig, UnionUnit


@register_method(
    "unipelt", UnionUnit, "gated LoRA + prefix + sequential adapter in one module (Mao et al. 2022)"
)
@dataclass(frozen=True)
class UnipeltConfig(UnionConfig):
    components: tuple[ModuleConfig, ...] = (
        LoraConfig(r=8, alpha=2.0, use_gating=True),
        PrefixConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512, use_gating=True),
        PfeifferConfig(reduction_factor=16, use_gating=True),
    )


@register_method("mam", UnionUnit, "prefix tuning + scaled parallel adapter (He et al. 2022)")
@dataclass(frozen=True)
class MamConfig(UnionConfig):
    # Measured on MiniLM (tests/test_learning_union.py, 48 steps): 5e-4: 0.87, 1e-3: 0.865, 1.5e-3: 0.84,
    # 2e-3 (the prefix MLP's own default) diverges to 0.52: the x4-scaled parallel branch needs less.
    default_lr: ClassVar[float | None] = 5e-4  # type: ignore[misc]

    components: tuple[ModuleConfig, ...] = (
        PrefixConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800),
        ParallelConfig(reduction_factor=2, scaling=4.0),
    )
