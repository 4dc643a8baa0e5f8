"""Synthetic multi-task data with shared latent skills, generated deterministically from a seed.

A *skill* is detecting one word category in a sentence ("does it mention an animal?"); a *task* is a
boolean function of two skills, e.g. ``animal-colour`` (op "and"): "yes" when the sentence mentions
an animal and a colour. Tasks that share a skill share what has to be learned, which is the structure
Polytropon's task × skill allocation is meant to find (Ponti et al. 2023); held-out tasks are new
pairs of skills that training tasks cover one by one.

A sentence is 4 to 7 neutral filler words, plus one word of every category it mentions, at random
positions. Per task the labels are balanced: half the sentences satisfy the task's function of its two
skills, half do not (each case of the function drawn uniformly); the other categories appear with
probability 1/2 each, as distractors::

    tasks = skill_tasks(6)                                 # 15 pairs of the first 6 skills
    train_tasks, new_tasks = split_tasks(tasks, heldout=3, seed=0)
    data = [ex for t in train_tasks for ex in examples(t, 200, seed=0)]   # TextExample(text, label, task)
    write_csv("train.csv", data)                           # columns text,label,task

Generated on the fly: `random.Random` seeded with a string is the same on every platform and Python
version (its string seeding hashes with SHA-512), so a seed always gives the same data.
"""

from __future__ import annotations

import csv
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write
from ..data import TextExample

# The skills: word categories, 12 words each, no word in two categories.
SKILLS: dict[str, tuple[str, ...]] = {
    "animal": (
        "cat", "dog", "horse", "tiger", "rabbit", "wolf", "sheep", "eagle", "mouse", "lion", "goat", "fox"
    ),
    "colour": (
        "red", "blue", "green", "yellow", "purple", "crimson", "black", "white", "pink", "brown", "grey",
        "violet",
    ),
    "fruit": (
        "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "kiwi",
        "apricot",
    ),
    "number": (
        "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "hundred"
    ),
    "weather": (
        "rain", "snow", "storm", "wind", "fog", "thunder", "hail", "sunshine", "frost", "cloud", "drizzle",
        "breeze",
    ),
    "body": (
        "hand", "foot", "knee", "elbow", "shoulder", "finger", "ankle", "wrist", "chin", "nose", "ear", "toe"
    ),
    "vehicle": (
        "car", "bus", "train", "truck", "bicycle", "boat", "plane", "tram", "taxi", "van", "ship", "scooter"
    ),
    "instrument": (
        "piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "banjo", "clarinet",
        "tuba", "saxophone",
    ),
}  # fmt: skip
FILLER = (
    "the", "a", "of", "and", "was", "we", "they", "saw", "near", "old", "house", "today", "then", "quite",
    "very", "some", "walked", "found", "little", "table", "morning", "street", "people", "said", "window",
    "paper", "road", "small", "large", "again", "later", "often", "room", "door", "letter", "city",
    "friend", "heard", "with", "under", "over", "before", "after", "new", "long", "quiet", "story", "box",
)  # fmt: skip
LABELS = ("no", "yes")

# Each boolean function of two skills: its value for (has skill a, has skill b).
OPS = {
    "and": lambda a, b: a and b,
    "or": lambda a, b: a or b,
    "xor": lambda a, b: a != b,
}


@dataclass(frozen=True)
class SkillTask:
    """A task: the label is `op` of "mentions skill a" and "mentions skill b".

    Attributes:
        skills: the two skills' indices into `SKILLS`.
        op: "and", "or" or "xor".
        n_skills: the first n categories of `SKILLS` appear in its sentences (distractors included).
    """

    skills: tuple[int, int]
    op: str = "and"
    n_skills: int = 6

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; use one of {', '.join(OPS)}")
        if not 2 <= self.n_skills <= len(SKILLS):
            raise ValueError(f"n_skills must be in [2, {len(SKILLS)}], got {self.n_skills}")
        a, b = self.skills
        if a == b or not (0 <= a < self.n_skills and 0 <= b < self.n_skills):
            raise ValueError(f"skills must be two different indices below {self.n_skills}, got {self.skills}")

    @property
    def name(self) -> str:
        """E.g. "animal-colour" ("animal-or-colour" for other ops than "and")."""
        a, b = (list(SKILLS)[i] for i in self.skills)
        return f"{a}-{b}" if self.op == "and" else f"{a}-{self.op}-{b}"

    def label(self, present: set[int]) -> str:
        """The label of a sentence that mentions the skills in `present`."""
        a, b = self.skills
        return LABELS[int(OPS[self.op](a in present, b in present))]


def skill_tasks(n_skills: int = 6, op: str = "and") -> list[SkillTask]:
    """Every pair of the first `n_skills` skills as a task with `op`, in a fixed order."""
    return [SkillTask(pair, op, n_skills) for pair in itertools.combinations(range(n_skills), 2)]


def split_tasks(
    tasks: Sequence[SkillTask], heldout: int, seed: int = 0
) -> tuple[list[SkillTask], list[SkillTask]]:
    """(training tasks, held-out tasks): `heldout` tasks drawn with `seed` such that every skill of a
    held-out task appears in at least two training tasks (new combinations of known skills).

    Raises:
        ValueError: no such split exists for these tasks (too many held out).
    """
    rng = random.Random(f"split-{seed}")
    for _ in range(1000):
        held = rng.sample(range(len(tasks)), heldout)
        train = [t for i, t in enumerate(tasks) if i not in held]
        counts = {s: sum(s in t.skills for t in train) for s in range(max(t.n_skills for t in tasks))}
        if all(counts[s] >= 2 for i in held for s in tasks[i].skills):
            return train, [tasks[i] for i in sorted(held)]
    raise ValueError(f"cannot hold out {heldout} of {len(tasks)} tasks with their skills still trained")


def _cases(task: SkillTask, label: str) -> list[tuple[bool, bool]]:
    """The (has a, has b) cases that give `label`."""
    cases: list[tuple[bool, bool]] = [(False, False), (False, True), (True, False), (True, True)]
    return [case for case in cases if task.label(_present(task, case)) == label]


def _present(task: SkillTask, case: tuple[bool, bool]) -> set[int]:
    return {s for s, has in zip(task.skills, case, strict=True) if has}


def sentence(rng: random.Random, present: set[int]) -> str:
    """4 to 7 filler words with one word of each skill in `present` inserted at random positions."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 7))]
    categories = list(SKILLS.values())
    for skill in sorted(present):
        words.insert(rng.randint(0, len(words)), rng.choice(categories[skill]))
    return " ".join(words)


def examples(task: SkillTask, n: int, seed: int = 0, split: str = "train") -> list[TextExample]:
    """`n` examples of `task` (labels alternate no/yes: balanced), each naming the task.

    Args:
        split: part of the random stream's key: "train" and "test" give different sentences.
    """
    rng = random.Random(f"{split}-{seed}-{task.name}-{task.n_skills}")
    out = []
    for i in range(n):
        label = LABELS[i % 2]
        present = _present(task, rng.choice(_cases(task, label)))
        present |= {s for s in range(task.n_skills) if s not in task.skills and rng.random() < 0.5}
        out.append(TextExample(sentence(rng, present), label=label, task=task.name))
    return out


def write_csv(path: str | Path, rows: Sequence[TextExample]) -> Path:
    """Write examples as CSV with the columns text,label,task (atomically)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["text", "label", "task"])
            writer.writerows([ex.text, ex.label, ex.task] for ex in rows)

    atomic_write(path, write)
    return Path(path)
