"""Reading training data into typed examples, with errors that name the file and the line.

Formats, picked from `fmt=` or the file extension::

    fmt    extensions                  serves                        one example is
    csv    .csv                        seq-cls, mlm, causal-lm       a row (header names the columns)
    tsv    .tsv                        seq-cls, mlm, causal-lm       a row (tab-delimited csv)
    jsonl  .jsonl, .json               all tasks                     an object on one line
    conll  .conll .iob .bio (.txt*)    token-cls                     a sentence: "token ... tag" lines
    text   .txt .text .raw             mlm, causal-lm                a non-blank line

    * .txt is CoNLL when the task is token-cls, plain text otherwise.

Every problem in a file is a `DataError` whose message reads ``{path}:{line}: {what}`` (1-based
line; ``{path}: {what}`` when the problem is not on one line). Labels stay strings ("0", "pos",
"B-PER"); mapping them to ids needs an explicit label list (see `label_list`).

Multi-task data: an example may name its task, from a column/key (`task_column=`, CSV/TSV/JSONL) or
from the file it came from (`with_task`, for one file per task); `task_list` gives the task names and
`batching.encode(..., tasks=...)` turns them into the batch's `task_ids`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

TASKS = ("seq-cls", "token-cls", "mlm", "causal-lm")
FORMATS = ("csv", "tsv", "jsonl", "conll", "text")

# Tasks whose examples carry labels (the language-modelling tasks make their own targets).
LABELED_TASKS = ("seq-cls", "token-cls")

# Which tasks each format can serve: a data table, not branches.
_SERVES: dict[str, tuple[str, ...]] = {
    "csv": ("seq-cls", "mlm", "causal-lm"),
    "tsv": ("seq-cls", "mlm", "causal-lm"),
    "jsonl": TASKS,
    "conll": ("token-cls",),
    "text": ("mlm", "causal-lm"),
}
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
    ".text": "text",
    ".raw": "text",
}

# Column / key names tried in order when none is given explicitly.
_TEXT_KEYS = ("text", "sentence", "sentence1")
_PAIR_KEYS = ("text_pair", "sentence2")
_LABEL_KEYS = ("label",)
_TOKENS_KEYS = ("tokens",)
_TAGS_KEYS = ("tags", "ner_tags", "labels")

PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A problem in a data file, located by `path` and 1-based `line` (None: not one line).

    The message reads ``{path}:{line}: {what}``, or ``{path}: {what}`` without a line, or just
    ``{what}`` when there is no file (e.g. an unknown label met while encoding).
    """

    def __init__(self, path: PathLike | None, line: int | None, what: str) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.what = what
        where = "" if self.path is None else self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {what}" if where else what)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable (DataLoader workers) despite the three-argument constructor.
        return (type(self), (self.path, self.line, self.what))


@dataclass(frozen=True)
class TextExample:
    """One text (or text pair) with an optional label, for seq-cls, mlm and causal-lm."""

    text: str
    text_pair: str | None = None
    label: str | None = None
    task: str | None = None  # the task the example belongs to (multi-task data), if named


@dataclass(frozen=True)
class TokenExample:
    """One pre-split sentence with an optional tag per token, for token-cls."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...] | None = None
    task: str | None = None  # the task the example belongs to (multi-task data), if named


# --------------------------------------------------------------------------- helpers


def _read_lines(path: PathLike) -> list[str]:
    """Decode a UTF-8 file (BOM allowed) into lines without their line endings."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return lines


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "(none)"


def _pick(found: Sequence[str], explicit: str | None, defaults: Sequence[str]) -> str | None:
    """The explicit name if given (None when absent), else the first default present."""
    if explicit is not None:
        return explicit if explicit in found else None
    return next((name for name in defaults if name in found), None)


def _missing(
    what: str, kind: str, explicit: str | None, defaults: Sequence[str], found: Sequence[str]
) -> str:
    """Message for a `what` column/key (`kind`) that is not there, listing those found."""
    wanted = repr(explicit) if explicit is not None else " or ".join(repr(d) for d in defaults)
    return f"no {what} {kind} {wanted}; {kind}s found: {_names(found)}"


def _label_value(value: object, key: str, spaces_ok: bool) -> str:
    """A label or tag from JSON as a string; ints become their decimal string ("0", "1").

    Tags (`spaces_ok` False) must be one word, as in CoNLL files and for seqeval's chunking.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or an integer, found {_json_type(value)}")
    label = value.strip()
    if not label or (not spaces_ok and any(c.isspace() for c in label)):
        rule = "a non-empty string" if spaces_ok else "a non-empty string without spaces"
        raise ValueError(f"{key!r} must be {rule}, found {value!r}")
    return label


# --------------------------------------------------------------------------- CSV / TSV


def _csv_rows(path: PathLike, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line of the record, fields) for each non-blank record of a CSV/TSV file."""
    text = "\n".join(_read_lines(path))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    end = 0  # last physical line consumed so far; a quoted field may span several lines
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise DataError(path, end + 1, f"malformed {kind}: {e}") from None
        start, end = end + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        yield start, row


def read_csv(
    path: PathLike,
    *,
    delimiter: str = ",",
    text_column: str | None = None,
    label_column: str | None = None,
    read_labels: bool = True,
    require_labels: bool = True,
    task_column: str | None = None,
) -> list[TextExample]:
    """Read a CSV/TSV file with a header row into text examples.

    The text column is `text_column`, else the first of ``text``, ``sentence``, ``sentence1``; an
    optional pair column is ``text_pair`` or ``sentence2``; the label column is `label_column`, else
    ``label``. Blank lines are skipped.

    Args:
        path: the file.
        delimiter: "," for CSV, "\\t" for TSV.
        text_column: name of the text column (default: first of the standard names present).
        label_column: name of the label column (default ``label``).
        read_labels: read the label column at all (False for mlm / causal-lm).
        require_labels: every row must have a non-empty label.
        task_column: name of a column holding each row's task (multi-task data); None: no task.

    Returns:
        One `TextExample` per data row, in file order.

    Raises:
        DataError: empty file, header only, duplicate or missing columns, a row with the wrong
            number of fields, malformed quoting, empty text, a missing label or an empty task.
    """
    rows = _csv_rows(path, delimiter)
    first = next(rows, None)
    if first is None:
        raise DataError(path, None, "empty file: expected a header row and data rows")
    header_line, header = first
    columns = [c.strip() for c in header]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise DataError(path, header_line, f"duplicate column names in the header: {_names(dupes)}")

    text_col = _pick(columns, text_column, _TEXT_KEYS)
    if text_col is None:
        raise DataError(path, header_line, _missing("text", "column", text_column, _TEXT_KEYS, columns))
    pair_col = _pick(columns, None, _PAIR_KEYS)
    label_col = _pick(columns, label_column, _LABEL_KEYS) if read_labels else None
    if read_labels and require_labels and label_col is None:
        what = _missing("label", "column", label_column, _LABEL_KEYS, columns)
        raise DataError(path, header_line, f"{what} (pass label_column=, or require_labels=False)")
    if task_column is not None and task_column not in columns:
        raise DataError(path, header_line, _missing("task", "column", task_column, (), columns))

    index = {c: i for i, c in enumerate(columns)}
    examples = []
    for line, row in rows:
        if len(row) != len(columns):
            expected = f"{len(columns)} fields ({', '.join(columns)})"
            raise DataError(path, line, f"expected {expected}, found {len(row)}")
        text = row[index[text_col]]
        if not text.strip():
            raise DataError(path, line, f"empty text in column {text_col!r}")
        pair = None
        if pair_col is not None:
            pair = row[index[pair_col]]
            if not pair.strip():
                raise DataError(path, line, f"empty text in column {pair_col!r}")
        label = None
        if label_col is not None:
            label = row[index[label_col]].strip() or None
            if label is None and require_labels:
                raise DataError(path, line, f"empty label in column {label_col!r}")
        example_task = None
        if task_column is not None:
            example_task = row[index[task_column]].strip()
            if not example_task:
                raise DataError(path, line, f"empty task in column {task_column!r}")
        examples.append(TextExample(text, pair, label, example_task))
    if not examples:
        raise DataError(path, None, "no examples: the file has a header row only")
    return examples


# --------------------------------------------------------------------------- JSON Lines


def _jsonl_objects(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, object) for each non-blank line of a JSON Lines file."""
    for line, raw in enumerate(_read_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            hint = ""
            if raw.lstrip().startswith("["):
                hint = "; expected one JSON object per line (JSON Lines), not a JSON array"
            raise DataError(path, line, f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
        if not isinstance(obj, dict):
            raise DataError(path, line, f"expected a JSON object, found {_json_type(obj)}")
        yield line, obj


def _text_from_object(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, found {_json_type(value)}")
    if not value.strip():
        raise ValueError(f"empty text in {key!r}")
    return value


def _text_example(
    obj: dict[str, Any], text_key: str | None, label_key: str | None, read_labels: bool, require_labels: bool
) -> TextExample:
    """One seq-cls / LM example from a decoded object; ValueError says what is wrong."""
    keys = list(obj)
    text_name = _pick(keys, text_key, _TEXT_KEYS)
    if text_name is None:
        raise ValueError(_missing("text", "key", text_key, _TEXT_KEYS, keys))
    text = _text_from_object(obj, text_name)
    pair_name = _pick(keys, None, _PAIR_KEYS)
    pair = None if pair_name is None or obj[pair_name] is None else _text_from_object(obj, pair_name)
    label = None
    if read_labels:
        label_name = _pick(keys, label_key, _LABEL_KEYS)
        if label_name is not None and obj[label_name] is not None:
            label = _label_value(obj[label_name], label_name, spaces_ok=True)
        elif require_labels:
            raise ValueError(_missing("label", "key", label_key, _LABEL_KEYS, keys))
    return TextExample(text, pair, label)


def _token_example(
    obj: dict[str, Any], tokens_key: str | None, tags_key: str | None, require_labels: bool
) -> TokenExample:
    """One token-cls example from a decoded object; ValueError says what is wrong."""
    keys = list(obj)
    tokens_name = _pick(keys, tokens_key, _TOKENS_KEYS)
    if tokens_name is None:
        raise ValueError(_missing("tokens", "key", tokens_key, _TOKENS_KEYS, keys))
    tokens = obj[tokens_name]
    if not isinstance(tokens, list):
        raise ValueError(f"{tokens_name!r} must be an array of strings, found {_json_type(tokens)}")
    if not tokens:
        raise ValueError(f"empty {tokens_name!r} array")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            found = repr(token) if isinstance(token, str) else _json_type(token)
            raise ValueError(f"{tokens_name!r}[{i}] must be a non-empty string, found {found}")

    tags_name = _pick(keys, tags_key, _TAGS_KEYS)
    if tags_name is None or obj[tags_name] is None:
        if require_labels:
            raise ValueError(_missing("tags", "key", tags_key, _TAGS_KEYS, keys))
        return TokenExample(tuple(tokens), None)
    tags = obj[tags_name]
    if not isinstance(tags, list):
        raise ValueError(f"{tags_name!r} must be an array, found {_json_type(tags)}")
    if len(tags) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags: each token needs one tag")
    strings = tuple(_label_value(tag, f"{tags_name}[{i}]", spaces_ok=False) for i, tag in enumerate(tags))
    return TokenExample(tuple(tokens), strings)


def read_jsonl(
    path: PathLike,
    task: str = "seq-cls",
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    task_column: str | None = None,
) -> list[TextExample] | list[TokenExample]:
    """Read a JSON Lines file: one object per line, blank lines skipped.

    seq-cls / mlm / causal-lm objects: ``{"text": ..., "text_pair": ..., "label": ...}`` (text also
    as ``sentence``/``sentence1``, pair as ``sentence2``). token-cls objects:
    ``{"tokens": [...], "tags": [...]}`` (tags also as ``ner_tags`` or ``labels``). Integer labels
    and tags become strings ("0"); the LM tasks ignore labels.

    Args:
        path: the file.
        task: one of `TASKS`; token-cls reads tokens and tags, the others read text.
        text_column: key of the text (token-cls: of the tokens), default the standard names.
        label_column: key of the label (token-cls: of the tags), default the standard names.
        require_labels: every object of a labeled task must carry its label or tags.
        task_column: key holding each object's task (multi-task data); None: no task.

    Returns:
        `TokenExample`s for token-cls, `TextExample`s otherwise, in file order.

    Raises:
        DataError: invalid JSON, a line that is not an object, a missing key, a value of the wrong
            type, empty text or tokens, tokens and tags of different lengths, or no examples.
    """
    examples: list[Any] = []
    for line, obj in _jsonl_objects(path):
        try:
            example: TextExample | TokenExample
            if task == "token-cls":
                example = _token_example(obj, text_column, label_column, require_labels)
            else:
                read_labels = task in LABELED_TASKS
                example = _text_example(obj, text_column, label_column, read_labels, require_labels)
            if task_column is not None:
                example = dataclasses.replace(example, task=_task_value(obj, task_column))
            examples.append(example)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
    if not examples:
        raise DataError(path, None, "no examples: the file is empty")
    return examples


def _task_value(obj: dict[str, Any], key: str) -> str:
    """An object's task name: a non-empty string (or an integer, as its decimal string)."""
    if key not in obj or obj[key] is None:
        raise ValueError(_missing("task", "key", key, (), list(obj)))
    return _label_value(obj[key], key, spaces_ok=True)


# --------------------------------------------------------------------------- CoNLL


def read_conll(path: PathLike, *, require_labels: bool = True) -> list[TokenExample]:
    """Read CoNLL-style token/tag lines: one sentence per block, blank lines between sentences.

    Each line holds the token in the first column and the tag in the last, separated by tabs (if
    the line has any) or runs of spaces; columns in between (POS, chunk) are ignored. Lines
    starting with ``-DOCSTART-`` are skipped.

    Args:
        path: the file.
        require_labels: every line must have a tag. When False, a file whose lines are single
            tokens gives examples with ``tags=None`` (a file must not mix the two).

    Returns:
        One `TokenExample` per sentence, in file order.

    Raises:
        DataError: a line with one column (labeled data), an empty token, a tag with spaces, a file
            mixing tagged and untagged lines, or no sentences.
    """
    examples: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    tagged: bool | None = None  # decided by the first token line when require_labels is False

    def flush() -> None:
        if tokens:
            examples.append(TokenExample(tuple(tokens), tuple(tags) if tagged else None))
            tokens.clear()
            tags.clear()

    for line, raw in enumerate(_read_lines(path), start=1):
        text = raw.rstrip()
        if not text.strip() or text.startswith("-DOCSTART-"):
            flush()
            continue
        fields = text.split("\t") if "\t" in text else text.split()
        token, tag = fields[0].strip(), fields[-1] if len(fields) > 1 else None
        if not token.strip():
            raise DataError(path, line, "empty token in the first column")
        if tag is None and require_labels:
            what = f"expected a token and a tag separated by a tab or spaces, found one column: {text!r}"
            raise DataError(path, line, what)
        if tag is not None and (not tag or any(c.isspace() for c in tag)):
            raise DataError(path, line, f"the tag (last column) must be non-space characters, found {tag!r}")
        if tagged is None:
            tagged = tag is not None
        elif tagged != (tag is not None):
            state = "has no tag but earlier lines do" if tagged else "has a tag but earlier lines do not"
            raise DataError(path, line, f"this line {state}")
        tokens.append(token)
        if tag is not None:
            tags.append(tag)
    flush()
    if not examples:
        raise DataError(path, None, "no examples: the file has no token lines")
    return examples


# --------------------------------------------------------------------------- plain text


def read_text(path: PathLike) -> list[TextExample]:
    """Read plain text: each non-blank line (stripped) is one unlabeled example.

    Args:
        path: the file.

    Returns:
        One `TextExample` per non-blank line.

    Raises:
        DataError: the file is not UTF-8 or has no non-blank line.
    """
    examples = [TextExample(line.strip()) for line in _read_lines(path) if line.strip()]
    if not examples:
        raise DataError(path, None, "no examples: the file has no non-blank line")
    return examples


# --------------------------------------------------------------------------- entry points


def _format_for(path: Path, task: str) -> str:
    """The format implied by the file extension (and, for .txt, the task)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "conll" if task == "token-cls" else "text"
    if suffix not in _EXTENSIONS:
        known = ", ".join([*_EXTENSIONS, ".txt"])
        formats = ", ".join(FORMATS)
        what = f"unknown extension {suffix or '(none)'!r}: use one of {known}, or pass fmt= ({formats})"
        raise DataError(path, None, what)
    return _EXTENSIONS[suffix]


def read_examples(
    path: PathLike,
    task: str,
    *,
    fmt: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    task_column: str | None = None,
) -> list[TextExample] | list[TokenExample]:
    """Read a data file for `task`, choosing the reader from `fmt` or the extension.

    Args:
        path: the file.
        task: one of ``seq-cls``, ``token-cls``, ``mlm``, ``causal-lm``.
        fmt: one of ``csv``, ``tsv``, ``jsonl``, ``conll``, ``text``; default from the extension.
        text_column: CSV/TSV column or JSONL key holding the text (token-cls JSONL: the tokens).
        label_column: CSV/TSV column or JSONL key holding the label (token-cls JSONL: the tags).
        require_labels: for seq-cls / token-cls, every example must be labeled; pass False to read
            unlabeled data (prediction). mlm / causal-lm never read labels.
        task_column: CSV/TSV column or JSONL key holding each example's task (multi-task data).

    Returns:
        `TokenExample`s for token-cls, `TextExample`s for the other tasks.

    Raises:
        ValueError: unknown `task` or `fmt`, or column names given for a format without columns.
        DataError: a missing file, an unknown extension, a format that cannot serve `task`, or any
            problem inside the file (see the readers).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {FORMATS}")
    p = Path(path)
    if not p.exists():
        raise DataError(path, None, "file not found")
    if p.is_dir():
        raise DataError(path, None, "is a directory, not a data file")
    fmt = fmt or _format_for(p, task)
    if task not in _SERVES[fmt]:
        able = [f for f, tasks in _SERVES.items() if task in tasks]
        raise DataError(
            path,
            None,
            f"{fmt} data cannot serve task {task!r} ({fmt} serves {', '.join(_SERVES[fmt])}); "
            f"use one of: {', '.join(able)}",
        )
    if fmt in ("conll", "text") and (text_column is not None or label_column is not None):
        raise ValueError(f"text_column= and label_column= apply to csv, tsv and jsonl, not {fmt}")
    if fmt in ("conll", "text") and task_column is not None:
        raise ValueError(f"task_column= applies to csv, tsv and jsonl, not {fmt}; give one file per task")

    need = require_labels and task in LABELED_TASKS
    if fmt in ("csv", "tsv"):
        return read_csv(
            path,
            delimiter="," if fmt == "csv" else "\t",
            text_column=text_column,
            label_column=label_column,
            read_labels=task in LABELED_TASKS,
            require_labels=need,
            task_column=task_column,
        )
    if fmt == "jsonl":
        return read_jsonl(
            path,
            task,
            text_column=text_column,
            label_column=label_column,
            require_labels=need,
            task_column=task_column,
        )
    if fmt == "conll":
        return read_conll(path, require_labels=need)
    return read_text(path)


_INT = re.compile(r"-?\d+")


def label_list(examples: Sequence[TextExample] | Sequence[TokenExample]) -> list[str]:
    """The sorted set of labels (or tags) used by `examples`; unlabeled examples add nothing.

    Integer-like labels sort by value ("2" before "10"); other labels sort as strings.

    Args:
        examples: text examples (their labels) or token examples (their tags).

    Returns:
        The distinct labels, sorted.
    """
    found: set[str] = set()
    for ex in examples:
        if isinstance(ex, TokenExample):
            found.update(ex.tags or ())
        elif ex.label is not None:
            found.add(ex.label)
    if all(_INT.fullmatch(label) for label in found):
        return sorted(found, key=int)
    return sorted(found)


def task_list(examples: Sequence[TextExample] | Sequence[TokenExample]) -> list[str]:
    """The sorted set of task names the examples carry (as `label_list` sorts); [] when none has one."""
    found = {ex.task for ex in examples if ex.task is not None}
    if all(_INT.fullmatch(name) for name in found):
        return sorted(found, key=int)
    return sorted(found)


_E = TypeVar("_E", TextExample, TokenExample)


def with_task(examples: Sequence[_E], task: str) -> list[_E]:
    """The examples of one task's file, each naming `task`.

    Raises:
        ValueError: an empty task name.
    """
    if not task.strip():
        raise ValueError("a task name must not be empty")
    return [dataclasses.replace(ex, task=task) for ex in examples]
