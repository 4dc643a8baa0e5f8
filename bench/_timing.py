"""Measuring helpers shared by the benchmarks (bench/methods.py, bench/mixed_batch.py, bench/peers.py).

- `peak_rss_kib()`: this process's peak resident memory so far (Linux: VmHWM of /proc/self/status;
  elsewhere ru_maxrss); `rss_kib()`: the resident size now. `reset_peak_rss()` starts the peak over at
  the current size (Linux: /proc/self/clear_refs) and returns that size. Allocator caches make memory
  hard to give back, so a benchmark that reports memory still measures one configuration per process
  (`run_child`).
  (ru_maxrss alone misleads in a subprocess: the child of a big parent inherits the parent's peak.)
- `step_times(step, warmup, steps)`: ms of each measured call of `step` after `warmup` unmeasured ones.
- `timed(run)`: ms of one call of `run` under `torch.no_grad()` (inference).
- `run_child(command)`: run a benchmark subprocess that prints one JSON object as its last stdout
  line; returns it, or {"error": <last stderr line>}.
- `folder_bytes(directory)`: the size on disk of a saved module's files.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    """Peak resident set size of this process so far (since `reset_peak_rss`), in KiB."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_kib() -> int:
    """Resident set size of this process now, in KiB (the peak so far where /proc is missing)."""
    current = _status_kib("VmRSS")
    return current if current is not None else peak_rss_kib()


def reset_peak_rss() -> int:
    """Start the peak over at the current resident size where the system allows it; returns the KiB
    that later peaks are measured from (the current size, or the peak so far where no reset exists)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
    except OSError:
        return peak_rss_kib()
    return rss_kib()


def step_times(step: Callable[[], object], warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of `steps` calls of `step`, after `warmup` calls that are not measured."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def timed(run: Callable[[], object]) -> float:
    """Milliseconds of one call of `run` without autograd."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        run()
    return (time.perf_counter() - start) * 1000


def run_child(command: list[str]) -> dict[str, Any]:
    """Run `command`; its last stdout line is a JSON object. On failure: {"error": last stderr line}."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": tail[0]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def folder_bytes(directory: str | Path) -> int:
    """Total size of the files under `directory`."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
