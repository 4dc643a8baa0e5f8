"""Composition expressions: which modules are active, and how they combine.

The same expression serves training, inference, saving and the CLI. Its textual form is what
`--compose` takes::

    sentiment                      one module
    stack(en, ner)                 sequential: `en` then `ner` at every site (MAD-X)

`Stack` applies its children in order at each site: function units (adapters) transform the
output one after the other; parameter units (LoRA) add their deltas, where order does not matter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class CompositionError(ValueError):
    """An expression that does not parse or names modules that do not exist."""


@dataclass(frozen=True)
class Composition:
    """Base of composition expressions."""

    def names(self) -> list[str]:
        """Module names in application order (each once)."""
        raise NotImplementedError

    def __str__(self) -> str:  # the textual form, parseable by `parse`
        raise NotImplementedError


@dataclass(frozen=True)
class Single(Composition):
    """One module by name."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, init=False)
class Stack(Composition):
    """Sequential composition: children applied in order (e.g. language module, then task module)."""

    children: tuple[Composition, ...]

    def __init__(self, *children: Composition | str) -> None:
        if len(children) < 1:
            raise CompositionError("stack() needs at least one module")
        object.__setattr__(self, "children", tuple(as_composition(c) for c in children))

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for child in self.children:
            for name in child.names():
                if name in seen:
                    raise CompositionError(f"module '{name}' appears twice in {self}")
                seen[name] = None
        return list(seen)

    def __str__(self) -> str:
        return f"stack({', '.join(str(c) for c in self.children)})"


_OPERATORS: dict[str, type[Composition]] = {"stack": Stack}
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z0-9_\-.]+)|(?P<sym>[(),]))")


def as_composition(value: Composition | str) -> Composition:
    """A composition from an expression object, a module name or an expression string."""
    if isinstance(value, Composition):
        return value
    return parse(value)


def parse(text: str) -> Composition:
    """Parse the textual form, e.g. "stack(en, ner)" or "sentiment".

    Raises:
        CompositionError: the text does not parse; the message shows where.
    """
    tokens = _tokenize(text)
    expr, pos = _parse_expr(tokens, 0, text)
    if pos != len(tokens):
        raise CompositionError(f"unexpected '{tokens[pos][1]}' in composition '{text}'")
    return expr


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
        pos += 1
        while True:
            child, pos = _parse_expr(tokens, pos, text)
            children.append(child)
            if pos >= len(tokens):
                raise CompositionError(f"missing ')' in composition '{text}'")
            if tokens[pos][1] == ")":
                return op(*children), pos + 1
            if tokens[pos][1] != ",":
                raise CompositionError(f"expected ',' or ')' after '{child}' in composition '{text}'")
            pos += 1
    return Single(name), pos
