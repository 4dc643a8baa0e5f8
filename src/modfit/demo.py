"""The main job, `make demo` / `modfit demo`: the whole life of one module on the default base.

1. load the packaged pretrained MiniLM and the project's own generated sentiment data;
2. add a LoRA module (r=8 on query and value) with a sentiment head; held-out accuracy before;
3. train it briefly; held-out accuracy after;
4. save it, load it into a fresh copy of the base, check the outputs match, and classify three
   new sentences.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from . import registry
from .base import load_base, load_tokenizer
from .batching import collate, encode
from .data import TextExample, label_list, read_examples
from .heads import HeadConfig
from .model import wrap

NEW_SENTENCES = (
    "The staff were friendly and the room was spotless, I would happily stay again.",
    "It broke after two days and support never answered my emails.",
    "Not the best film of the year, but I still enjoyed every minute of it.",
)


def demo_data_path(name: str) -> Path:
    """A file of the generated demo data shipped inside the package."""
    return Path(str(resources.files("modfit") / "demo_data" / name))


def run_demo(out: str = "demo_out", epochs: float = 3.0, seed: int = 0) -> dict[str, float]:
    """Run the demo; returns held-out accuracy before and after training."""
    from .train import TrainSettings, evaluate, predict, train

    started = time.perf_counter()
    train_examples = read_examples(demo_data_path("sentiment_train.csv"), "seq-cls")
    test_examples = read_examples(demo_data_path("sentiment_test.csv"), "seq-cls")
    labels = tuple(label_list(train_examples))
    print(f"data: {len(train_examples)} training and {len(test_examples)} held-out reviews, labels {labels}")

    tokenizer = load_tokenizer("default")
    torch.manual_seed(seed)
    mm = wrap(load_base("default"))
    config = registry.config("lora", r=8, alpha=16, targets=("query", "value"))
    mm.add("sentiment", config, HeadConfig("seq-cls", labels), task="seq-cls", language="en")
    mm.activate("sentiment")
    print(
        f"base: packaged all-MiniLM-L6-v2; module 'sentiment': lora r=8 on query,value, "
        f"{mm.trainable_parameters('sentiment'):,} parameters (+ head)"
    )

    def collate_fn(features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, tokenizer.pad_token_id)

    features = encode(train_examples, tokenizer, "seq-cls", labels=labels, max_length=64)
    test_features = encode(test_examples, tokenizer, "seq-cls", labels=labels, max_length=64)
    before = evaluate(mm, test_features, collate_fn=collate_fn, batch_size=64)
    print(f"held-out accuracy before training: {before['accuracy']:.1%}")

    settings = TrainSettings(epochs=epochs, lr=2e-3, batch_size=32, seed=seed, warmup_ratio=0.1)
    train(mm, "sentiment", features, collate_fn=collate_fn, settings=settings)
    after = evaluate(mm, test_features, collate_fn=collate_fn, batch_size=64)
    print(f"held-out accuracy after training:  {after['accuracy']:.1%} (macro-F1 {after['macro_f1']:.3f})")

    saved = mm.save("sentiment", Path(out) / "sentiment", metrics={"accuracy": after["accuracy"]})
    print(f"saved the module to {saved} ({_size(saved)})")

    fresh = wrap(load_base("default"))
    name = fresh.load(saved)
    fresh.activate(name)
    batch = collate_fn(test_features[:8])
    mm.eval()
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(mm(**batch).logits, fresh(**batch).logits)
    print(f"loaded into a fresh base: outputs identical to the trained model: {same}")

    new_features = encode(
        [TextExample(text=t) for t in NEW_SENTENCES], tokenizer, "seq-cls", labels=None, max_length=64
    )
    predictions = predict(fresh, new_features, collate_fn=collate_fn, batch_size=8)
    for sentence, label in zip(NEW_SENTENCES, predictions, strict=True):
        print(f"  {label:>8}  {sentence}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"]}


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return f"{total / 1024:.0f} KiB"
