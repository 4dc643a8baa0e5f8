"""Trains tiny modules with `modfit.train`, alone or under torchrun, and saves them for comparison.

    python tests/ddp_worker.py OUT                                            # one process
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py OUT

Writes (rank 0 only) into OUT:
    seq/        seq-cls module after a full run (global batch 8, grad_accum 1 alone, 2 under torchrun)
    tok/        token-cls module after a full run (same batches)
    dropout-full/     seq-cls module with dropout after a full run (checkpoints in ckpt-full/)
    dropout-resumed/  the same, stopped after 3 steps, then resumed from ckpt/step-00000002
    metrics.json  final metrics of each run and the world size
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from modfit.train import TrainSettings, train
from train_fixtures import (
    collate_fn,
    dropout_model,
    seq_cls_features,
    seq_cls_model,
    token_cls_features,
    token_cls_model,
)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    accum = 2 if world > 1 else 1  # 8 = 2 processes × 2 micro-batches × 2 examples, or 1 × 1 × 8
    common = dict(
        batch_size=8, grad_accum=accum, lr=1e-2, warmup_ratio=0.2, weight_decay=0.01, progress=False
    )
    results = {"world_size": world}

    mm = seq_cls_model()
    result = train(
        mm,
        "task",
        seq_cls_features(32),
        collate_fn=collate_fn,
        settings=TrainSettings(steps=6, **common),
        eval_features=seq_cls_features(8, seed=1),
    )
    results["seq"] = result.metrics
    if rank == 0:
        mm.save("task", out / "seq")

    tm = token_cls_model()
    result = train(
        tm, "ner", token_cls_features(32), collate_fn=collate_fn, settings=TrainSettings(steps=6, **common)
    )
    if rank == 0:
        tm.save("ner", out / "tok")

    # With dropout (each process draws its own masks): a run stopped after step 3 (last
    # checkpoint: step 2) and resumed on a fresh model equals a run that was never stopped.
    def settings(directory: str, **more: object) -> TrainSettings:
        return TrainSettings(
            steps=6, checkpoint_every=2, checkpoint_dir=str(out / directory), **common, **more
        )

    whole = dropout_model()
    train(whole, "task", seq_cls_features(32), collate_fn=collate_fn, settings=settings("ckpt-full"))
    stopped = settings("ckpt", stop_after_steps=3)
    train(dropout_model(), "task", seq_cls_features(32), collate_fn=collate_fn, settings=stopped)
    fresh = dropout_model()
    resumed = train(
        fresh, "task", seq_cls_features(32), collate_fn=collate_fn, settings=settings("ckpt", resume=True)
    )
    results["resumed_from"] = resumed.resumed_from
    if rank == 0:
        whole.save("task", out / "dropout-full")
        fresh.save("task", out / "dropout-resumed")
        (out / "metrics.json").write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        # train() leaves the group up for the caller; a script ends it before exiting, as torch asks.
        # Left to interpreter shutdown, gloo's threads can be torn down unjoined: "terminate called
        # without an active exception" and SIGABRT in a rank (seen about 1 run in 10 under load).
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
