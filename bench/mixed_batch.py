"""Mixed batches: modfit `route(...)` against PEFT's `adapter_names=` on the same base and LoRA weights.

PEFT is installed for transformers 4.57 in the peer venv (`scripts/peer_env.sh .venv/peer`), so run
this with that interpreter (modfit and PEFT then run in one process, on one copy each of the same
random-init weights)::

    PYTHONPATH=src .venv/peer/bin/python bench/mixed_batch.py --model bert-base --repeats 3
    PYTHONPATH=src .venv/peer/bin/python bench/mixed_batch.py --model minilm --repeats 3 --json

Setup: a random-init BERT-base (`--model bert-base`, BertConfig() defaults) or a model of MiniLM's
shape (`--model minilm`: hidden 384, 6 layers); `--modules` LoRA modules (r=8, alpha=16, on query and
value, A and B random), the same weights copied into PEFT adapters; a batch of `--batch` x `--length`
random token ids; `--threads` torch threads; inference (eval mode, no_grad). For each count k in
`--distinct`, the batch's rows use k distinct modules (row b -> module b mod k). Every repeat times,
interleaved, the base alone, then modfit and PEFT for every k (their order alternating between repeats),
so load on the machine falls on both alike; the table gives medians in ms per batch and the ratio
PEFT / modfit (> 1: modfit is faster). A sanity line per k gives the largest difference between
modfit's and PEFT's outputs. Without PEFT (the import fails) modfit is timed alone.

The base runs as modfit runs it: through its CPU kernels (`modfit.fast_linear`: oneDNN's products,
rounded in another order than torch's, so the outputs differ from PEFT's by about 1e-6).
`--torch-linear` times modfit (and the base) again with `mm.fast_linear = False`, the base's products
then torch's as in PEFT, and adds those columns.

modfit gathers each row's A and B and applies them with two batched products per projection
(`LoraUnit.batched`, `route(...)` in routing/fixed.py); PEFT's mixed batch loops over the distinct
adapters in the batch and runs each one's LoRA on its rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from typing import Any

import torch
from _timing import timed
from transformers import BertConfig, BertModel

import modfit

SHAPES = {
    "bert-base": {},  # BertConfig() defaults: hidden 768, 12 layers, 12 heads, FFN 3072
    "minilm": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
}


def build(model: str, modules: int, seed: int) -> tuple[BertModel, BertModel, modfit.ModularModel, list[str]]:
    """A random-init base with `modules` random LoRA modules (r=8, alpha=16, query and value), and an
    untouched copy of the same base for PEFT."""
    torch.manual_seed(seed)
    base = BertModel(BertConfig(**SHAPES[model])).eval()
    clean = copy.deepcopy(base)  # before modfit attaches anything
    mm = modfit.wrap(base)
    names = [f"m{i}" for i in range(modules)]
    g = torch.Generator().manual_seed(seed)
    for name in names:
        mm.add(name, modfit.config("lora", r=8, alpha=16, targets=("query", "value")))
        with torch.no_grad():  # B starts at zero: give it weights, so every module changes the output
            for _, unit in mm.units(name):
                unit.lora_A.copy_(torch.randn(unit.lora_A.shape, generator=g) * 0.05)
                unit.lora_B.copy_(torch.randn(unit.lora_B.shape, generator=g) * 0.05)
    mm.activate(f"route({', '.join(names)})")
    return base, clean, mm, names


def peft_copy(clean: BertModel, mm: modfit.ModularModel, names: list[str]) -> Any:
    """PEFT adapters holding modfit's LoRA weights, on the untouched copy of the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(clean, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name in names:
            for path, unit in mm.units(name):
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A[name].weight.copy_(unit.lora_A)
                layer.lora_B[name].weight.copy_(unit.lora_B)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="bert-base")
    parser.add_argument("--modules", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--distinct", default="1,4,16,32", help="distinct modules per batch, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument(
        "--torch-linear", action="store_true", help="also time modfit with mm.fast_linear = False"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(k) for k in args.distinct.split(",")]
    if max(counts) > args.modules:
        parser.error(f"--distinct asks for {max(counts)} modules, --modules is {args.modules}")

    base, clean, mm, names = build(args.model, args.modules, args.seed)
    try:
        peft_model = peft_copy(clean, mm, names)
    except ImportError as e:
        print(f"PEFT not importable ({e}); timing modfit alone. Run with the interpreter in the docstring.")
        peft_model = None
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=g)
    mask = torch.ones_like(ids)
    routes = {k: [names[b % k] for b in range(args.batch)] for k in counts}

    def run_modfit(k: int, fast: bool = True) -> torch.Tensor:
        mm.fast_linear = fast
        with modfit.routing.routed(routes[k]):
            return base(input_ids=ids, attention_mask=mask).last_hidden_state

    def run_peft(k: int) -> torch.Tensor:
        assert peft_model is not None
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=routes[k]).last_hidden_state

    def run_base(fast: bool = True) -> torch.Tensor:
        mm.fast_linear = fast
        mm.deactivate()
        try:
            return base(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            mm.activate(f"route({', '.join(names)})")

    print(
        f"{args.model}: {args.modules} LoRA modules (r=8, query+value), batch {args.batch}x{args.length}, "
        f"{args.threads} threads, torch {torch.__version__}, {args.repeats} repeats (medians)"
    )
    with torch.no_grad():  # sanity: the same outputs (and one warm-up run of each)
        for k in counts:
            ours = run_modfit(k)
            line = f"  k={k}: modfit vs PEFT max abs diff "
            if peft_model is not None:
                theirs = run_peft(k)
                line += f"{(ours - theirs).abs().max().item():.2e}"
                if args.torch_linear:
                    line += f" (torch-linear: {(run_modfit(k, False) - theirs).abs().max().item():.2e})"
            else:
                line += "n/a"
            one = routes[k][0]
            mm.activate(one)  # and row 0 against its module alone
            alone = base(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
            mm.activate(f"route({', '.join(names)})")
            print(line + f"; row 0 vs '{one}' alone {(ours[:1] - alone).abs().max().item():.2e}")
        run_base()

    times: dict[str, list[float]] = {"base": []}
    for rep in range(args.repeats):
        times["base"].append(timed(run_base))
        if args.torch_linear:
            times.setdefault("base+torch-linear", []).append(timed(lambda: run_base(False)))
        for k in counts:
            order: list[tuple[str, Any]] = [("modfit", run_modfit)]
            if args.torch_linear:
                order.append(("modfit+torch-linear", lambda k: run_modfit(k, False)))
            if peft_model is not None:
                order.append(("peft", run_peft))
            for system, run in order if rep % 2 == 0 else order[::-1]:
                times.setdefault(f"{system}/{k}", []).append(timed(lambda run=run, k=k: run(k)))
        print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr)

    med = {key: statistics.median(values) for key, values in times.items()}
    line = f"base model alone (no LoRA), through modfit's kernels: {med['base']:.0f} ms per batch"
    if args.torch_linear:
        line += f"; torch's: {med['base+torch-linear']:.0f} ms"
    print(line)
    header = f"{'distinct':>8} | {'modfit ms':>9} | {'PEFT ms':>9} | {'PEFT/modfit':>11}"
    print(header + (f" | {'modfit, torch-linear ms':>23} | {'PEFT/that':>9}" if args.torch_linear else ""))
    for k in counts:
        theirs = med.get(f"peft/{k}")

        def versus(ours: float, width: int, theirs: float | None = theirs) -> str:
            return f"{theirs / ours:{width}.2f}" if theirs else f"{'n/a':>{width}}"

        ours = med[f"modfit/{k}"]
        cells = [f"{k:>8}", f"{ours:9.0f}", f"{theirs:9.0f}" if theirs else f"{'n/a':>9}", versus(ours, 11)]
        if args.torch_linear:
            ours = med[f"modfit+torch-linear/{k}"]
            cells += [f"{ours:23.0f}", versus(ours, 9)]
        print(" | ".join(cells))
    if args.json:
        print(json.dumps({"args": vars(args), "median_ms": med, "all_ms": times}, indent=1))


if __name__ == "__main__":
    main()
