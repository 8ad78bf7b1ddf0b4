"""Predicates: the small condition language of routing rules (`when`, `sample.while`).

Where this sits on the data path: step 4 — the router tests each record's values against the
`when` of the policy's rules in order (first match wins), and a sampler's `while` decides whether
sampling applies. `config.policy` parses the text once when the policy loads; the router calls
the compiled `Predicate` for every record.

The grammar (parsed here by hand into an AST; nothing is ever ``eval``-ed)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | comparison
    comparison := NAME OP literal          OP: <  <=  ==  !=  >=  >
    literal    := number | 'string' | "string" | true | false

A NAME is a value name (a letter, then letters, digits and ``_ . : / -``). Numbers compare with
numbers (int or float), strings and booleans only with ``==``/``!=``. Evaluation never raises:
a value missing from a record makes its comparison false, and so does a value of another type
than the literal (a number compared with a string, a bool with a number) — for ``!=`` too, so
``not (x == 'a')`` is how to say "x is anything but 'a', or missing".
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

#: The comparison operators, in the order error messages list them.
OPS = ("<", "<=", "==", "!=", ">=", ">")
_OP_FUNCS = {
    "<": operator.lt, "<=": operator.le, "==": operator.eq,
    "!=": operator.ne, ">=": operator.ge, ">": operator.gt,
}
KEYWORDS = ("and", "or", "not", "true", "false")
#: Deeper nesting than this is refused (a policy is written by people; this stops runaway input).
MAX_DEPTH = 32
MAX_LENGTH = 2000

Literal = float | int | str | bool


class PredicateError(ValueError):
    """The text is not a valid predicate; the message says what, where, and how to fix it."""


@attrs.frozen
class Compare:
    """``name op value``: true when the record has a value ``name`` of the literal's type
    (int and float are both numbers) and the comparison holds."""

    name: str
    op: str
    value: Literal

    def __str__(self) -> str:
        return f"{self.name} {self.op} {format_literal(self.value)}"


@attrs.frozen
class Not:
    """True when ``operand`` is false (including when its value is missing)."""

    operand: Node

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"not ({inner})" if isinstance(self.operand, And | Or) else f"not {inner}"


@attrs.frozen
class And:
    """True when every operand is (two or more operands, none of them an `And`)."""

    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " and ".join(f"({o})" if isinstance(o, Or) else str(o) for o in self.operands)


@attrs.frozen
class Or:
    """True when any operand is (two or more operands, none of them an `Or`)."""

    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " or ".join(str(o) for o in self.operands)


Node = Compare | Not | And | Or


def format_literal(value: Literal) -> str:
    """A literal as the grammar writes it (``true``, ``-4.4``, ``'text'``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if "'" in value else f"'{value}'"
    return repr(value)


# ---- tokenizer --------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z0-9_.:/])
  | (?P<name>[A-Za-z][A-Za-z0-9_.:/\-]*)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<op>[<>=!~&|]+)
  | (?P<paren>[()])
    """,
    re.VERBOSE,
)


@attrs.frozen
class _Token:
    kind: str  # number | name | string | op | paren | keyword | end
    text: str
    col: int  # 1-based column in the text


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "'\"":
                raise PredicateError(
                    f"unterminated string starting at column {pos + 1} in {text!r} "
                    f"(close it with {ch})"
                )
            raise PredicateError(f"unexpected character {ch!r} at column {pos + 1} in {text!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            word = m.group()
            if kind == "name" and word in KEYWORDS:
                kind = "keyword"
            if kind == "op" and word not in _OP_FUNCS:
                raise PredicateError(f"unknown operator {word!r} in {text!r} ({_op_hint(word)})")
            tokens.append(_Token(kind, word, pos + 1))
        pos = m.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


def _op_hint(word: str) -> str:
    if word == "=":
        return "use == to compare"
    if word in ("&&", "&", "||", "|"):
        return "combine comparisons with and, or, not"
    if word == "!":
        return "negate with not"
    return "use " + ", ".join(OPS)


# ---- parser -----------------------------------------------------------------------------------

class _Parser:
    """Recursive descent over the tokens; one method per grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def fail(self, problem: str) -> PredicateError:
        return PredicateError(f"{problem} in {self.text!r}")

    def at(self, token: _Token) -> str:
        return "at the end" if token.kind == "end" else f"{token.text!r} at column {token.col}"

    def parse(self) -> Node:
        node = self.expr()
        token = self.peek()
        if token.kind != "end":
            if token.text == ")":
                raise self.fail(f"unexpected ')' at column {token.col} (no '(' to close)")
            raise self.fail(f"expected and/or before {self.at(token)}")
        return node

    def expr(self) -> Node:
        operands = [self.and_expr()]
        while self.peek().text == "or" and self.peek().kind == "keyword":
            self.take()
            operands.append(self.and_expr())
        return _join(Or, operands)

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.peek().text == "and" and self.peek().kind == "keyword":
            self.take()
            operands.append(self.not_expr())
        return _join(And, operands)

    def not_expr(self) -> Node:
        token = self.peek()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
        try:
            if token.kind == "keyword" and token.text == "not":
                self.take()
                return Not(self.not_expr())
            if token.text == "(":
                self.take()
                node = self.expr()
                close = self.take()
                if close.text != ")":
                    raise self.fail(f"missing ')' for the '(' at column {token.col}")
                return node
            return self.comparison()
        finally:
            self.depth -= 1

    def comparison(self) -> Node:
        name = self.take()
        if name.kind != "name":
            raise self.fail(self._not_a_name(name))
        op = self.take()
        if op.kind != "op":
            raise self.fail(
                f"expected an operator after {name.text!r}, got {self.at(op)} "
                f"(use {', '.join(OPS)})"
            )
        value = self.literal(name, op)
        if isinstance(value, bool | str) and op.text not in ("==", "!="):
            shown = format_literal(value)
            raise self.fail(f"{op.text!r} cannot compare with {shown} (use == or !=)")
        return Compare(name.text, op.text, value)

    def literal(self, name: _Token, op: _Token) -> Literal:
        token = self.take()
        if token.kind == "number":
            text = token.text
            return float(text) if any(c in text for c in ".eE") else int(text)
        if token.kind == "string":
            return token.text[1:-1]
        if token.kind == "keyword" and token.text in ("true", "false"):
            return token.text == "true"
        if token.kind == "name":
            hint = " (literals are lower case: true, false)" if token.text.lower() in (
                "true", "false") else ""
            raise self.fail(
                f"{token.text!r} is a value name: compare {name.text!r} with a number, a quoted "
                f"string or true/false{hint}"
            )
        raise self.fail(
            f"expected a number, a quoted string or true/false after "
            f"'{name.text} {op.text}', got {self.at(token)}"
        )

    def _not_a_name(self, token: _Token) -> str:
        if token.kind == "end":
            return "expected a comparison at the end (the condition is incomplete)"
        if token.kind in ("number", "string") or token.text in ("true", "false"):
            return (f"expected a value name at column {token.col}, got the literal "
                    f"{token.text} (write the value name first, e.g. 'ax < -4.4')")
        return f"expected a comparison like 'ax < -4.4', got {self.at(token)}"


def _join(cls: type[And] | type[Or], operands: list[Node]) -> Node:
    if len(operands) == 1:
        return operands[0]
    flat: list[Node] = []
    for o in operands:  # (a and b) and c is a and b and c
        flat.extend(o.operands if isinstance(o, cls) else (o,))
    return cls(tuple(flat))


def parse_node(text: str) -> Node:
    """Parse predicate text into its AST. Raises PredicateError saying what and where."""
    if not isinstance(text, str):
        raise PredicateError(f"expected a string like 'ax < -4.4' (got {text!r})")
    if not text.strip():
        raise PredicateError("is empty (write a condition like 'ax < -4.4')")
    if len(text) > MAX_LENGTH:
        raise PredicateError(f"is longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()


# ---- evaluation -------------------------------------------------------------------------------

Values = Mapping[str, Any]
Test = Callable[[Values], bool]


def _compile(node: Node) -> Test:
    """A closure per node: no interpretation per record, no eval."""
    if isinstance(node, Compare):
        name, lit, fn = node.name, node.value, _OP_FUNCS[node.op]
        if isinstance(lit, bool):
            return lambda v: type(x := v.get(name)) is bool and fn(x, lit)
        if isinstance(lit, str):
            return lambda v: type(x := v.get(name)) is str and fn(x, lit)
        return lambda v: ((t := type(x := v.get(name))) is float or t is int) and fn(x, lit)
    if isinstance(node, Not):
        inner = _compile(node.operand)
        return lambda v: not inner(v)
    # n-ary and/or as a chain of two-operand closures (cheaper than all()/any() over a
    # generator), short-circuiting left to right
    parts = [_compile(o) for o in node.operands]
    test = parts.pop()
    while parts:
        test = _both(parts.pop(), test) if isinstance(node, And) else _either(parts.pop(), test)
    return test


def _both(a: Test, b: Test) -> Test:
    return lambda v: a(v) and b(v)


def _either(a: Test, b: Test) -> Test:
    return lambda v: a(v) or b(v)


def _names(node: Node) -> frozenset[str]:
    if isinstance(node, Compare):
        return frozenset((node.name,))
    if isinstance(node, Not):
        return _names(node.operand)
    return frozenset().union(*(_names(o) for o in node.operands))


@attrs.frozen
class Predicate:
    """A parsed, compiled condition over a record's values. Call it with the values mapping.

    ``node`` is the AST; ``str(predicate)`` is its canonical text (parses back to the same
    AST). Two predicates are equal when their ASTs are.
    """

    node: Node
    _test: Test = attrs.field(eq=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Predicate:
        """Parse and compile. Raises PredicateError."""
        return cls.from_node(parse_node(text))

    @classmethod
    def from_node(cls, node: Node) -> Predicate:
        return cls(node, _compile(node))

    def __call__(self, values: Values) -> bool:
        return self._test(values)

    def __str__(self) -> str:
        return str(self.node)

    @property
    def names(self) -> frozenset[str]:
        """The value names the predicate reads."""
        return _names(self.node)

    def explain(self, values: Values) -> str:
        """The predicate with each comparison's value and outcome, e.g.
        ``ax < -4.4 [ax=-5.1: true] -> true``."""
        return f"{_explain(self.node, values)} -> {'true' if self(values) else 'false'}"


def _explain(node: Node, values: Values) -> str:
    if isinstance(node, Compare):
        outcome = "true" if _compile(node)(values) else "false"
        if node.name not in values:
            return f"{node} [{node.name} missing: false]"
        actual = values[node.name]
        shown = format_literal(actual) if isinstance(actual, str | bool) else repr(actual)
        note = "" if _kind(actual) == _kind(node.value) else f", not a {_kind(node.value)}"
        return f"{node} [{node.name}={shown}{note}: {outcome}]"
    if isinstance(node, Not):
        inner = _explain(node.operand, values)
        return f"not ({inner})"
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(_explain(o, values) for o in node.operands) + ")"


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "number"
