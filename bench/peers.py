"""modfit against HuggingFace PEFT and AdapterHub `adapters`, side by side in one run, as ratios modfit/peer.

The peers need transformers 4.57 (`adapters` pins it), so this runs in the peer venv
(`scripts/peer_env.sh .venv/peer` builds it: torch 2.13.0 CPU, transformers 4.57.x, peft 0.21.2,
adapters 1.3.0; `make test` builds it too), with modfit from src/::

    PYTHONPATH=src .venv/peer/bin/python bench/peers.py                       # everything, both models
    PYTHONPATH=src .venv/peer/bin/python bench/peers.py --models minilm --repeats 3 --out peers.json
    PYTHONPATH=src .venv/peer/bin/python bench/peers.py --models minilm --repeats 1 --steps 1 --warmup 0 \\
        --batch 2 --length 16 --parts check,train --configs lora,pfeiffer     # a smoke run

Models: the packaged MiniLM (`modfit.DEFAULT_BASE`, pretrained, a local folder) and a random-init
BERT-base (`BertConfig()` defaults, built in code). The configurations and their settings, equal in
every system, are in bench/peers_build.py. Parts (`--parts`):

- `check`: once per configuration and peer, the trainable-parameter counts of both (head excluded;
  a difference is a harness bug unless `KNOWN_COUNT_GAPS` names it) and, where the weights map
  cheaply, the largest difference between their outputs given modfit's (random) weights.
- `train`: one forward + backward + AdamW step of module and head (batch `--batch` x `--length`,
  `--threads` threads, train mode): the median step over `--steps` after `--warmup`, and the peak
  resident memory above what the process held before loading the model (ru_maxrss, as
  bench/methods.py). Every (configuration, system, repeat) runs in its own subprocess so the peak is
  its own; repeats interleave the systems, their order reversed every other repeat. `full` (all
  weights trained, plain transformers) is the reference row. `--compile modfit` (or `modfit,peft`)
  adds those systems' steps through `torch.compile` (inductor) as systems `modfit+compile` ...;
  their compilation falls in the warm-up steps, and their peak memory includes it.
  `--variants torch-kernels` adds `modfit+torch-kernels`: modfit with `mm.fast_dropout = False` and
  `mm.fast_linear = False`, so the base model runs torch's own dropout and matrix products as in the
  peers (what modfit's CPU kernels are worth); `torch-dropout` and `torch-linear` turn off one each.
- `infer`: forward latency in eval mode of the base, LoRA unmerged and merged (modfit, PEFT), a
  pfeiffer adapter and a fusion of 3 (modfit, `adapters`), in one process, interleaved; also modfit
  holding an inactive LoRA (the base as modfit runs it, through its CPU kernels: each modfit row's
  "own base"). A `--variants` entry that turns `fast_linear` off adds modfit's rows again with it off.
- `overhead`: what an unmerged LoRA adds to a forward, on one model object with its module switched
  on and off pair by pair (`--repeats` pairs; modfit, PEFT, and modfit once more per `--variants`
  entry, e.g. `unfolded`: `mm.fold_per_call = False`, the two low-rank products on every call
  instead of W + s·BA for the call, see src/modfit/folding.py): the median of the per-pair ratios
  on/off and their quartiles.
- `persist`: save and load time of one LoRA and one pfeiffer module, and their size on disk.
- `addremove`: time to add `--modules` LoRA (pfeiffer) modules to one model, and to remove them.
- `mixed`: mixed-batch inference, modfit `route(...)` against PEFT `adapter_names=`: runs
  bench/mixed_batch.py (not duplicated here) with the same interpreter, model and repeats.

Every table gives medians over `--repeats` and the ratio modfit / peer (< 1: modfit is faster or
smaller). `--json` prints all values, `--out FILE` writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from _timing import peak_rss_kib, reset_peak_rss, rss_kib, run_child, step_times

HERE = Path(__file__).resolve().parent
PARTS = ("check", "train", "infer", "overhead", "persist", "addremove", "mixed")
COMPILED = "+compile"  # a system's name with this suffix: its training step through torch.compile
# modfit with some of its CPU kernels off (`--variants`): suffix -> the ModularModel switches set False
VARIANTS = {
    "+torch-dropout": ("fast_dropout",),
    "+torch-linear": ("fast_linear",),
    "+torch-kernels": ("fast_dropout", "fast_linear"),
    "+unfolded": ("fold_per_call",),
}
INFERENCE_ONLY = {"+unfolded"}  # variants a training step does not see (no row of their own in `train`)


def measure_train(
    config: str, system: str, model: str, shape: tuple[int, int, int, int, int]
) -> dict[str, Any]:
    """One training configuration in this process: median step ms, peak RSS and its delta."""
    batch, length, steps, warmup, threads = shape
    import torch
    import transformers.models.bert.modeling_bert  # noqa: F401  (imported lazily otherwise: ~100 MiB)

    for library in ("peft", "adapters"):  # every system's process holds the same imports at the baseline
        with contextlib.suppress(ImportError):
            __import__(library)
    from peers_build import build, load_base, train_step

    torch.set_num_threads(threads)
    before = reset_peak_rss()
    base = load_base(model)
    loaded = rss_kib()
    system, compiled = system.removesuffix(COMPILED), system.endswith(COMPILED)
    switches_off = next((off for suffix, off in VARIANTS.items() if system.endswith(suffix)), ())
    system = system.split("+")[0]
    built = build(system, config, base)
    for switch in switches_off:
        setattr(built.net, switch, False)
    # the whole loss (model, module, head) through torch.compile's default (inductor) backend; the
    # warm-up steps pay the compilation, the peak memory includes it
    step = train_step(built, batch, length, torch.compile(built.loss) if compiled else None)
    times = step_times(step, warmup, steps)
    peak = peak_rss_kib()
    return {
        "step_ms": statistics.median(times),
        "peak_rss_mib": peak / 1024,
        "peak_delta_mib": (peak - before) / 1024,  # above the process with its imports
        "peak_over_model_mib": (peak - loaded) / 1024,  # above the loaded base model
        "trainable": built.module_count,
    }


def run_train(args: argparse.Namespace, model: str, configs: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Every (configuration, system) once per repeat, each in a subprocess, systems interleaved."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(args.repeats):
        for config, peers in configs.items():
            systems = ["plain"] if config == "full" else ["modfit", *peers]
            systems += [s + COMPILED for s in systems if s in args.compile.split(",")]
            variants = [v for v in args.variants.split(",") if v and f"+{v}" not in INFERENCE_ONLY]
            systems += [f"modfit+{v}" for v in variants] if config != "full" else []
            for system in systems if rep % 2 == 0 else systems[::-1]:
                command = [sys.executable, __file__, "--child", f"{config}:{system}:{model}"]
                command += [
                    f"--{k}={getattr(args, k)}" for k in ("batch", "length", "steps", "warmup", "threads")
                ]
                result = run_child(command)
                rows.setdefault(config, {}).setdefault(system, []).append(result)
                if "error" in result:
                    print(f"  {config}/{system}: {result['error']}", file=sys.stderr)
        print(f"  train: repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    return rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours is not None and theirs else "n/a"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def print_train(model: str, rows: dict[str, Any]) -> None:
    def med(config: str, system: str, key: str) -> float | None:
        return _median([r[key] for r in rows.get(config, {}).get(system, []) if key in r])

    keys = ("step_ms", "peak_delta_mib", "peak_over_model_mib")
    print(
        f"\n{model}: training step (median ms); peak memory in MiB above the process with its imports "
        "(the base model's weights included) and above the loaded base model"
    )
    print(
        "| config | peer | modfit ms | peer ms | ratio | modfit MiB | peer MiB | ratio "
        "| modfit MiB over model | peer | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config, by_system in rows.items():
        if config == "full":
            ms, mib, over = (med(config, "plain", k) for k in keys)
            print(
                f"| full (reference) | - | - | {_fmt(ms)} | - | - | {_fmt(mib)} | - | - | {_fmt(over)} | - |"
            )
            continue
        for system in (s for s in by_system if s.startswith("modfit")):
            for peer in (s for s in by_system if not s.startswith("modfit")):
                cells = []
                for key in keys:
                    ours, theirs = med(config, system, key), med(config, peer, key)
                    cells += [_fmt(ours), _fmt(theirs), _ratio(ours, theirs)]
                label = config if system == "modfit" else f"{config} ({system})"  # e.g. modfit+compile
                print(f"| {label} | {peer} | {' | '.join(cells)} |")


def print_overhead(model: str, result: dict[str, Any]) -> None:
    """The `overhead` part: per system, median ms on and off, the median of the per-pair differences
    (ms the module adds) and of the per-pair ratios on/off, with the ratios' quartiles."""
    batch, length = result["batch"]
    print(f"\n{model}: unmerged LoRA on / off on one model object, batch {batch} x {length}")
    print("| system | pairs | on ms | off ms | added ms | median on/off | quartiles | pairs <= 1.03 |")
    print("|---|---|---|---|---|---|---|---|")
    for system, ratios in result["ratio"].items():
        if len(ratios) < 2:
            continue
        low, _, high = statistics.quantiles(ratios, n=4)
        within = sum(r <= 1.03 for r in ratios)
        on, off = result["on_ms"][system], result["off_ms"][system]
        added = statistics.median(a - b for a, b in zip(on, off, strict=True))  # per pair
        print(
            f"| {system} | {len(ratios)} | {_fmt(_median(on), 1)} | {_fmt(_median(off), 1)} | "
            f"{added:+.1f} | {statistics.median(ratios):.3f} | "
            f"{low:.3f}-{high:.3f} | {within}/{len(ratios)} |"
        )


def print_pairs(
    title: str, times: dict[str, list[float]], pairs: list[tuple[str, str]], digits: int = 0
) -> None:
    print(f"\n{title}")
    print("| config | peer | modfit ms | peer ms | ratio |")
    print("|---|---|---|---|---|")
    for ours, theirs in pairs:
        a, b = _median(times.get(ours, [])), _median(times.get(theirs, []))
        if a is None and b is None:
            continue
        system, config = ours.split("/")
        label = config if system == "modfit" else f"{config} ({system})"  # e.g. modfit+torch-linear
        print(
            f"| {label} | {theirs.split('/')[0]} | {_fmt(a, digits)} | {_fmt(b, digits)} | {_ratio(a, b)} |"
        )


def run_model(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from peers_build import TRAIN_CONFIGS

    peers = set(args.peers.split(","))
    wanted = args.configs.split(",") if args.configs else list(TRAIN_CONFIGS)
    configs = {c: tuple(p for p in TRAIN_CONFIGS[c] if p in peers) for c in wanted}
    variants = [v for v in args.variants.split(",") if v]
    torch_linear = any("fast_linear" in VARIANTS[f"+{v}"] for v in variants)  # modfit with it off too
    out: dict[str, Any] = {}
    if "check" in args.parts:
        out["check"] = run_check(model, configs)
    if "train" in args.parts:
        out["train"] = run_train(args, model, configs)
        print_train(model, out["train"])
    if "infer" in args.parts:
        from peers_ops import inference

        out["infer"] = inference(model, args.batch, args.length, args.repeats, peers, torch_linear)
        ms = out["infer"]["ms"]
        base_ms = _median(ms["base"])
        print(
            f"\n{model}: inference, batch {args.batch} x {args.length} "
            f"(median ms; base model {_fmt(base_ms)}; modfit's own base: its rows /lora-inactive)"
        )
        for label in ms:
            own = f"{label.split('/')[0]}/lora-inactive"
            versus_own = f"   vs own base {_ratio(_median(ms[label]), _median(ms[own]))}" if own in ms else ""
            print(
                f"  {label:<34} {_fmt(_median(ms[label])):>8} ms   "
                f"vs base {_ratio(_median(ms[label]), base_ms)}{versus_own}"
            )
        modfits = ("modfit", "modfit+torch-linear") if torch_linear else ("modfit",)
        pairs = [(f"{m}/{c}", f"peft/{c}") for m in modfits for c in ("lora", "lora-merged")]
        pairs += [(f"{m}/{c}", f"adapters/{c}") for m in modfits for c in ("pfeiffer", "fusion3")]
        print_pairs(f"{model}: inference, modfit / peer", ms, pairs)
    if "overhead" in args.parts:
        from peers_ops import lora_overhead

        switched = {f"modfit+{v}": VARIANTS[f"+{v}"] for v in variants}
        out["overhead"] = lora_overhead(model, args.batch, args.length, args.repeats, peers, switched)
        print_overhead(model, out["overhead"])
    if "persist" in args.parts or "addremove" in args.parts:
        from peers_ops import PERSIST, add_remove, persistence

        pairs = [
            (f"modfit/{c}", f"{s}/{c}") for c, systems in PERSIST.items() for s in systems if s != "modfit"
        ]
        if "persist" in args.parts:
            out["persist"] = persistence(model, args.repeats, peers)
            for key in ("save_ms", "load_ms"):
                print_pairs(
                    f"{model}: {key.replace('_ms', '')} one module (ms)", out["persist"][key], pairs, 1
                )
            sizes = ", ".join(f"{k} {v / 1024:,.0f} KiB" for k, v in out["persist"]["bytes"].items())
            print(f"  on disk: {sizes}")
        if "addremove" in args.parts:
            out["addremove"] = add_remove(model, args.modules, args.repeats, peers)
            for key in ("add_ms", "remove_ms"):
                title = f"{model}: {key.replace('_ms', '')} {args.modules} modules (ms)"
                print_pairs(title, out["addremove"][key], pairs)
    if "mixed" in args.parts and "peft" in peers:
        command = [sys.executable, str(HERE / "mixed_batch.py"), "--model", model, "--json"]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        command += ["--torch-linear"] if torch_linear else []
        print(f"\n{model}: mixed batch (bench/mixed_batch.py)")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        text = done.stdout
        table, _, blob = text.partition("\n{")
        print(table)
        try:
            out["mixed"] = json.loads("{" + blob)
        except json.JSONDecodeError:
            out["mixed"] = {"error": done.stderr.strip().splitlines()[-1:]}
            print(f"  mixed_batch.py failed: {out['mixed']['error']}")
    return out


def run_check(model: str, configs: dict[str, tuple[str, ...]]) -> list[dict[str, Any]]:
    from peers_build import KNOWN_COUNT_GAPS, KNOWN_OUTPUT_GAPS, output_check

    results = []
    print(
        f"\n{model}: same settings check (trainable parameters, head excluded; outputs with the same weights)"
    )
    for config, peers in configs.items():
        for peer in peers:
            try:
                result = output_check(config, peer, model)
            except Exception as e:  # a harness problem: report it, go on with the others
                result = {"config": config, "peer": peer, "error": f"{type(e).__name__}: {e}"}
                print(f"  {config:<10} vs {peer:<9} ERROR {result['error']}")
                results.append(result)
                continue
            equal = result["modfit"] == result["peer_count"]
            verdict = "equal" if equal else KNOWN_COUNT_GAPS.get((config, peer), "MISMATCH (harness bug)")
            diff = result.get("max_abs_diff")
            shown = (
                f"max abs diff {diff:.2e} (modfit vs base {result['modfit_vs_base']:.2f})"
                if diff is not None
                else ""
            )
            if diff is not None and diff > 1e-4:
                shown += f" -- {KNOWN_OUTPUT_GAPS.get((config, peer), 'OUTPUTS DIFFER (harness bug?)')}"
            print(
                f"  {config:<10} vs {peer:<9} modfit {result['modfit']:>10,}  "
                f"{peer} {result['peer_count']:>10,}"
                f"  {verdict}; {shown or result['note']}"
            )
            results.append({**result, "counts_equal": equal})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    parser.add_argument("--configs", help="training configurations, comma-separated (default: all)")
    parser.add_argument("--peers", default="peft,adapters")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        default="",
        metavar="SYSTEMS",
        help="`train`: also run these systems (modfit, peft, adapters) through torch.compile",
    )
    parser.add_argument(
        "--variants",
        default="",
        metavar="NAMES",
        help="also run modfit with some CPU kernels off: torch-kernels (fast_dropout and fast_linear "
        "off), torch-dropout, torch-linear; `overhead` also: unfolded (fold_per_call off) (comma-separated)",
    )
    parser.add_argument("--modules", type=int, default=100, help="modules added and removed in `addremove`")
    parser.add_argument("--json", action="store_true", help="print every value as JSON at the end")
    parser.add_argument("--out", help="write every value as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: config:system:model, train here
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # the peers warn about unused adapters, deprecated arguments...
    shape = (args.batch, args.length, args.steps, args.warmup, args.threads)
    if args.child:
        config, system, model = args.child.split(":")
        print(json.dumps(measure_train(config, system, model, shape)))
        return 0
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    args.parts = set(args.parts.split(","))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "adapters"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    load = os.getloadavg()
    print(f"{versions}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load}")
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "parts"},
        "versions": versions,
    }
    result["args"]["parts"] = sorted(args.parts)
    result["load_before"] = load
    for model in args.models.split(","):
        result[model] = run_model(args, model)
    result["load_after"] = os.getloadavg()
    print(f"\nload average before {result['load_before']}, after {result['load_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
