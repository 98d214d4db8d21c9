"""The part of CEL that the Telemetry API's expressions need: attribute references, literals,
comparisons and boolean logic.

Istio's ``Telemetry`` resource takes CEL in two places: a metric tag override's ``value``
(``request.headers['x-user']``, ``request.host``, ``'literal'``) and an access log
``filter.expression`` (``response.code >= 400``).  raymesh evaluates this subset:

* literals: ``'text'`` or ``"text"``, integers, ``true``, ``false``;
* attributes, in Envoy's vocabulary: ``request.headers['name']``, ``request.host``,
  ``request.method``, ``request.path``, ``request.url_path``, ``request.scheme``,
  ``request.useragent``, ``request.id``, ``request.protocol``, ``response.code``;
* ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``&&``, ``||``, ``!`` and parentheses.

Anything else (function calls, arithmetic, ternaries, maps) raises ``ExpressionError`` at
parse time, so that Galley rejects it instead of a proxy ignoring it.  A tag value may name
an attribute raymesh does not know (``filter_state['x']``): Istio's stats filter writes
``unknown`` for a tag whose expression cannot be evaluated, and so does raymesh.

Pure and small: Galley validates with it, the proxy evaluates access log filters with it,
and Mixer evaluates tag values with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

__all__ = ["Attribute", "Literal", "Compare", "Not", "BoolOp", "Expr", "ExpressionError", "parse",
           "parse_value", "parse_filter", "evaluate", "KNOWN_ATTRIBUTES", "REQUEST_ATTRIBUTES"]

# Attributes whose value lives on the request (the proxy captures them per request when a
# tag needs them); the header map is keyed: ``request.headers['name']``.
REQUEST_ATTRIBUTES = frozenset({"request.headers", "request.host", "request.method", "request.path",
                                "request.url_path", "request.scheme", "request.useragent", "request.id"})
KNOWN_ATTRIBUTES = REQUEST_ATTRIBUTES | {"request.protocol", "response.code"}


class ExpressionError(ValueError):
    """An expression outside the supported subset, or malformed."""


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str               # "request.headers", "response.code", ...
    key: str | None = None  # the header name for request.headers['...'], lower-cased

    def __str__(self) -> str:
        return f"{self.name}['{self.key}']" if self.key is not None else self.name

    @property
    def known(self) -> bool:
        return self.name in KNOWN_ATTRIBUTES and ((self.key is not None) == (self.name == "request.headers"))


@dataclass(frozen=True, slots=True)
class Literal:
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True, slots=True)
class Not:
    operand: "Expr"


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str                 # "&&" | "||"
    operands: tuple["Expr", ...]


Expr = Union[Attribute, Literal, Compare, Not, BoolOp]

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<int>-?\d+)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!().\[\]])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<bad>\S)
)""", re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind is None:
            continue
        if kind == "bad":
            raise ExpressionError(f"unsupported character {m.group(kind)!r} in expression {text!r}")
        out.append((kind, m.group(kind)))
    if not out:
        raise ExpressionError("empty expression")
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ExpressionError(f"expected {value or 'more'} in expression {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Expr:
        expr = self.or_()
        if self.peek() is not None:
            raise ExpressionError(f"unsupported syntax at {self.peek()[1]!r} in expression {self.text!r}"  # type: ignore[index]
                                  " (raymesh evaluates literals, attributes, comparisons, &&, || and !)")
        return expr

    def or_(self) -> Expr:
        parts = [self.and_()]
        while self.peek() == ("op", "||"):
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else BoolOp("||", tuple(parts))

    def and_(self) -> Expr:
        parts = [self.unary()]
        while self.peek() == ("op", "&&"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else BoolOp("&&", tuple(parts))

    def unary(self) -> Expr:
        if self.peek() == ("op", "!"):
            self.take()
            return Not(self.unary())
        left = self.primary()
        tok = self.peek()
        if tok is not None and tok[1] in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            return Compare(tok[1], left, self.primary())
        return left

    def primary(self) -> Expr:
        kind, value = self.take()
        if kind == "str":
            return Literal(_unquote(value))
        if kind == "int":
            return Literal(int(value))
        if value == "(":
            inner = self.or_()
            self.take(")")
            return inner
        if kind == "ident":
            if value in ("true", "false"):
                return Literal(value == "true")
            parts = [value]
            while self.peek() == ("op", "."):
                self.take()
                kind, ident = self.take()
                if kind != "ident":
                    raise ExpressionError(f"expected a name after '.' in expression {self.text!r}")
                parts.append(ident)
            if self.peek() == ("op", "("):
                raise ExpressionError(f"function calls are not supported: {'.'.join(parts)}(...) in {self.text!r}")
            key = None
            if self.peek() == ("op", "["):
                self.take()
                kind, raw = self.take()
                if kind != "str":
                    raise ExpressionError(f"a map key must be a string literal in expression {self.text!r}")
                self.take("]")
                key = _unquote(raw).lower()
            return Attribute(".".join(parts), key)
        raise ExpressionError(f"unexpected {value!r} in expression {self.text!r}")


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def parse(text: str) -> Expr:
    """The expression tree of ``text``; raises ExpressionError outside the supported subset."""
    return _Parser(str(text)).parse()


def parse_value(text: str) -> Attribute | Literal:
    """A tag override's ``value``: one literal or one attribute reference."""
    expr = parse(text)
    if not isinstance(expr, (Attribute, Literal)):
        raise ExpressionError(f"tag value {text!r}: raymesh supports a string literal or one attribute "
                              "(request.headers['name'], request.host, request.method, ...), not an operator expression")
    return expr


def parse_filter(text: str) -> Expr:
    """An access log filter: every attribute it names must be one raymesh knows."""
    expr = parse(text)
    unknown = [str(a) for a in _attributes(expr) if not a.known]
    if unknown:
        raise ExpressionError(f"filter {text!r}: unknown attribute(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(KNOWN_ATTRIBUTES))}")
    return expr


def _attributes(expr: Expr) -> list[Attribute]:
    if isinstance(expr, Attribute):
        return [expr]
    if isinstance(expr, Compare):
        return _attributes(expr.left) + _attributes(expr.right)
    if isinstance(expr, Not):
        return _attributes(expr.operand)
    if isinstance(expr, BoolOp):
        return [a for e in expr.operands for a in _attributes(e)]
    return []


Resolver = Callable[[Attribute], "str | int | None"]


def evaluate(expr: Expr, resolve: Resolver) -> str | int | bool | None:
    """The value of ``expr``; ``resolve`` gives an attribute's value (None: absent).

    As in CEL, comparing an absent attribute is an error; here it is simply false, so a
    filter on a missing header does not log.
    """
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Attribute):
        return resolve(expr)
    if isinstance(expr, Not):
        return not _truthy(evaluate(expr.operand, resolve))
    if isinstance(expr, BoolOp):
        if expr.op == "&&":
            return all(_truthy(evaluate(e, resolve)) for e in expr.operands)
        return any(_truthy(evaluate(e, resolve)) for e in expr.operands)
    left, right = evaluate(expr.left, resolve), evaluate(expr.right, resolve)
    if left is None or right is None:
        return False
    if isinstance(left, int) != isinstance(right, int):
        return False if expr.op != "!=" else True
    return _COMPARE[expr.op](left, right)


def _truthy(value: object) -> bool:
    return value is True


_COMPARE: dict[str, Callable[[object, object], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,  # type: ignore[operator]
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,  # type: ignore[operator]
}
