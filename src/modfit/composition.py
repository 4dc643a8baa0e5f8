"""Composition expressions: which modules are active, and how they combine.

The same expression serves training, inference, saving and the CLI. Its textual form is what
`--compose` takes; every operator nests in every other::

    sentiment                        one module
    stack(en, ner)                   sequential: `en` then `ner` at every site (MAD-X)
    fuse(a, b, c)                    AdapterFusion: attention over the modules' outputs, per site
    average(a, b, weights=[0.7, 0.3])    weighted mean of the modules' outputs (representation averaging)
    parallel(a, b)                   one forward pass, every input row through each branch (one head each)
    split(a, b, at=8)                tokens 0..7 through `a`, the rest through `b`
    batchsplit(a, b, sizes=[3, 5])   batch rows 0..2 through `a`, 3..7 through `b`

`Stack` applies its children in order at each site: function units (adapters) transform the
output one after the other; parameter units (LoRA) add their deltas, where order does not matter.
The other operators give each child the site's output and combine what the children return (see
`compose/plan.py`, which evaluates an expression at one site). `fuse` needs fusion layers: a module
of method `fusion` over exactly those children (`mm.add_fusion`), or named with `fusion=NAME`.

Expressions round-trip through text (`str`, `parse`) and JSON (`to_dict`, `from_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


class CompositionError(ValueError):
    """An expression that does not parse, names modules that do not exist, or cannot be meaningful."""


@dataclass(frozen=True)
class Composition:
    """Base of composition expressions."""

    op: ClassVar[str] = ""
    # Operators with trained layers of their own (fuse: fusion layers) name the method of the module
    # holding them, and the option that may name that module explicitly (fuse(a, b, fusion=f1)).
    layers_method: ClassVar[str | None] = None
    layers_option: ClassVar[str] = ""

    @property
    def children(self) -> tuple[Composition, ...]:
        return ()

    def layers_name(self) -> str | None:
        """The module named by `layers_option`, if the expression names one."""
        return getattr(self, self.layers_option, None) if self.layers_option else None

    def names(self) -> list[str]:
        """Module names in application order (each once).

        Raises:
            CompositionError: a module appears twice.
        """
        seen: dict[str, None] = {}
        for child in self.children:
            for name in child.names():
                if name in seen:
                    raise CompositionError(f"module '{name}' appears twice in {self}")
                seen[name] = None
        return list(seen)

    def options(self) -> dict[str, Any]:
        """The operator's keyword arguments that differ from their defaults (for text and JSON)."""
        return {}

    def __str__(self) -> str:  # the textual form, parseable by `parse`
        args = [str(c) for c in self.children]
        args += [f"{k}={_format_value(v)}" for k, v in self.options().items()]
        return f"{self.op}({', '.join(args)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"op": ..., "children": [...], options...}; a module is its name."""
        return {"op": self.op, "children": [c.to_json() for c in self.children], **_jsonable(self.options())}

    def to_json(self) -> Any:
        return self.to_dict()

    def walk(self) -> list[Composition]:
        """This expression and all its sub-expressions, depth first."""
        out: list[Composition] = [self]
        for child in self.children:
            out.extend(child.walk())
        return out


@dataclass(frozen=True)
class Single(Composition):
    """One module by name."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def __str__(self) -> str:
        return self.name

    def to_json(self) -> Any:
        return self.name


def _as_children(op: str, children: Sequence[Composition | str], least: int) -> tuple[Composition, ...]:
    if len(children) < least:
        raise CompositionError(f"{op}() needs at least {'one module' if least == 1 else f'{least} modules'}")
    return tuple(as_composition(c) for c in children)


@dataclass(frozen=True, init=False)
class Stack(Composition):
    """Sequential composition: children applied in order (e.g. language module, then task module)."""

    op: ClassVar[str] = "stack"
    items: tuple[Composition, ...]

    def __init__(self, *children: Composition | str) -> None:
        object.__setattr__(self, "items", _as_children("stack", children, 1))

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items


@dataclass(frozen=True, init=False)
class Fuse(Composition):
    """AdapterFusion over the children's outputs (Pfeiffer et al. 2021), with trained fusion layers.

    Attributes:
        fusion: the name of the fusion module holding the layers; None: the one fusion module on the
            model made for exactly these children.
    """

    op: ClassVar[str] = "fuse"
    layers_method: ClassVar[str | None] = "fusion"
    layers_option: ClassVar[str] = "fusion"
    items: tuple[Composition, ...]
    fusion: str | None = None

    def __init__(self, *children: Composition | str, fusion: str | None = None) -> None:
        object.__setattr__(self, "items", _as_children("fuse", children, 2))
        object.__setattr__(self, "fusion", fusion)

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {} if self.fusion is None else {"fusion": self.fusion}


@dataclass(frozen=True, init=False)
class Average(Composition):
    """The weighted mean of the children's outputs at every site (default: equal weights).

    Weights need not sum to one (a negative weight subtracts a module's effect).
    """

    op: ClassVar[str] = "average"
    items: tuple[Composition, ...]
    weights: tuple[float, ...] | None = None

    def __init__(self, *children: Composition | str, weights: Sequence[float] | None = None) -> None:
        items = _as_children("average", children, 2)
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(items):
                raise CompositionError(f"average(): {len(weights)} weights for {len(items)} modules")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "weights", weights)

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {} if self.weights is None else {"weights": list(self.weights)}

    def resolved_weights(self) -> tuple[float, ...]:
        return self.weights if self.weights is not None else (1.0 / len(self.items),) * len(self.items)


@dataclass(frozen=True, init=False)
class Parallel(Composition):
    """Every input row through each child in one forward pass (the batch is replicated once per
    child at the start); in head mode each child's head gives its own logits."""

    op: ClassVar[str] = "parallel"
    items: tuple[Composition, ...]

    def __init__(self, *children: Composition | str) -> None:
        object.__setattr__(self, "items", _as_children("parallel", children, 2))

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items


@dataclass(frozen=True, init=False)
class Split(Composition):
    """The first `at` positions of the sequence through the first child, the rest through the second."""

    op: ClassVar[str] = "split"
    items: tuple[Composition, ...]
    at: int = 0

    def __init__(self, *children: Composition | str, at: int) -> None:
        items = _as_children("split", children, 2)
        if len(items) != 2:
            raise CompositionError(f"split() takes exactly 2 modules, got {len(items)}")
        if not isinstance(at, int) or isinstance(at, bool) or at < 1:
            raise CompositionError(f"split(): at must be an integer >= 1, got {at!r}")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "at", at)

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {"at": self.at}


@dataclass(frozen=True, init=False)
class BatchSplit(Composition):
    """Consecutive blocks of batch rows through the children: rows 0..sizes[0]-1 through the first..."""

    op: ClassVar[str] = "batchsplit"
    items: tuple[Composition, ...]
    sizes: tuple[int, ...] = ()

    def __init__(self, *children: Composition | str, sizes: Sequence[int]) -> None:
        items = _as_children("batchsplit", children, 2)
        sizes = tuple(sizes)
        if len(sizes) != len(items):
            raise CompositionError(f"batchsplit(): {len(sizes)} sizes for {len(items)} modules")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in sizes):
            raise CompositionError(f"batchsplit(): sizes must be integers >= 0, got {list(sizes)}")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "sizes", sizes)

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes)}


_OPERATORS: dict[str, type[Composition]] = {}
_OPTIONS: dict[str, dict[str, str]] = {}  # operator -> option -> kind: int, ints, float, floats, name


def register_operator(cls: type[Composition], options: dict[str, str] | None = None) -> type[Composition]:
    """Make `cls` (a frozen dataclass with `op`, children as positional arguments and keyword options)
    usable in the textual and JSON forms. `options`: option name -> kind ("int", "ints", "float",
    "floats" or "name"). Its site evaluation is registered in `compose.plan.register_node`.

    Raises:
        ValueError: the operator name is taken by another class.
    """
    existing = _OPERATORS.get(cls.op)
    if existing is not None and existing is not cls:
        raise ValueError(f"composition operator '{cls.op}' is already registered by {existing.__name__}")
    _OPERATORS[cls.op] = cls
    _OPTIONS[cls.op] = dict(options or {})
    return cls


def operator_with_layers(method: str) -> type[Composition] | None:
    """The operator whose own layers a module of `method` holds (fusion -> fuse), if any."""
    return next((cls for cls in _OPERATORS.values() if cls.layers_method == method), None)


register_operator(Stack)
register_operator(Fuse, {"fusion": "name"})
register_operator(Average, {"weights": "floats"})
register_operator(Parallel)
register_operator(Split, {"at": "int"})
register_operator(BatchSplit, {"sizes": "ints"})
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z0-9_\-.]+)|(?P<sym>[(),=\[\]]))")


def as_composition(value: Composition | str) -> Composition:
    """A composition from an expression object, a module name or an expression string."""
    if isinstance(value, Composition):
        return value
    return parse(value)


def parse(text: str) -> Composition:
    """Parse the textual form, e.g. "stack(en, ner)", "average(a, b, weights=[0.5, 0.5])" or "sst".

    Raises:
        CompositionError: the text does not parse; the message shows where.
    """
    tokens = _tokenize(text)
    expr, pos = _parse_expr(tokens, 0, text)
    if pos != len(tokens):
        raise CompositionError(f"unexpected '{tokens[pos][1]}' in composition '{text}'")
    return expr


def from_dict(value: Any, *, source: str = "composition") -> Composition:
    """An expression from its JSON form (`Composition.to_dict`; a module is its name).

    Raises:
        CompositionError: naming `source` and what is wrong.
    """
    if isinstance(value, str):
        return Single(value)
    if not isinstance(value, Mapping) or "op" not in value:
        raise CompositionError(f"{source}: expected a module name or an object with 'op', got {value!r}")
    fields = dict(value)
    op = fields.pop("op")
    cls = _OPERATORS.get(op)
    if cls is None:
        raise CompositionError(f"{source}: unknown operator {op!r}; known: {', '.join(_OPERATORS)}")
    children = fields.pop("children", None)
    if not isinstance(children, list):
        raise CompositionError(f"{source}: '{op}' needs a list 'children'")
    allowed = _OPTIONS.get(op, {})
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise CompositionError(f"{source}: unknown option(s) {', '.join(unknown)} for {op}()")
    kids = [from_dict(c, source=f"{source}.children[{i}]") for i, c in enumerate(children)]
    try:
        return cls(*kids, **fields)
    except TypeError as e:
        raise CompositionError(f"{source}: {op}(): {e}") from None


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise CompositionError(f"cannot read composition '{text}' at character {pos + 1}: '{text[pos:]}'")
        kind = "name" if match.group("name") else "sym"
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    if not tokens:
        raise CompositionError("empty composition expression")
    return tokens


def _parse_expr(tokens: list[tuple[str, str]], pos: int, text: str) -> tuple[Composition, int]:
    if pos >= len(tokens) or tokens[pos][0] != "name":
        raise CompositionError(f"expected a module name in composition '{text}'")
    name = tokens[pos][1]
    pos += 1
    if pos < len(tokens) and tokens[pos][1] == "(":
        op = _OPERATORS.get(name.lower())
        if op is None:
            raise CompositionError(
                f"unknown composition '{name}(...)' in '{text}'; known: {', '.join(_OPERATORS)}"
            )
        children: list[Composition] = []
        options: dict[str, Any] = {}
        pos += 1
        while True:
            is_option = pos + 1 < len(tokens) and tokens[pos][0] == "name" and tokens[pos + 1][1] == "="
            if is_option:
                key = tokens[pos][1]
                value, pos = _parse_option(op.op, key, tokens, pos + 2, text)
                options[key] = value
            else:
                if options:
                    raise CompositionError(f"a module after the options of {op.op}() in '{text}'")
                child, pos = _parse_expr(tokens, pos, text)
                children.append(child)
            if pos >= len(tokens):
                raise CompositionError(f"missing ')' in composition '{text}'")
            if tokens[pos][1] == ")":
                try:
                    return op(*children, **options), pos + 1
                except TypeError as e:
                    raise CompositionError(f"{op.op}() in '{text}': {e}") from None
            if tokens[pos][1] != ",":
                raise CompositionError(
                    f"expected ',' or ')' after '{tokens[pos - 1][1]}' in composition '{text}'"
                )
            pos += 1
    return Single(name), pos


def _parse_option(op: str, key: str, tokens: list[tuple[str, str]], pos: int, text: str) -> tuple[Any, int]:
    kinds = _OPTIONS.get(op, {})
    if key not in kinds:
        known = ", ".join(kinds) or "none"
        raise CompositionError(f"unknown option '{key}' of {op}() in '{text}'; known: {known}")
    kind = kinds[key]
    if kind.endswith("s"):  # a list [v, v, ...]
        if pos >= len(tokens) or tokens[pos][1] != "[":
            raise CompositionError(f"{op}(): {key} takes a list like [1, 2] in '{text}'")
        values, pos = [], pos + 1
        while pos < len(tokens) and tokens[pos][1] != "]":
            if tokens[pos][1] == ",":
                pos += 1
                continue
            values.append(_scalar(op, key, kind[:-1], tokens[pos][1], text))
            pos += 1
        if pos >= len(tokens):
            raise CompositionError(f"missing ']' in composition '{text}'")
        return values, pos + 1
    if pos >= len(tokens) or tokens[pos][0] != "name":
        raise CompositionError(f"{op}(): {key}= needs a value in '{text}'")
    return _scalar(op, key, kind, tokens[pos][1], text), pos + 1


def _scalar(op: str, key: str, kind: str, raw: str, text: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise CompositionError(f"{op}(): {key} expects {kind} values, got '{raw}' in '{text}'") from None
    return raw
