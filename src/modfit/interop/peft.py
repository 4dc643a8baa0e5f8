"""HuggingFace PEFT's checkpoint format: `adapter_config.json` + `adapter_model.safetensors`.

A PEFT folder holds the adapter named "default" (`save_pretrained(dir)`)::

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.<module name>.lora_A.weight, ...; prompts: prompt_embeddings
    (adapter_model.bin)        the same dict pickled (older PEFT); read with torch.load(weights_only=True)

What converts (each translator's docstring has the details):

| PEFT `peft_type` | modfit method | file |
|---|---|---|
| LORA (rsLoRA, rank/alpha patterns, fan_in_fan_out) | lora (a union of lora per (r, alpha)) | peft_lora.py |
| LORA with `use_dora` | dora (a union of dora members for patterns) | peft_lora.py |
| IA3 | ia3 | peft_ia3.py |
| PROMPT_TUNING | prompt | peft_prompt.py |
| PREFIX_TUNING (with or without prefix_projection) | prefix (the stored table) | peft_prompt.py |

A config field that would change what the weights compute and that modfit cannot express is refused
by name (e.g. `"bias": "all"`, `lora_bias`, `modules_to_save`, LoRA on embeddings), never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import json_writer, safetensors_writer
from ..persistence import base_name
from ..targets import ModelView
from . import peft_ia3, peft_lora, peft_prompt  # noqa: F401  (fill READERS and WRITERS)
from .peft_common import BIN_FILE, CONFIG_FILE, READERS, SAFETENSORS_FILE, WRITERS, Checkpoint
from .registry import ExternalFormat, Imported, InteropError, Writer, read_json, read_tensors, register_format

if TYPE_CHECKING:
    from ..model import ModularModel


def read_checkpoint(folder: Path) -> Checkpoint:
    """The config and tensors of a PEFT folder.

    Raises:
        InteropError: a missing file, invalid JSON (with its line), no `peft_type`, unreadable weights.
    """
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InteropError(f"{config_path}: missing; {folder} is not a PEFT adapter folder")
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise InteropError(f'{config_path}: no "peft_type"; not a PEFT adapter config')
    tensors, weights_path = read_tensors(folder, SAFETENSORS_FILE, BIN_FILE, "the adapter's weights")
    return Checkpoint(config, tensors, config_path, weights_path)


class PeftFormat(ExternalFormat):
    """HuggingFace PEFT adapters (LoRA, DoRA, IA3, prompt tuning, prefix tuning)."""

    name = "peft"

    def detect(self, folder: Path) -> bool:
        if not (folder / CONFIG_FILE).is_file():
            return False
        if (folder / SAFETENSORS_FILE).is_file() or (folder / BIN_FILE).is_file():
            return True
        try:  # a config without weights: still PEFT's, so loading names the missing file
            return "peft_type" in json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, TypeError):
            return False

    def read(self, folder: Path, view: ModelView) -> Imported:
        checkpoint = read_checkpoint(folder)
        peft_type = checkpoint.config["peft_type"]
        reader = READERS.get(peft_type)
        if reader is None:
            raise InteropError(
                f'{checkpoint.field("peft_type")} is "{peft_type}"; modfit converts '
                + ", ".join(sorted(READERS))
            )
        return reader(checkpoint, view)

    def files(self, mm: ModularModel, name: str, **options: Any) -> list[tuple[str, Writer]]:
        """Options: `drop_head=True` exports a module whose head PEFT cannot hold (without it);
        `task_type` overrides the PEFT task type (default: from the model's class)."""
        record = mm._record(name)
        method = record.config.method
        writer = WRITERS.get(method)
        if writer is None:
            raise InteropError(
                f"module '{name}': method '{method}' has no PEFT equivalent; PEFT's format holds "
                f"{', '.join(sorted(WRITERS))}"
            )
        head = mm.head_module(name)
        if head is not None and any(True for _ in head.parameters()) and not options.get("drop_head"):
            raise InteropError(
                f"module '{name}' has a {record.head.task if record.head else ''} head, which PEFT's format "
                "cannot hold; export without it (drop_head=True, `--drop-head`)"
            )
        config, tensors = writer(mm, name, options)
        config = {
            "peft_type": config.pop("peft_type"),
            "task_type": config.pop("task_type", None),
            "base_model_name_or_path": base_name(mm),
            "revision": None,
            "inference_mode": True,
            **config,
        }
        return [
            (SAFETENSORS_FILE, safetensors_writer(tensors, metadata={"format": "pt"})),
            (CONFIG_FILE, json_writer(config)),  # last: a folder with a config is complete
        ]


FORMAT = register_format(PeftFormat())
