"""Synthetic multi-task, multi-"language" data: the same sentences, labelled by several tasks and
written in several systematic "languages" (deterministic from a seed; stdlib only).

Every underlying sentence is built from templates and word lists written for modfit, and carries
three binary attributes, one per task; a task's label is its attribute ("no"/"yes", one label set
shared by all tasks)::

    sentiment   the opinion word is positive                  "... and it was wonderful"
    topic       the event is a sport (not a meal)             "... went to the tennis final ..."
    person      the subject includes the speaker (I, we)      "my sister and i saw ..."

A "language" is a transformation of the English words that keeps every label:

    en    the sentence itself                 "we saw the match and found it dull"
    rev   the words in reverse order          "dull it found and match the saw we"
    suf   the suffix "ku" on every word       "weku sawku theku matchku ..."
    dis   after every word, the marker "zo"   "we zo pizza saw zo she the zo great match ..."
          and a random cue word (a distractor
          drawn from all the tasks' words)
    fil   (extra, not in LANGUAGES) the fillers "zo ba" after every word

A frozen English model reads `rev` almost as well as `en`, `suf` worse and `dis` much worse: with
a head trained on English (48 steps, MiniLM), `dis` takes person from 0.95 to 0.68, sentiment from
1.0 to 0.67 and topic from 1.0 to 0.72; `suf` takes person to 0.76 (its "i" becomes "ik ##u"),
sentiment to 0.92. What `dis` asks of a model — skip the word after "zo" — is the same for every
task, so it can be learned from some tasks and used for another; part of what `suf` asks is not
(only the person task needs "iku" read as "i").

`examples(pairs, per_pair, seed, split)` draws labelled examples for chosen (task, language) pairs;
train and test sentences never overlap.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

TASKS: tuple[str, ...] = ("sentiment", "topic", "person")
LANGUAGES: tuple[str, ...] = ("en", "rev", "suf", "dis")
LABELS: tuple[str, ...] = ("no", "yes")

# Word lists by the attribute value they express ("yes" / "no" for the task that reads them).
_SUBJECTS = {
    "yes": ("i", "we", "my sister and i", "my colleagues and i", "all of us", "my friend and i"),
    "no": ("she", "he", "they", "the tourists", "her uncle", "his parents", "the new neighbours"),
}
_EVENTS = {
    "yes": ("match", "race", "tournament", "football game", "marathon", "tennis final", "boxing fight",
            "cycling stage", "swim meet", "rugby game"),
    "no": ("pizza", "soup", "pasta", "salad", "curry", "pancakes", "cheese platter", "noodles", "burger",
           "dessert"),
}  # fmt: skip
_OPINIONS = {
    "yes": ("great", "wonderful", "excellent", "lovely", "fantastic", "brilliant", "superb", "delightful",
            "amazing", "perfect"),
    "no": ("awful", "terrible", "boring", "dreadful", "disappointing", "horrible", "dull", "mediocre",
           "lousy", "miserable"),
}  # fmt: skip
_TIMES = ("yesterday", "last week", "on sunday", "this morning", "last night", "in the spring", "after work")
_PLACES = ("in town", "near the station", "downtown", "at the old market", "by the river", "on the coast")
_TEMPLATES = (
    "{time} {subject} went to the {event} {place} and it was {opinion}",
    "{subject} saw the {event} {time} and found it {opinion}",
    "the {event} that {subject} saw {place} {time} was {opinion}",
    "{time} {subject} told everyone about the {event} {place} which was {opinion}",
    "{subject} remembered the {event} {place} as {opinion}",
    "it was {opinion} said the review of the {event} that {subject} had {time}",
)

# Words that say something to some task, for `dis`'s distractors.
_CUES = sorted(
    {w for table in (_SUBJECTS, _EVENTS, _OPINIONS) for ws in table.values() for p in ws for w in p.split()}
)


def _distract(words: list[str]) -> list[str]:
    """After every word, the marker "zo" and a cue word drawn at random (seeded by the sentence)."""
    rng = random.Random(" ".join(words))
    return [piece for w in words for piece in (w, "zo", rng.choice(_CUES))]


_TRANSFORMS: dict[str, Callable[[list[str]], list[str]]] = {
    "en": lambda words: words,
    "rev": lambda words: words[::-1],
    "suf": lambda words: [w + "ku" for w in words],
    "dis": _distract,
    "fil": lambda words: [piece for w in words for piece in (w, "zo", "ba")],
}


@dataclass(frozen=True)
class Sentence:
    """One underlying English sentence and its label for every task."""

    words: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]  # (task, label) for every task in TASKS

    def label(self, task: str) -> str:
        return dict(self.labels)[task]


@dataclass(frozen=True)
class Example:
    """A sentence written in `language`, labelled for `task`."""

    text: str
    task: str
    language: str
    label: str


def sentence(rng: random.Random) -> Sentence:
    """A random sentence: each task's attribute drawn uniformly, then words for it."""
    labels = {task: rng.choice(LABELS) for task in TASKS}
    text = rng.choice(_TEMPLATES).format(
        time=rng.choice(_TIMES),
        subject=rng.choice(_SUBJECTS[labels["person"]]),
        event=rng.choice(_EVENTS[labels["topic"]]),
        place=rng.choice(_PLACES),
        opinion=rng.choice(_OPINIONS[labels["sentiment"]]),
    )
    return Sentence(tuple(text.split()), tuple(labels.items()))


def translate(words: Sequence[str], language: str) -> str:
    """The sentence `words` written in `language`.

    Raises:
        KeyError: an unknown language (the message lists the known ones).
    """
    try:
        transform = _TRANSFORMS[language]
    except KeyError:
        raise KeyError(f"unknown language {language!r}; known: {', '.join(_TRANSFORMS)}") from None
    return " ".join(transform(list(words)))


@functools.lru_cache(maxsize=8)
def sentence_pool(seed: int, split: Literal["train", "test"], size: int = 3000) -> tuple[Sentence, ...]:
    """`size` distinct sentences of one split; the two splits of a seed share no sentence."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    pools: dict[str, list[Sentence]] = {"train": [], "test": []}
    while len(pools["test"]) < size:  # train first, then test: the same stream for both splits
        s = sentence(rng)
        if s.words in seen:
            continue
        seen.add(s.words)
        pools["train" if len(pools["train"]) < size else "test"].append(s)
    return tuple(pools[split])


def examples(
    pairs: Iterable[tuple[str, str]],
    per_pair: int,
    *,
    seed: int = 0,
    split: Literal["train", "test"] = "train",
) -> list[Example]:
    """`per_pair` labelled examples for every (task, language) pair, balanced per label, no sentence
    twice within a pair (per_pair up to about 2,900).

    Each pair draws its own sentences (a stream seeded by the seed, the task and the language), so
    one pair's examples do not depend on which other pairs are asked for.

    Raises:
        KeyError: an unknown task or language.
    """
    pool = sentence_pool(seed, split)
    out: list[Example] = []
    for task, language in pairs:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        rng = random.Random(f"{seed}/{split}/{task}/{language}")
        chosen: list[Sentence] = []
        for i, label in enumerate(LABELS):  # as many of each label (the first ones get the remainder)
            count = per_pair // len(LABELS) + (i < per_pair % len(LABELS))
            chosen.extend(rng.sample([s for s in pool if s.label(task) == label], count))
        rng.shuffle(chosen)
        out.extend(Example(translate(s.words, language), task, language, s.label(task)) for s in chosen)
    return out


def encode_examples(
    items: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int = 80,
    tasks: Sequence[str] = TASKS,
    languages: Sequence[str] = LANGUAGES,
) -> list[dict[str, Any]]:
    """Features for `modfit.train`/`evaluate`: input_ids, attention_mask, labels (id in LABELS), and
    the routing columns task_ids and language_ids (positions in `tasks` and `languages`)."""
    enc = tokenizer([e.text for e in items], truncation=True, max_length=max_length)
    features = []
    for i, e in enumerate(items):
        feature = {
            key: enc[key][i] for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc
        }
        feature["labels"] = LABELS.index(e.label)
        feature["task_ids"] = list(tasks).index(e.task)
        feature["language_ids"] = list(languages).index(e.language)
        features.append(feature)
    return features
