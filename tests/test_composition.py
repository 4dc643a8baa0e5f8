"""Composition expressions: parsing, the textual form and its round trip, and errors."""

from __future__ import annotations

import pytest

from modfit import Composition, CompositionError, Single, Stack, parse
from modfit.composition import as_composition


@pytest.mark.parametrize(
    ("text", "expected", "names"),
    [
        ("sst", Single("sst"), ["sst"]),
        ("  sst-2  ", Single("sst-2"), ["sst-2"]),
        ("en_ner", Single("en_ner"), ["en_ner"]),
        ("stack(en, ner)", Stack("en", "ner"), ["en", "ner"]),
        ("stack(en,ner)", Stack("en", "ner"), ["en", "ner"]),
        ("STACK( en ,\tner )", Stack("en", "ner"), ["en", "ner"]),
        ("stack(a)", Stack("a"), ["a"]),
        ("stack(a, stack(b, c), d)", Stack("a", Stack("b", "c"), "d"), ["a", "b", "c", "d"]),
        ("stack", Single("stack"), ["stack"]),  # a module may be called "stack"
    ],
)
def test_parse(text: str, expected: Composition, names: list[str]) -> None:
    parsed = parse(text)
    assert parsed == expected
    assert parsed.names() == names


@pytest.mark.parametrize(
    "expr",
    [Single("a"), Stack("a", "b"), Stack("lang", Stack("task", "x")), Stack(Single("a"))],
)
def test_str_round_trip(expr: Composition) -> None:
    assert parse(str(expr)) == expr
    assert str(parse(str(expr))) == str(expr)


def test_textual_form() -> None:
    assert str(parse(" STACK(a ,  b) ")) == "stack(a, b)"
    assert str(Stack("a", Stack("b", "c"))) == "stack(a, stack(b, c))"
    assert str(Single("x")) == "x"


def test_stack_arguments() -> None:
    assert Stack("a", "stack(b, c)") == Stack("a", Stack("b", "c"))  # strings are parsed
    assert Stack("a", "b").children == (Single("a"), Single("b"))
    with pytest.raises(CompositionError, match="needs at least one module"):
        Stack()
    with pytest.raises(CompositionError, match="module 'a' appears twice in stack\\(a, stack\\(b, a\\)\\)"):
        Stack("a", Stack("b", "a")).names()


def test_expressions_are_values() -> None:
    assert Stack("a", "b") == Stack("a", "b")
    assert Stack("a", "b") != Stack("b", "a")
    assert hash(Stack("a", "b")) == hash(parse("stack(a,b)"))
    assert as_composition(Single("a")) == Single("a")
    assert as_composition("stack(a, b)") == Stack("a", "b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty composition expression"),
        ("   ", "empty composition expression"),
        ("stack(", "expected a module name in composition 'stack\\('"),
        ("stack(a", "missing '\\)' in composition 'stack\\(a'"),
        ("stack(a b)", "expected ',' or '\\)' after 'a'"),
        ("stack(a,,b)", "expected a module name"),
        ("stack(a))", "unexpected '\\)' in composition"),
        ("(a)", "expected a module name"),
        (",a", "expected a module name"),
        ("a,b", "unexpected ','"),
        ("mix(a, b)", "unknown composition 'mix\\(...\\)' in 'mix\\(a, b\\)'; known: stack, fuse, average"),
        ("a + b", "cannot read composition 'a \\+ b' at character"),
        ("stack(a, b!)", "cannot read composition"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        parse(text)


def test_composition_error_is_value_error() -> None:
    assert issubclass(CompositionError, ValueError)
