"""AdapterHub `adapters`' checkpoint format (1.x): a folder per adapter, as `save_adapter` writes it.

    adapter_config.json + pytorch_adapter.bin | adapter.safetensors         the adapter
    head_config.json + pytorch_model_head.bin | model_head.safetensors      its head (with_head=True)
    adapter_fusion_config.json + pytorch_model_adapter_fusion.bin | ...      a fusion (its own folder)

What converts (each translator's docstring has the details and the refusals):

| adapters config | modfit method | file |
|---|---|---|
| seq_bn, double_seq_bn, (scaled_)par_bn | pfeiffer, houlsby, (scaled_)parallel | adapters_bottleneck.py |
| compacter, compacter++ (phm_layer) | compacter, compacter++ | adapters_bottleneck.py |
| lora (composition_mode "add") | lora | adapters_lora.py |
| ia3 (composition_mode "scale") | ia3 (output scalings) | adapters_lora.py |
| prefix_tuning (flat or MLP) | prefix | adapters_prefix.py |
| prompt_tuning | refused: the prompt sits after the embedding layer | adapters_prefix.py |
| classification / tagging heads | seq-cls (pooling "first") / token-cls heads | adapters_head.py |
| AdapterFusion with an identity value map | fusion | adapters_fusion.py |

Writing: safetensors by default (`adapter.safetensors`, `model_head.safetensors`,
`model_adapter_fusion.safetensors`), which adapters reads with `load_adapter(dir, use_safetensors=True)`
(`load_adapter_fusion(..., use_safetensors=True)`); `use_safetensors=False` writes the `.bin` files
instead (`torch.save` of a plain dict of tensors), which `load_adapter` reads by default. Keys carry
the family prefix (`bert.`), as `BertAdapterModel` saves them; adapters strips it for a bare model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import json_writer, safetensors_writer
from ..targets import ModelView
from . import adapters_bottleneck, adapters_lora, adapters_prefix  # noqa: F401  (fill READERS and WRITERS)
from .adapters_common import ADAPTER, FUSION, HEAD, READERS, WRITERS, Files, family_prefix, read_part, wrapper
from .adapters_fusion import fusion_files, read_fusion
from .adapters_head import head_files, read_head
from .registry import ExternalFormat, Imported, InteropError, Writer, register_format

if TYPE_CHECKING:
    from ..model import ModularModel


def _bin_writer(tensors: dict[str, torch.Tensor]) -> Writer:
    """A writer of a plain dict of tensors with `torch.save` (what adapters' default loader reads)."""
    clean = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    return lambda tmp: torch.save(clean, tmp)


class AdaptersFormat(ExternalFormat):
    """AdapterHub `adapters` folders: bottleneck, Compacter, LoRA, IA3, prefix tuning, heads, fusion."""

    name = "adapters"

    def detect(self, folder: Path) -> bool:
        if (folder / FUSION.config).is_file():
            return True
        try:
            config = json.loads((folder / ADAPTER.config).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            return False
        return (
            isinstance(config, dict) and isinstance(config.get("config"), dict) and "peft_type" not in config
        )

    def read(self, folder: Path, view: ModelView) -> Imported:
        part = read_part(folder, ADAPTER)
        if part is None:
            fusion = read_part(folder, FUSION)
            if fusion is None:
                raise InteropError(
                    f"{folder}: neither {ADAPTER.config} nor {FUSION.config}; not an adapters folder"
                )
            return read_fusion(fusion, view)
        version = str(part.wrapper.get("version") or "")
        if not version.startswith("adapters."):
            raise InteropError(
                f'{part.config_path}: "version" is {version!r}: saved by adapter-transformers '
                "(before adapters 1.0); load and save it with adapters first"
            )
        architecture = part.config.get("architecture") or "bottleneck"
        reader = READERS.get(architecture)
        if reader is None:
            raise InteropError(
                f'{part.field("architecture")} is "{architecture}"; modfit converts '
                + ", ".join(sorted(READERS))
            )
        imported = reader(part, view)
        head = read_part(folder, HEAD)
        if head is not None:
            imported.head, head_tensors = read_head(head, view)
            imported.tensors.update(head_tensors)
        imported.card.setdefault("source", {"format": "adapters", "version": version, "name": part.name})
        return imported

    def files(self, mm: ModularModel, name: str, **options: Any) -> list[tuple[str, Writer]]:
        """Options: `use_safetensors` (default True; False writes adapters' default `.bin` files),
        `drop_head=True` exports a module whose head adapters cannot hold (without it)."""
        record = mm._record(name)
        method = record.config.method
        safe = bool(options.get("use_safetensors", True))
        prefix = family_prefix(mm.view)

        def weights(files: Files, tensors: dict[str, torch.Tensor]) -> tuple[str, Writer]:
            named = {(k if k.startswith("heads.") else prefix + k): v for k, v in tensors.items()}
            if safe:
                return files.safetensors, safetensors_writer(named, metadata={"format": "pt"})
            return files.bin, _bin_writer(named)

        if method == "fusion":
            config, tensors = fusion_files(mm, name)
            return [weights(FUSION, tensors), (FUSION.config, json_writer(config))]
        writer = WRITERS.get(method)
        if writer is None:
            raise InteropError(
                f"module '{name}': method '{method}' has no adapters equivalent; adapters' format holds "
                f"{', '.join(sorted(WRITERS))} (and fusion)"
            )
        fields, tensors = writer(mm, name, options)
        out = []
        head = None if options.get("drop_head") else head_files(mm, name)
        if head is not None:
            head_config, head_tensors = head
            out += [weights(HEAD, head_tensors), (HEAD.config, json_writer(head_config))]
        out.append(weights(ADAPTER, tensors))
        out.append(
            (ADAPTER.config, json_writer(wrapper(mm.view, name, fields)))
        )  # last: the folder is complete
        return out


FORMAT = register_format(AdaptersFormat())
