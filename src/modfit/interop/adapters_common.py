"""What the AdapterHub `adapters` translators share: the files of a saved folder, reading one
config + weights pair, field checks, the model's key prefix and where `adapters` puts its layers.

An `adapters` folder (`model.save_adapter(dir, name)`, adapters 1.x) holds up to three such pairs::

    adapter_config.json         {"config": {...method fields...}, "name", "model_type", "hidden_size",
                                 "model_class", "model_name", "version": "adapters.1.3.0"}
    pytorch_adapter.bin         the weights, pickled (adapters' default), or
    adapter.safetensors         with `save_adapter(..., use_safetensors=True)`
    head_config.json            + pytorch_model_head.bin / model_head.safetensors (`with_head=True`)
    adapter_fusion_config.json  + pytorch_model_adapter_fusion.bin / model_adapter_fusion.safetensors
                                (`save_adapter_fusion`; a folder of its own)

Keys are module paths of the `adapters` model with the adapter's name inside them, e.g.
`bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight`; `BertAdapterModel` writes the
family prefix (`bert.`), a `BertModel` after `adapters.init` does not. Reading accepts both; writing
uses the prefix, which `adapters` strips again when the model has none.

Pickled `.bin` files are read only with `torch.load(weights_only=True)`: tensors and plain containers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..targets import ModelView, ResolvedHookPoint, TargetError
from .registry import Handlers, Imported, InteropError, read_json, read_tensors

if TYPE_CHECKING:
    from ..model import ModularModel

VERSION = "adapters.1.3.0"  # the release these files are written for (and tested against)


@dataclass(frozen=True)
class Files:
    """The three files of one part of a folder: its config, safetensors and pickled weights."""

    config: str
    safetensors: str
    bin: str


ADAPTER = Files("adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin")
HEAD = Files("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
FUSION = Files(
    "adapter_fusion_config.json", "model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin"
)

# Model types whose layers `adapters` adapts in BERT's layout: the bottleneck layers are the modules
# that hold the sub-layer's LayerNorm (`attention.output`, `output`), LoRA sits on the projections.
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "electra"})

# Fields of adapter_config.json's wrapper that describe the model, not the weights.
WRAPPER_KEYS = frozenset(
    {"config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"}
)


@dataclass
class Part:
    """One config + weights pair as read: the whole JSON, its "config" mapping, tensors, file paths."""

    wrapper: dict[str, Any]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: Path
    weights_path: Path

    @property
    def name(self) -> str:
        return str(self.wrapper.get("name") or "")

    def field(self, key: str) -> str:
        """`<config path>: config.key` for messages about a config field."""
        return f'{self.config_path}: "config.{key}"'

    def key(self, key: str) -> str:
        """`<weights path>: key` for messages about a tensor."""
        return f"{self.weights_path}: {key}"

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def check_fields(self, handled: Iterable[str], neutral: dict[str, Any] | None = None) -> None:
        """Every field that is neither handled nor at its neutral value must be unset.

        Args:
            neutral: fields with the value at which they change nothing (e.g. `cross_adapter: false`).

        Raises:
            InteropError: naming the first field set to something modfit would silently ignore.
        """
        known = set(handled) | {"architecture"}
        for key, value in self.config.items():
            if key in known or value in (None, False, [], {}, ""):
                continue
            if neutral is not None and key in neutral and value == neutral[key]:
                continue
            raise InteropError(
                f"{self.field(key)} is {value!r}: modfit has no equivalent, so this adapter cannot be "
                "converted without changing what it computes"
            )


def read_part(folder: Path, files: Files) -> Part | None:
    """The config and weights of one part of an `adapters` folder; None when its config is absent.

    Raises:
        InteropError: invalid JSON (with its line), no "config" mapping, missing or unreadable weights.
    """
    config_path = folder / files.config
    if not config_path.is_file():
        return None
    wrapper = read_json(config_path)
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get("config"), dict):
        raise InteropError(f'{config_path}: no "config" mapping; not an adapters config')
    tensors, weights = read_tensors(folder, files.safetensors, files.bin, f"the weights of {files.config}")
    return Part(wrapper, wrapper["config"], tensors, config_path, weights)


def family_prefix(view: ModelView) -> str:
    """The prefix `adapters`' flexible-head model puts before base-model keys (`bert.`)."""
    prefix = getattr(view.base_model, "base_model_prefix", "") or getattr(view.model, "base_model_prefix", "")
    return f"{prefix}." if prefix else ""


def strip_prefix(view: ModelView, key: str) -> str:
    """`key` relative to the base model (without `bert.` when present)."""
    prefix = family_prefix(view)
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def require_layout(view: ModelView, what: str) -> None:
    """Refuse model types whose `adapters` module paths modfit does not map.

    Raises:
        InteropError: naming the model type and the ones that convert.
    """
    if view.model_type not in BERT_LIKE:
        raise InteropError(
            f"{what}: modfit maps adapters' module paths for model types {', '.join(sorted(BERT_LIKE))}, "
            f"not '{view.model_type}'"
        )


def bottleneck_points(view: ModelView, roles: Iterable[str]) -> dict[str, tuple[str, int, str]]:
    """adapters' bottleneck layer path (e.g. `encoder.layer.0.output`) -> (modfit site, layer, role)
    for every layer and each of `roles` ("attn_output", "ffn_output").

    adapters' layer is the module that applies the sub-layer's LayerNorm, i.e. the parent of modfit's
    hook point (`encoder.layer.0.output.dropout`).
    """
    found: dict[str, tuple[str, int, str]] = {}
    try:
        refs = view.layers()
    except TargetError as e:
        raise InteropError(str(e)) from None
    for ref in refs:
        for role in roles:
            point: ResolvedHookPoint = view.hook_points([role], [ref.index])[0]
            if point.norm_path is None:
                raise InteropError(f"{view.model_type}: {role} of layer {ref.index} has no LayerNorm to hook")
            found[point.norm_path.rsplit(".", 1)[0]] = (point.path, ref.index, role)
    return found


def wrapper(
    view: ModelView, name: str, config: dict[str, Any], model_class: str | None = None
) -> dict[str, Any]:
    """adapter_config.json / head_config.json: the method fields inside adapters' wrapper."""
    return {
        "config": config,
        "hidden_size": view.hidden_size,
        "model_class": model_class or f"{type(view.base_model).__name__.removesuffix('Model')}AdapterModel",
        "model_name": getattr(view.base_model.config, "name_or_path", "") or "",
        "model_type": view.model_type,
        "name": name,
        "version": VERSION,
    }


def leave_out(view: ModelView, layers: Iterable[int] | None) -> list[int]:
    """adapters' `leave_out` (layers without the module) from modfit's `layers` (None: every layer)."""
    if layers is None:
        return []
    chosen = set(layers)
    return sorted({ref.index for ref in view.layers()} - chosen)


def chosen_layers(view: ModelView, part: Part) -> tuple[int, ...] | None:
    """modfit's `layers` from adapters' `leave_out` (None when it leaves out nothing)."""
    out = part.get("leave_out") or []
    if not isinstance(out, list) or not all(isinstance(i, int) for i in out):
        raise InteropError(f"{part.field('leave_out')} is {out!r}: expected a list of layer indices")
    if not out:
        return None
    every = sorted({ref.index for ref in view.layers()})
    kept = tuple(i for i in every if i not in set(out))
    if not kept:
        raise InteropError(f"{part.field('leave_out')} leaves out every layer")
    return kept


# A reader turns the adapter part into a modfit module; a writer gives (config fields, tensors under
# adapters' keys relative to the base model, i.e. without `bert.`) for module `name`.
Reader = Callable[[Part, ModelView], Imported]
Export = tuple[dict[str, Any], dict[str, torch.Tensor]]
Writer = Callable[["ModularModel", str, dict[str, Any]], Export]

READERS: Handlers[Reader] = Handlers()  # by `config.architecture` ("bottleneck" for absent/null)
WRITERS: Handlers[Writer] = Handlers()  # by modfit method
reads, writes = READERS.register, WRITERS.register


def number(value: float) -> int | float:
    """A float written as an int when it is one (adapters' configs hold `reduction_factor: 16`)."""
    return int(value) if float(value).is_integer() else float(value)
