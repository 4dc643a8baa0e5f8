"""The same fine-tuning configuration built in modfit, PEFT and AdapterHub `adapters` (for bench/peers.py).

Every configuration is written once per system with the same settings: LoRA r=8, alpha 16, dropout 0
on query and value; (IA)³ on key, value and both output projections, those scaled at their input
(PEFT's BERT default and modfit's); prefix and prompt tuning with 20 virtual tokens, no projection,
random init; bottleneck adapters at reduction factor 16 (compacter 32, phm_dim 4), dropout 0, the
parallel one at scaling 1 (modfit's `parallel`; `adapters`' ParBn defaults to factor 2, scaling 4);
fusion of 3 pfeiffer adapters (only the fusion layers train, attention dropout 0 in both); a stack of
2 pfeiffer adapters training the upper one; `full` trains every weight of the plain model.

Each system gets the same task head: modfit's own seq-cls head (mean pooling -> dense -> tanh ->
dropout 0.1 -> linear, 2 labels); for the peers the same class (`modfit.heads.SequenceClassificationHead`)
on their last hidden states, so head cost is equal. Trainable-parameter counts exclude the head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modfit

SYSTEMS = ("modfit", "peft", "adapters", "plain")
VIRTUAL = 20  # prompt / prefix length

# config -> the peers it is compared with (modfit always runs; `full` runs the plain model only)
TRAIN_CONFIGS: dict[str, tuple[str, ...]] = {
    "lora": ("peft", "adapters"),
    "ia3": ("peft",),
    "prefix": ("peft",),
    "prompt": ("peft",),
    "pfeiffer": ("adapters",),
    "houlsby": ("adapters",),
    "parallel": ("adapters",),
    "compacter": ("adapters",),
    "fusion3": ("adapters",),
    "stack2": ("adapters",),
    "full": (),
}
# Parameter-count differences that are the methods' own, not the harness's: (config, peer) -> why.
KNOWN_COUNT_GAPS = {
    ("fusion3", "adapters"): "adapters' fusion value projection has no bias (modfit's has: +width per layer)",
}
# Output differences with equal weights that are the methods' own: (config, peer) -> why.
KNOWN_OUTPUT_GAPS = {
    ("fusion3", "adapters"): "adapters attends over the adapters' up-projections (query LN(h + r)) and adds "
    "the residual after; modfit over each branch's whole output (query h)",
}

MODFIT_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ("query", "value")}),
    "ia3": ("ia3", {}),  # PEFT's BERT placement: key, value, both output.dense (scaled at their input)
    "prefix": ("prefix", {"num_virtual_tokens": VIRTUAL}),
    "prompt": ("prompt", {"num_virtual_tokens": VIRTUAL, "init": "random"}),
    "pfeiffer": ("pfeiffer", {"reduction_factor": 16}),
    "houlsby": ("houlsby", {"reduction_factor": 16}),
    "parallel": ("parallel", {"reduction_factor": 16, "scaling": 1.0}),
    "compacter": ("compacter", {}),
}


def peft_config(name: str) -> Any:
    import peft

    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    if name == "ia3":
        return peft.IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        )
    if name == "prefix":
        return peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=VIRTUAL)
    if name == "prompt":
        return peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=VIRTUAL)
    raise KeyError(name)


def adapters_config(name: str) -> Any:
    import adapters

    if name == "lora":
        return adapters.LoRAConfig(
            r=8, alpha=16, dropout=0.0, attn_matrices=["q", "v"], intermediate_lora=False, output_lora=False
        )
    if name in ("pfeiffer", "fusion3", "stack2"):
        return adapters.SeqBnConfig(reduction_factor=16)
    if name == "houlsby":
        return adapters.DoubleSeqBnConfig(reduction_factor=16)
    if name == "parallel":
        return adapters.ParBnConfig(reduction_factor=16, scaling=1.0)
    if name == "compacter":
        return adapters.CompacterConfig()  # reduction 32, phm_dim 4, shared rule: modfit's defaults
    raise KeyError(name)


# -- base models ---------------------------------------------------------------------------------

MODELS = ("minilm", "bert-base")


def load_base(model: str, seed: int = 0) -> nn.Module:
    """The packaged MiniLM (pretrained, local folder) or a random-init BERT-base (BertConfig())."""
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(seed)
    if model == "minilm":
        return AutoModel.from_pretrained(modfit.DEFAULT_BASE)
    if model == "bert-base":
        return BertModel(BertConfig())
    raise KeyError(f"unknown model '{model}'; use one of {', '.join(MODELS)}")


# -- one configuration in one system ---------------------------------------------------------------


@dataclass
class Built:
    """A configuration ready to train: `loss(ids, mask, labels)`, its trainable parameters."""

    system: str
    net: nn.Module  # train()/eval() on this
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, T, H) of the real tokens
    params: list[nn.Parameter]  # everything the optimizer steps (head included)
    module_count: int  # trainable parameters of the module(s), head excluded
    handle: Any  # the ModularModel / PeftModel / adapters model


def _head(width: int) -> nn.Module:
    from modfit.heads import HeadConfig, SequenceClassificationHead

    return SequenceClassificationHead(HeadConfig("seq-cls", ("a", "b")), width)


def _with_head(system: str, net: nn.Module, hidden: Callable[..., torch.Tensor], width: int) -> Built:
    head = _head(width)
    net.add_module("bench_head", head)  # moves with net.train()/eval()

    def loss(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hidden(ids, mask), mask), labels)

    trainable = [
        p for p in net.parameters() if p.requires_grad and all(p is not q for q in head.parameters())
    ]
    count = sum(p.numel() for p in trainable)
    return Built(system, net, loss, hidden, [*trainable, *head.parameters()], count, net)


def token_batch(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random inference batch: (ids, mask), `batch` x `length` token ids from a seeded
    generator, no padding; the same for every system and part."""
    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def train_step(
    built: Built, batch: int = 16, length: int = 128, loss: Callable[..., torch.Tensor] | None = None
) -> Callable[[], None]:
    """One training step of `built` on a fixed random batch (`batch` x `length` token ids, 2 labels,
    no padding): forward + backward of `loss` (default `built.loss`) and an AdamW step of
    `built.params`. Puts the model in train mode, so the base's own dropout runs."""
    step_loss = loss or built.loss
    optimizer = torch.optim.AdamW(built.params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    mask = torch.ones_like(ids)
    built.net.train()

    def step() -> None:
        step_loss(ids, mask, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(system: str, config: str, base: nn.Module, head: bool = True) -> Built:
    """`config` (a TRAIN_CONFIGS key) on `base` (consumed: modified in place) in `system`; without
    `head` modfit's module gets no head (for saving, loading, inference; the peers' heads live outside
    their adapters and are never saved with them)."""
    width = base.config.hidden_size
    if system == "modfit":
        return _modfit(config, base, head)
    if system == "plain":  # full fine-tuning
        for p in base.parameters():
            p.requires_grad_(True)
        return _with_head(system, base, lambda i, m: base(input_ids=i, attention_mask=m)[0], width)
    if system == "peft":
        import peft

        model = peft.get_peft_model(base, peft_config(config))
        skip = VIRTUAL if config == "prompt" else 0  # PEFT returns the virtual tokens' states too
        built = _with_head(
            system, model, lambda i, m: model(input_ids=i, attention_mask=m)[0][:, skip:], width
        )
        built.handle = model
        return built
    if system == "adapters":
        return _adapters(config, base)
    raise KeyError(system)


def _modfit(config: str, base: nn.Module, with_head: bool) -> Built:
    mm = modfit.wrap(base)
    head = modfit.head("seq-cls", ["a", "b"]) if with_head else None
    if config == "fusion3":
        for child in "abc":
            mm.add(child, modfit.config("pfeiffer", reduction_factor=16))
        mm.add("m", modfit.config("fusion", children=["a", "b", "c"], dropout=0.0), head=head)
        mm.activate("fuse(a, b, c)")
    elif config == "stack2":
        mm.add("a", modfit.config("pfeiffer", reduction_factor=16))
        mm.add("m", modfit.config("pfeiffer", reduction_factor=16), head=head)
        mm.activate("stack(a, m)")
    else:
        method, settings = MODFIT_SETTINGS[config]
        mm.add("m", modfit.config(method, **settings), head=head)
        mm.activate("m")
    params = mm.train_only("m")  # freezes the base and the other modules

    def loss(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = mm(input_ids=ids, attention_mask=mask, labels=labels).loss
        return out

    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mm.model(input_ids=ids, attention_mask=mask)[0]

    return Built("modfit", mm, loss, hidden, params, mm.trainable_parameters("m"), mm)


def _adapters(config: str, base: nn.Module) -> Built:
    import adapters
    from adapters.composition import Fuse, Stack

    adapters.init(base)
    if config == "fusion3":
        for child in "abc":
            base.add_adapter(child, config=adapters_config(config))
        base.add_adapter_fusion(Fuse("a", "b", "c"))
        base.train_adapter_fusion(Fuse("a", "b", "c"))
        for module in base.modules():  # its attention dropout follows the model's (0.1); modfit's is 0
            if type(module).__name__ == "BertFusion":
                module.dropout.p = 0.0
    elif config == "stack2":
        base.add_adapter("a", config=adapters_config(config))
        base.add_adapter("m", config=adapters_config(config))
        base.train_adapter("m")  # freezes everything else
        base.set_active_adapters(Stack("a", "m"))
    else:
        base.add_adapter("m", config=adapters_config(config))
        base.train_adapter("m")
    return _with_head(
        "adapters", base, lambda i, m: base(input_ids=i, attention_mask=m)[0], base.config.hidden_size
    )


# -- same weights, same outputs -------------------------------------------------------------------


@torch.no_grad()
def randomise(mm: modfit.ModularModel, seed: int = 1) -> None:
    """Give every module on `mm` random weights (IA3 vectors around 1), so each changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name in mm.module_names:
        ia3 = mm.records[name].config.method == "ia3"
        for p in mm.module_parameters(name, include_head=False):
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1 + noise if ia3 else noise)
        for _, unit in mm.units(name):  # keep fusion's V near the identity, as its init
            value = getattr(unit, "value", None)
            if isinstance(value, nn.Linear) and value.weight.shape[0] == value.weight.shape[1]:
                value.weight.add_(torch.eye(value.weight.shape[0]))


@torch.no_grad()
def copy_weights(config: str, peer: Built, mm: modfit.ModularModel, tmp: str) -> str | None:
    """Copy modfit's module weights into the peer's modules; None where no copy is written (a
    parameter layout the harness does not map), else a note."""
    if peer.system == "peft":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        mm.save("m", tmp, format="peft", drop_head=True)
        result = set_peft_model_state_dict(peer.handle, load_file(f"{tmp}/adapter_model.safetensors"))
        # a prompt table is loaded on its own, outside load_state_dict, so listed as unexpected there
        missed = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if missed:
            raise RuntimeError(f"{config}: PEFT did not take {missed[:3]}")
        return "modfit -> PEFT format -> the harness's PEFT model"
    model = peer.handle
    if config == "lora":
        for path, unit in mm.units("m"):
            lora = model.get_submodule(path).loras["m"]
            lora.lora_A.copy_(unit.lora_A)
            lora.lora_B.copy_(unit.lora_B)
        return "LoRA A and B copied"
    if config in ("pfeiffer", "houlsby", "parallel", "stack2", "fusion3"):
        for name in mm.module_names:
            for path, unit in mm.units(name):
                owner = model.get_submodule(path.rsplit(".", 1)[0])  # ...output.dropout -> ...output
                if hasattr(unit, "down"):
                    adapter = owner.adapters[name]
                    adapter.adapter_down[0].load_state_dict(unit.down.state_dict())
                    adapter.adapter_up.load_state_dict(unit.up.state_dict())
                else:  # a fusion unit; adapters' V has no bias
                    fusion = owner.adapter_fusion_layer["a,b,c"]
                    fusion.query.load_state_dict(unit.query.state_dict())
                    fusion.key.load_state_dict(unit.key.state_dict())
                    fusion.value.weight.copy_(unit.value.weight)
                    unit.value.bias.zero_()
        return "bottleneck (and fusion) weights copied"
    return None


def output_check(config: str, system: str, model: str) -> dict[str, Any]:
    """Build `config` in modfit and in `system` on copies of one base, give them the same weights and
    compare last hidden states (eval mode, 2 x 16 tokens; modfit with `fast_linear` off, so a difference
    is one of computation, not of GEMM rounding). Returns counts and the max abs diff."""
    import tempfile

    base = load_base(model)
    twin, clean = copy.deepcopy(base), copy.deepcopy(base).eval()
    ours = build("modfit", config, base)
    theirs = build(system, config, twin)
    out: dict[str, Any] = {"config": config, "peer": system, "modfit": ours.module_count}
    out["peer_count"] = theirs.module_count
    mm = ours.handle
    mm.fast_linear = False  # torch's products, as the peer's: the same operations then give the same bits
    randomise(mm)
    with tempfile.TemporaryDirectory() as tmp:
        note = copy_weights(config, theirs, mm, tmp)
    out["note"] = note or "counts only (parameter layouts not mapped)"
    if note is not None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # one padded row
        ours.net.eval()
        theirs.net.eval()
        with torch.no_grad():
            a = ours.hidden(ids, mask)
            b = theirs.hidden(ids, mask)
            if config == "prefix" and system == "peft":
                # PEFT hands BERT the prefix as a cache of 20 past tokens, and BERT then numbers the
                # real tokens' positions from 20; modfit keeps them at 0. Compare at PEFT's positions.
                shifted = torch.arange(VIRTUAL, VIRTUAL + ids.shape[1]).expand_as(ids)
                a = mm.model(input_ids=ids, attention_mask=mask, position_ids=shifted)[0]
                out["note"] += (
                    "; modfit given PEFT's shifted position ids (BERT numbers them after the prefix)"
                )
            plain = clean(input_ids=ids, attention_mask=mask)[0]
        real = mask.bool()
        out["max_abs_diff"] = float((a - b)[real].abs().max())
        out["modfit_vs_base"] = float((a - plain)[real].abs().max())  # > 0: the module acts
    return out
