"""Predicates: parsed by hand into an AST, evaluated without ever raising; a missing value or a
value of another type makes a comparison false."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.router.predicates import (
    MAX_DEPTH,
    OPS,
    And,
    Compare,
    Not,
    Or,
    Predicate,
    PredicateError,
    parse_node,
)

# ---- a reference evaluator: the semantics written out plainly -----------------------------------


def kind_of(value):
    if isinstance(value, bool):
        return "bool"
    return "str" if isinstance(value, str) else "number"


def reference(node, values) -> bool:
    if isinstance(node, Compare):
        if node.name not in values or kind_of(values[node.name]) != kind_of(node.value):
            return False
        a, b = values[node.name], node.value
        return {"<": a < b, "<=": a <= b, "==": a == b, "!=": a != b, ">=": a >= b,
                ">": a > b}[node.op]
    if isinstance(node, Not):
        return not reference(node.operand, values)
    results = [reference(o, values) for o in node.operands]
    return all(results) if isinstance(node, And) else any(results)


NAMES = ["ax", "speed_kmh", "fix", "x.y", "c-d", "state"]
numbers = st.one_of(st.integers(-5, 5), st.sampled_from([-4.4, 0.0, -0.0, 0.5, 1e-05, 1e16, 105.0]),
                    st.floats(-10, 10, allow_nan=False))
texts = st.sampled_from(["on", "off", "x y", "it's", ""])
value_strategy = st.one_of(numbers, texts, st.booleans())


@st.composite
def comparisons(draw):
    name = draw(st.sampled_from(NAMES))
    literal = draw(value_strategy)
    ops = OPS if kind_of(literal) == "number" else ("==", "!=")
    return Compare(name, draw(st.sampled_from(ops)), literal)


def joined(cls, operands):
    flat = []
    for o in operands:
        flat.extend(o.operands if isinstance(o, cls) else (o,))
    return cls(tuple(flat))


nodes = st.recursive(
    comparisons(),
    lambda children: st.one_of(
        st.builds(Not, children),
        st.lists(children, min_size=2, max_size=3).map(lambda ops: joined(And, ops)),
        st.lists(children, min_size=2, max_size=3).map(lambda ops: joined(Or, ops)),
    ),
    max_leaves=8,
)
records = st.dictionaries(st.sampled_from(NAMES), value_strategy, max_size=len(NAMES))


@given(nodes, records)
def test_compiled_predicate_agrees_with_the_reference_semantics(node, values):
    assert Predicate.from_node(node)(values) == reference(node, values)


@given(nodes)
def test_canonical_text_parses_back_to_the_same_ast(node):
    text = str(node)
    assert parse_node(text) == node
    assert str(Predicate.parse(text)) == text


@given(nodes, records)
def test_evaluation_never_raises_and_explain_ends_with_the_outcome(node, values):
    predicate = Predicate.from_node(node)
    outcome = predicate(values)
    assert predicate.explain(values).endswith("-> true" if outcome else "-> false")


# ---- semantics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("ax < -4.4", {"ax": -5.1}, True),
        ("ax < -4.4", {"ax": -4.4}, False),
        ("ax <= -4.4", {"ax": -4.4}, True),
        ("fix == 0", {"fix": 0}, True),
        ("fix == 0", {"fix": 0.0}, True),  # int and float are both numbers
        ("fix == 0", {"fix": False}, False),  # a bool is not a number
        ("fix == 0", {}, False),  # missing: false
        ("fix != 0", {}, False),  # missing: false, for != too
        ("not fix == 0", {}, True),
        ("fix != 0", {"fix": "lost"}, False),  # another type: false, never an exception
        ("ax < 3", {"ax": "3"}, False),
        ("state == 'on'", {"state": "on"}, True),
        ('state != "on"', {"state": "off"}, True),
        ("moving == true", {"moving": True}, True),
        ("moving == true", {"moving": 1}, False),
        ("coolant_c > 105 and rpm > 500", {"coolant_c": 106, "rpm": 900}, True),
        ("coolant_c > 105 and rpm > 500", {"coolant_c": 106}, False),
        ("ax < -4 or ax > 4", {"ax": 5}, True),
        ("a == 1 or b == 1 and c == 1", {"a": 1}, True),  # and binds tighter than or
        ("(a == 1 or b == 1) and c == 1", {"a": 1}, False),
        ("not a == 1 and b == 1", {"b": 1}, True),  # not binds tightest
        ("ax<-4.4", {"ax": -5}, True),  # no spaces needed
        ("x.y >= 1e3", {"x.y": 1000}, True),
    ],
)
def test_comparison_semantics(text, values, expected):
    assert Predicate.parse(text)(values) is expected


def test_and_or_chains_are_flattened_and_names_collected():
    node = parse_node("(a < 1 and b < 2) and (c < 3 and not d == 'x')")
    assert isinstance(node, And) and len(node.operands) == 4
    assert Predicate.parse("a < 1 or (b < 2 or c < 3)").node == Or(
        (Compare("a", "<", 1), Compare("b", "<", 2), Compare("c", "<", 3)))
    assert Predicate.parse("a < 1 or not b == true").names == {"a", "b"}


def test_explain_shows_each_value_and_outcome():
    p = Predicate.parse("ax < -4.4 and fix == 0")
    text = p.explain({"ax": -5.1, "fix": "lost"})
    assert text == ("(ax < -4.4 [ax=-5.1: true] and fix == 0 [fix='lost', not a number: false])"
                    " -> false")
    assert "[ax missing: false]" in p.explain({})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ax => 3", "unknown operator '=>' in 'ax => 3' (use <, <=, ==, !=, >=, >)"),
        ("fix = 0", "unknown operator '=' in 'fix = 0' (use == to compare)"),
        ("a < 1 || b < 2", "unknown operator '||' in 'a < 1 || b < 2' (combine comparisons "
                           "with and, or, not)"),
        ("! a == 1", "(negate with not)"),
        ("ax < ", "expected a number, a quoted string or true/false after 'ax <', got at the end"),
        ("ax 3", "expected an operator after 'ax', got '3' at column 4"),
        ("ax < ay", "'ay' is a value name: compare 'ax' with a number, a quoted string or "
                    "true/false"),
        ("flag == True", "(literals are lower case: true, false)"),
        ("-4.4 > ax", "expected a value name at column 1, got the literal -4.4 (write the value "
                      "name first"),
        ("(ax < 1", "missing ')' for the '(' at column 1"),
        ("ax < 1)", "unexpected ')' at column 7 (no '(' to close)"),
        ("ax < 1 ay > 2", "expected and/or before 'ay' at column 8"),
        ("ax < 1 and", "expected a comparison at the end"),
        ("s == 'open", "unterminated string starting at column 6"),
        ("s < 'a'", "'<' cannot compare with 'a' (use == or !=)"),
        ("ok >= false", "'>=' cannot compare with false (use == or !=)"),
        ("ax < 1 $", "unexpected character '$' at column 8"),
        ("   ", "is empty"),
        ("not " * (MAX_DEPTH + 1) + "a == 1", f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_bad_predicate_error_says_what_and_where(text, message):
    with pytest.raises(PredicateError) as info:
        Predicate.parse(text)
    assert message in str(info.value)


def test_literal_types_follow_their_spelling():
    assert parse_node("a == 4") == Compare("a", "==", 4)
    assert type(parse_node("a == 4").value) is int
    assert type(parse_node("a == 4.0").value) is float
    assert type(parse_node("a == 4e0").value) is float
    assert parse_node("a == -0.5").value == -0.5
