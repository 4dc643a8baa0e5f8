"""`train` under torchrun: 2 CPU processes (gloo) give the module one process gives.

Both runs use the global batch 8: one process takes it whole, two processes take 4 examples each
in 2 micro-batches of 2. Gradient averaging over equal slices, with the loss weighted by each
slice's share of the predictions, is the full-batch gradient, so the modules agree to rounding.
The worker script (tests/ddp_worker.py) does the training; this test launches it and compares
the saved safetensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ddp_worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(command: list[str], out: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, whatever the machine has
    done = subprocess.run(
        [*command, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "module.safetensors")), load_file(str(b / "module.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"], two)
    # The baseline runs the same script in this process (no WORLD_SIZE: one process), which saves
    # starting another interpreter; its thread count is put back afterwards.
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
                patch.delenv(key, raising=False)
            ddp_worker.main(one)
    finally:
        torch.set_num_threads(threads)
    return one, two


def test_two_processes_train_the_module_one_process_trains(runs: tuple[Path, Path]) -> None:
    one, two = runs
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    assert _max_diff(one / "seq", two / "seq") < 1e-5
    assert _max_diff(one / "tok", two / "tok") < 1e-5  # token-weighted loss across processes
    seq_one = json.loads((one / "metrics.json").read_text())["seq"]
    seq_two = json.loads((two / "metrics.json").read_text())["seq"]
    assert seq_two == pytest.approx(seq_one, abs=1e-5)


def test_distributed_resume_is_exact_and_rank_zero_writes_checkpoints(runs: tuple[Path, Path]) -> None:
    _, two = runs
    assert json.loads((two / "metrics.json").read_text())["resumed_from"] == 2
    assert _max_diff(two / "dropout-full", two / "dropout-resumed") < 1e-6
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]
    state = json.loads((two / "ckpt" / "step-00000006" / "trainer.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # each process's random state
    tensors = load_file(str(two / "ckpt" / "step-00000006" / "trainer.safetensors"))
    assert not torch.equal(tensors["rng.0.torch"], tensors["rng.1.torch"])  # processes draw different masks
