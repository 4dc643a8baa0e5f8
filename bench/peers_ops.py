"""Inference latency, save/load and add/remove timings of modfit beside PEFT and `adapters` (bench/peers.py).

Each function builds every system on its own copy of one base, then times them interleaved: every
repeat runs each system once, in an order reversed on every other repeat, so load on the machine
falls on all alike. Values are lists of ms, one per repeat; the caller takes medians.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import folder_bytes, timed
from peers_build import Built, adapters_config, build, load_base, peft_config, token_batch

import modfit


def _interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """ms of each run per repeat; the order flips every other repeat."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    order = list(runs)
    for rep in range(repeats):
        for label in order if rep % 2 == 0 else order[::-1]:
            times[label].append(timed(runs[label]))
    return times


MODFIT_INFER = ("lora", "lora-merged", "lora-inactive", "pfeiffer", "fusion3")


def inference(
    model: str, batch: int, length: int, repeats: int, peers: set[str], torch_linear: bool = False
) -> dict[str, Any]:
    """Forward latency (eval, no_grad) of the base, LoRA unmerged and merged (modfit, PEFT), and a
    pfeiffer adapter and a fusion of 3 (modfit, adapters). `modfit/lora-inactive` holds a LoRA module
    but none active: the base model as modfit runs it (through its CPU kernels), the reference for
    modfit's own overhead. With `torch_linear`, modfit's rows again as `modfit+torch-linear/...`, its
    base products through torch's kernels as in the peers. Returns {"ms": {label: [...]}, ...}."""
    base = load_base(model).eval()
    ids, mask = token_batch(batch, length)
    runs: dict[str, Callable[[], object]] = {"base": lambda: base(input_ids=ids, attention_mask=mask)}
    modfits = ("modfit", "modfit+torch-linear") if torch_linear else ("modfit",)
    wanted = [(s, c) for s in modfits for c in MODFIT_INFER]
    wanted += [(s, c) for s in ("peft",) if s in peers for c in ("lora", "lora-merged")]
    wanted += [(s, c) for s in ("adapters",) if s in peers for c in ("pfeiffer", "fusion3")]
    for system, config in wanted:
        one = build(system.split("+")[0], config.split("-")[0], copy.deepcopy(base), head=False)
        one.net.eval()
        if system.endswith("+torch-linear"):
            one.handle.fast_linear = False
        if config == "lora-merged":
            if system.startswith("modfit"):
                one.handle.merge("m")
            else:
                one.handle.merge_adapter()  # PEFT: W += BA, undone by unmerge_adapter()
        elif config == "lora-inactive":
            one.handle.deactivate()
        runs[f"{system}/{config}"] = lambda one=one: one.hidden(ids, mask)
    for run in runs.values():  # one warm-up each
        timed(run)
    return {"ms": _interleaved(runs, repeats), "batch": [batch, length]}


def lora_overhead(
    model: str, batch: int, length: int, pairs: int, peers: set[str], variants: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    """Unmerged LoRA against the same model object with its module switched off, pair by pair: each
    pair times one forward with the module on and one with it off (eval, no_grad), in an order that
    flips every pair, and keeps their ratio. Unlike `inference`, where each row is its own deep copy
    among ten others, the weights in memory and the interleaving are the same for both halves, so the
    ratio holds only what the module adds. Systems: modfit (through its CPU kernels, as users run it),
    each of `variants` (a system name -> the `ModularModel` switches it turns off, e.g.
    {"modfit+unfolded": ("fold_per_call",)}), and PEFT (`disable_adapter_layers()`).
    Returns {"ratio": {system: [on/off per pair]}, "on_ms": {...}, "off_ms": {...}}."""
    base = load_base(model).eval()
    ids, mask = token_batch(batch, length)
    systems = ["modfit", *variants] + (["peft"] if "peft" in peers else [])
    switches: dict[str, tuple[Built, Callable[[bool], None]]] = {}
    for system in systems:
        one = build(system.split("+")[0], "lora", copy.deepcopy(base), head=False)
        one.net.eval()
        if system.startswith("modfit"):
            for switch_off in variants.get(system, ()):
                setattr(one.handle, switch_off, False)

            def switch(on: bool, handle: Any = one.handle) -> None:
                handle.activate("m") if on else handle.deactivate()

        else:

            def switch(on: bool, handle: Any = one.handle) -> None:
                lora = handle.base_model  # PEFT's LoraModel
                lora.enable_adapter_layers() if on else lora.disable_adapter_layers()

        switches[system] = (one, switch)
    out = {key: {system: [] for system in systems} for key in ("ratio", "on_ms", "off_ms")}
    for one, switch in switches.values():  # one warm-up forward each way
        for on in (True, False):
            switch(on)
            timed(lambda one=one: one.hidden(ids, mask))
    for rep in range(pairs):
        for system, (one, switch) in switches.items():
            ms = {}
            for on in (True, False) if rep % 2 == 0 else (False, True):
                switch(on)
                ms[on] = timed(lambda one=one: one.hidden(ids, mask))
            out["on_ms"][system].append(ms[True])
            out["off_ms"][system].append(ms[False])
            out["ratio"][system].append(ms[True] / ms[False])
    return {**out, "batch": [batch, length]}


def _savers(system: str, built: Built, tmp: Path) -> tuple[Callable[[str], Path], Callable[[Path, str], Any]]:
    """(save(tag) -> folder, load(folder, tag) then remove what was loaded) for one system."""
    handle = built.handle
    if system == "modfit":

        def save(tag: str) -> Path:
            return Path(handle.save("m", tmp / tag))

        def load(folder: Path, tag: str) -> None:
            handle.load(folder, name=tag)
            handle.remove(tag)

    elif system == "peft":

        def save(tag: str) -> Path:
            handle.save_pretrained(str(tmp / tag))  # adapter_model.safetensors + adapter_config.json
            return tmp / tag

        def load(folder: Path, tag: str) -> None:
            handle.load_adapter(str(folder), adapter_name=tag)
            handle.delete_adapter(tag)

    else:

        def save(tag: str) -> Path:
            handle.save_adapter(str(tmp / tag), "m", use_safetensors=True)
            return tmp / tag

        def load(folder: Path, tag: str) -> None:
            name = handle.load_adapter(str(folder), load_as=tag, use_safetensors=True)
            handle.delete_adapter(name)

    return save, load


PERSIST = {"lora": ("modfit", "peft", "adapters"), "pfeiffer": ("modfit", "adapters")}


def persistence(model: str, repeats: int, peers: set[str]) -> dict[str, Any]:
    """Save and load time (ms) and the size on disk of one module per system, interleaved."""
    base = load_base(model)
    out: dict[str, Any] = {"save_ms": {}, "load_ms": {}, "bytes": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for config, systems in PERSIST.items():
            ops = {}
            for system in (s for s in systems if s == "modfit" or s in peers):
                built = build(system, config, copy.deepcopy(base), head=False)
                (tmp / system / config).mkdir(parents=True)
                ops[f"{system}/{config}"] = _savers(system, built, tmp / system / config)
            labels = list(ops)
            for rep in range(repeats + 1):  # the first round is a warm-up
                for label in labels if rep % 2 == 0 else labels[::-1]:
                    save, load = ops[label]
                    folder: list[Path] = []
                    ms = timed(lambda save=save, rep=rep, folder=folder: folder.append(save(f"s{rep}")))
                    out["bytes"][label] = folder_bytes(folder[0])
                    load_ms = timed(lambda load=load, rep=rep, f=folder[0]: load(f, f"r{rep}"))
                    if rep > 0:
                        out["save_ms"].setdefault(label, []).append(ms)
                        out["load_ms"].setdefault(label, []).append(load_ms)
    return out


def _lifecycle(system: str, config: str, base: torch.nn.Module, n: int) -> tuple[float, float]:
    """ms to add `n` modules of `config` to a model already holding one, and to remove them again."""
    built = build(system, config, base, head=False)
    handle = built.handle
    names = [f"x{i}" for i in range(n)]
    if system == "modfit":
        method, settings = {"lora": ("lora", {"r": 8, "alpha": 16, "targets": ("query", "value")})}.get(
            config, (config, {"reduction_factor": 16})
        )

        def add() -> None:
            for name in names:
                handle.add(name, modfit.config(method, **settings))

        def remove() -> None:
            for name in names:
                handle.remove(name)

    elif system == "peft":

        def add() -> None:
            for name in names:
                handle.add_adapter(name, peft_config(config))

        def remove() -> None:
            for name in names:
                handle.delete_adapter(name)

    else:

        def add() -> None:
            for name in names:
                handle.add_adapter(name, config=adapters_config(config))

        def remove() -> None:
            for name in names:
                handle.delete_adapter(name)

    return timed(add), timed(remove)


def add_remove(model: str, n: int, repeats: int, peers: set[str]) -> dict[str, Any]:
    """Time to add and to remove `n` modules on one model, per system, interleaved over repeats."""
    base = load_base(model)
    out: dict[str, dict[str, list[float]]] = {"add_ms": {}, "remove_ms": {}}
    labels = [(s, c) for c, systems in PERSIST.items() for s in systems if s == "modfit" or s in peers]
    for rep in range(repeats):
        for system, config in labels if rep % 2 == 0 else labels[::-1]:
            add_ms, remove_ms = _lifecycle(system, config, copy.deepcopy(base), n)
            out["add_ms"].setdefault(f"{system}/{config}", []).append(add_ms)
            out["remove_ms"].setdefault(f"{system}/{config}", []).append(remove_ms)
    return {**out, "modules": n}
