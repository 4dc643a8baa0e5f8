"""Saving and loading modules: safetensors weights plus a JSON card. Never pickle.

A module folder holds::

    module.safetensors   units.<site path>.<param>  (site paths relative to base_model)
                         head.<param>               (when the module has a head)
    module.json          the card: method, config, head and labels, task, language, base model
                         name and fingerprint, metrics, parameter count, modfit version

Both files are written atomically, the card last, so a folder with a card is complete. Loading
checks the card against the base: a module trained on another architecture, other parameter
shapes or other weights is refused with a message that says what differs (`check_base=False`
skips the weight check for deliberate transfers, never the shape check).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .atomic import atomic_write_group, json_writer, safetensors_writer
from .config import ConfigError
from .heads import HeadConfig
from .registry import method_entry
from .targets import ModelView

if TYPE_CHECKING:
    from .model import ModularModel

CARD = "module.json"
WEIGHTS = "module.safetensors"
FORMAT = "modfit-module"
FORMAT_VERSION = 1


class ModuleFileError(ValueError):
    """A module folder is missing, incomplete or malformed; the message names the file."""


class BaseMismatchError(ValueError):
    """A module was trained on a different base model; the message says what differs."""


def fingerprint(view: ModelView) -> dict[str, Any]:
    """Identify a base model: family, parameter names and shapes, and a hash of sampled weights.

    Only parameters under `base_model` count (a task head such as `classifier` does not), named
    relative to it, so a `BertModel` and a `BertForSequenceClassification` built from the same
    checkpoint match. Eight evenly spaced values of every parameter feed the weight hash.
    """
    shapes = hashlib.sha256()
    weights = hashlib.sha256()
    count = 0
    for name, param in sorted(view.base_model.named_parameters(), key=lambda item: item[0]):
        if name.startswith("modfit."):
            continue
        count += param.numel()
        shapes.update(f"{name}:{tuple(param.shape)};".encode())
        flat = param.detach().reshape(-1)
        k = min(8, flat.numel())
        index = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)  # exact integers
        weights.update(flat[index].to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return {
        "model_type": view.model_type,
        "hidden_size": view.hidden_size,
        "num_parameters": count,
        "shapes_sha256": shapes.hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }


def base_name(mm: ModularModel) -> str | None:
    """The base model's name or path as HuggingFace recorded it, if any."""
    return getattr(getattr(mm.model, "config", None), "_name_or_path", None) or None


def save_module(
    mm: ModularModel, name: str, directory: str | Path, *, metrics: dict[str, float] | None = None
) -> Path:
    """Write module `name` to `directory` (created if needed); returns the folder.

    Args:
        metrics: evaluation results to record on the card (merged into earlier ones).
    """
    record = mm._record(name)
    directory = Path(directory)
    tensors = module_state(mm, name)
    all_metrics = {**record.card.get("metrics", {}), **(metrics or {})}
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modfit_version": __version__,
        "name": name,
        "method": record.config.method,
        "config": record.config.to_dict(),
        "head": record.head.to_dict() if record.head else None,
        "task": record.card.get("task"),
        "language": record.card.get("language"),
        # the composition the module was trained in, e.g. "stack(en, ner)" (None: alone)
        "composition": record.card.get("composition"),
        "metrics": all_metrics,
        "parameters": mm.trainable_parameters(name),
        "base": {"name_or_path": base_name(mm), "fingerprint": mm.base_fingerprint},
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Both files are complete before either replaces an earlier save, so a failure (a metric JSON
    # cannot hold, a full disk) leaves the earlier module intact; the card goes last.
    atomic_write_group(
        [
            (directory / WEIGHTS, safetensors_writer(tensors, metadata={"format": FORMAT, "name": name})),
            (directory / CARD, json_writer(card)),
        ]
    )
    record.card["metrics"] = all_metrics
    return directory


def read_card(directory: str | Path) -> dict[str, Any]:
    """The card of a module folder, checked for the fields loading needs.

    Raises:
        ModuleFileError: no folder, no card, invalid JSON (with its line), missing or mistyped fields, or
            a format version newer than this modfit reads.
    """
    directory = Path(directory)
    card_path = directory / CARD
    if not directory.is_dir():
        raise ModuleFileError(f"{directory}: no such module folder")
    if not card_path.is_file():
        raise ModuleFileError(
            f"{card_path}: missing; {directory} is not a modfit module folder (or was not saved completely)"
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModuleFileError(f"{card_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModuleFileError(f'{card_path}: not a modfit module card ("format" is not "{FORMAT}")')
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModuleFileError(
            f"{card_path}: format_version {version!r} is not one this modfit reads "
            f"(it reads up to {FORMAT_VERSION}); upgrade modfit"
        )
    for key in ("name", "method", "config", "base"):
        if key not in card:
            raise ModuleFileError(f'{card_path}: missing key "{key}"')
    kinds: dict[str, type | tuple[type, ...]] = {
        "name": str,
        "method": str,
        "config": dict,
        "base": dict,
        "head": (dict, type(None)),  # optional
    }
    for key, kind in kinds.items():
        if not isinstance(card.get(key), kind):
            expected = "a string" if kind is str else "a JSON object"
            raise ModuleFileError(f'{card_path}: "{key}" must be {expected}, got {card[key]!r}')
    return card


def verify_base(
    card: dict[str, Any], mm: ModularModel, card_path: Path, *, check_weights: bool = True
) -> None:
    """Compare the card's base fingerprint with `mm`'s.

    Raises:
        BaseMismatchError: listing every difference found.
    """
    saved = card["base"].get("fingerprint") or {}
    here = mm.base_fingerprint
    problems = []
    if saved.get("model_type") != here["model_type"]:
        problems.append(f"model type: module has '{saved.get('model_type')}', base is '{here['model_type']}'")
    if saved.get("hidden_size") != here["hidden_size"]:
        problems.append(f"hidden size: module has {saved.get('hidden_size')}, base has {here['hidden_size']}")
    if saved.get("shapes_sha256") != here["shapes_sha256"]:
        problems.append(
            f"parameter names/shapes differ ({saved.get('num_parameters')} parameters in the module's base, "
            f"{here['num_parameters']} here)"
        )
    if check_weights and not problems and saved.get("weights_sha256") != here["weights_sha256"]:
        problems.append(
            "same architecture but different weights "
            "(to load anyway: check_base=False, or --allow-other-weights)"
        )
    if problems:
        trained_on = card["base"].get("name_or_path") or "an unnamed model"
        raise BaseMismatchError(
            f"{card_path}: module '{card['name']}' was trained on {trained_on}, "
            "which differs from this base: " + "; ".join(problems)
        )


def load_module(
    mm: ModularModel, directory: str | Path, *, name: str | None = None, check_base: bool = True
) -> str:
    """Add the module saved in `directory` to `mm` under `name` (default: its saved name).

    A folder without a card that another library's format recognises (a PEFT adapter) is read by
    `modfit.interop.load_external`; `check_base` does not apply there (such folders carry no fingerprint).

    Raises:
        ModuleFileError: a missing or malformed file, or weights that do not fit the config.
        BaseMismatchError: the module was trained on a different base.
        ConfigError: the card's method or config is unknown to this modfit.
    """
    directory = Path(directory)
    if not (directory / CARD).is_file():
        from .interop import detect_format, load_external  # a folder of another library (PEFT, ...)

        if detect_format(directory) is not None:
            return load_external(mm, directory, name=name)
    card = read_card(directory)
    card_path = directory / CARD
    verify_base(card, mm, card_path, check_weights=check_base)
    try:
        entry = method_entry(card["method"])
        config = entry.config_class.from_dict(card["config"], source=str(card_path))
        head = HeadConfig.from_dict(card["head"]) if card.get("head") else None
    except ConfigError as e:
        raise ConfigError(f"{card_path}: {e}") from None
    weights_path = directory / WEIGHTS
    tensors = _read_weights(weights_path)
    new_name = name or card["name"]
    mm.add(new_name, config, head, task=card.get("task"), language=card.get("language"))
    try:
        fill_module(mm, new_name, tensors, weights_path)
    except BaseException:
        mm.remove(new_name)
        raise
    record = mm.records[new_name]
    record.card["metrics"] = dict(card.get("metrics") or {})
    if card.get("composition"):
        record.card["composition"] = card["composition"]
    return new_name


def load_weights(mm: ModularModel, name: str, directory: str | Path) -> None:
    """Copy the weights saved in `directory` into the existing module `name`, in place.

    For resuming training: the module keeps its identity (and an optimizer holding its
    parameters stays valid). The saved weights must fit the module's config exactly.

    Raises:
        ModuleFileError: a missing or unreadable file, or keys/shapes that do not fit.
    """
    weights_path = Path(directory) / WEIGHTS
    fill_module(mm, name, _read_weights(weights_path), weights_path)


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        raise ModuleFileError(f"{weights_path}: missing (the card exists, the weights do not)")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ModuleFileError(f"{weights_path}: cannot read safetensors: {e}") from None


def module_state(mm: ModularModel, name: str) -> dict[str, torch.Tensor]:
    """Module `name`'s tensors under their file keys: `units.<site path>.<param>`, `head.<param>`.

    The values are the live tensors (not copies): filling them loads a module in place.
    """
    state: dict[str, torch.Tensor] = {}
    for path, unit in mm.units(name):
        for key, value in unit.state_dict(keep_vars=True).items():
            state[f"units.{path}.{key}"] = value
    head_module = mm.head_module(name)
    if head_module is not None:
        for key, value in head_module.state_dict(keep_vars=True).items():
            state[f"head.{key}"] = value
    return state


def fill_module(
    mm: ModularModel,
    name: str,
    tensors: dict[str, torch.Tensor],
    source: Path,
    *,
    mismatch: str = "weights do not match the card's config",
    error: type[ValueError] = ModuleFileError,
) -> None:
    """Copy `tensors` (module file keys, see `module_state`) into module `name`; every key must fit.

    Raises:
        `error` (ModuleFileError by default): naming `source`, for missing, unexpected or misshapen
            tensors; `mismatch` says what that means for the caller's file.
    """
    expected = module_state(mm, name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise error(
            f"{source}: {mismatch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            value = tensors[key]
            if value.shape != target.shape:
                raise error(f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.to(dtype=target.dtype, device=target.device))
