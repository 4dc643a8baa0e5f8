"""The task × skill allocation of a task-routed module as a heatmap (`modfit routing-plot`).

A module whose units expose `allocation() -> (matrix, task names)` (Polytropon: σ of its logits,
(T, h, S)) can be drawn: one panel per head, rows = tasks, columns = skills, cells coloured on the fixed
scale 0..1 (the probability that the task uses the skill)::

    alloc = module_allocation(mm, "poly")          # Allocation(matrix (T, h, S), tasks)
    plot_allocation(alloc, "poly.png", title="poly")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model import ModularModel
from ..plotting import new_figure, save_png


@dataclass(frozen=True)
class Allocation:
    """A task × skill allocation: `matrix` (T, h, S) in [0, 1] and the task names (T of them)."""

    matrix: torch.Tensor
    tasks: tuple[str, ...]

    @property
    def heads(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def skills(self) -> int:
        return int(self.matrix.shape[2])

    def as_json(self) -> dict[str, Any]:
        """{"tasks", "heads", "skills", "allocation": (T, h, S) nested lists}."""
        return {
            "tasks": list(self.tasks),
            "heads": self.heads,
            "skills": self.skills,
            "allocation": self.matrix.tolist(),
        }


def module_allocation(mm: ModularModel, name: str) -> Allocation:
    """The allocation of module `name`, read from its first unit that exposes `allocation()`.

    Raises:
        KeyError: no such module.
        ValueError: the module's units have no task × skill allocation.
    """
    for _, unit in mm.units(name):
        read = getattr(unit, "allocation", None)
        if callable(read):
            matrix, tasks = read()
            rows = int(matrix.shape[0])
            names = tuple(tasks) if tasks else tuple(f"task {i}" for i in range(rows))
            return Allocation(matrix.detach().float().cpu(), names)
    method = mm.records[name].config.method
    raise ValueError(f"module '{name}' ({method}) has no task x skill allocation to draw")


def plot_allocation(allocation: Allocation, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the allocation (one heatmap per head, tasks x skills, scale 0..1, values in the cells when
    they fit) and write it as a PNG, atomically. Uses matplotlib's Agg canvas directly (no pyplot).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (`pip install 'modfit[plot]'`).
    """
    matrix = allocation.matrix.numpy()  # (T, h, S)
    tasks, heads, skills = matrix.shape
    width = 1.6 + heads * (0.8 + 0.45 * skills) + 1.2
    fig = new_figure("the allocation", figsize=(width, 1.4 + 0.32 * tasks), layout="constrained")
    axes = fig.subplots(1, heads, squeeze=False)[0]
    image = None
    for k, ax in enumerate(axes):
        image = ax.imshow(matrix[:, k, :], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        if tasks * skills <= 400:  # numbers only where they stay legible
            for t in range(tasks):
                for s in range(skills):
                    value = float(matrix[t, k, s])
                    colour = "white" if value > 0.6 else "black"
                    ax.text(s, t, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=7)
        ax.set_xticks(range(skills), [str(s) for s in range(skills)])
        ax.set_yticks(range(tasks), list(allocation.tasks) if k == 0 else [""] * tasks)
        ax.set_xlabel("skill")
        if heads > 1:
            ax.set_title(f"head {k}")
    axes[0].set_ylabel("task")
    fig.suptitle(title or "task x skill allocation")
    assert image is not None
    fig.colorbar(image, ax=list(axes), label="P(task uses skill)")
    return save_png(fig, path)
