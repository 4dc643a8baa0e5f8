"""What the PEFT translators share: the checkpoint as read, the field checks, and the tables that map
PEFT's `peft_type` to a reader and modfit's method name to a writer (filled by `peft_lora.py`,
`peft_ia3.py` and `peft_prompt.py` with the decorators below)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..targets import ModelView
from .registry import Handlers, Imported, InteropError

if TYPE_CHECKING:
    from ..model import ModularModel

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# Keys that never change what the weights mean (metadata, or options only read when another key is set).
METADATA = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "megatron_core",  # the module name used with megatron_config
        "qalora_group_size",  # used with use_qalora
        "layers_pattern",  # read with layers_to_transform
    }
)


@dataclass
class Checkpoint:
    """A PEFT folder as read: its config (a dict), its tensors and the two file paths (for messages)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: Path
    weights_path: Path

    def field(self, key: str) -> str:
        """`<config path>: "key"` for messages about a config field."""
        return f'{self.config_path}: "{key}"'

    def key(self, key: str) -> str:
        """`<weights path>: key` for messages about a tensor."""
        return f"{self.weights_path}: {key}"

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """The value of config field `key`, which must be present and of `kind`."""
        value = self.config.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            raise InteropError(f"{self.field(key)} is missing or not a {_kind_name(kind)} (got {value!r})")
        return value

    def check_fields(self, handled: Iterable[str]) -> None:
        """Every field that is neither handled nor metadata must be unset (null, false, empty).

        Raises:
            InteropError: naming the first field set to something modfit would silently ignore.
        """
        known = set(handled) | METADATA
        for key, value in self.config.items():
            if key not in known and value not in (None, False, [], {}, ""):
                raise InteropError(
                    f"{self.field(key)} is {value!r}: modfit has no equivalent, so this checkpoint cannot be "
                    "converted without changing what it computes"
                )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "integer", float: "number", str: "string", list: "list", dict: "mapping", bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


Reader = Callable[[Checkpoint, ModelView], Imported]
# A writer returns (adapter_config fields, tensors under PEFT's keys) for one module.
Export = tuple[dict[str, Any], dict[str, torch.Tensor]]
Writer = Callable[["ModularModel", str, dict[str, Any]], Export]

READERS: Handlers[Reader] = Handlers()  # by `peft_type`
WRITERS: Handlers[Writer] = Handlers()  # by modfit method
reads, writes = READERS.register, WRITERS.register


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (weight stored (in, out)): PEFT's `fan_in_fan_out` layers."""
    return type(module).__name__ == "Conv1D"


def task_type(view: ModelView, options: dict[str, Any]) -> str | None:
    """PEFT's `task_type` for the model the keys are written for (its class), unless given."""
    given = options.get("task_type")
    if given is not None:
        return str(given)
    name = type(view.model).__name__
    for ending, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(ending):
            return task
    return "FEATURE_EXTRACTION"


def number(value: float) -> int | float:
    """A float written as an int when it is one (PEFT's configs hold `lora_alpha: 16`)."""
    return int(value) if float(value).is_integer() else float(value)


def model_order(view: ModelView, sites: Iterable[str]) -> list[str]:
    """`sites` sorted in the order of the model's modules."""
    order = {p: i for i, (p, _) in enumerate(view.base_model.named_modules())}
    return sorted(sites, key=lambda s: order.get(s, len(order)))
