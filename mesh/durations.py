"""Istio duration strings ("1.5s", "100ms", "2m", "1h30m") as float seconds.

Istio's CRDs type durations as ``google.protobuf.Duration`` but accept them the way Go's
``time.ParseDuration`` does: a signed sequence of decimal numbers, each with a unit
(``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``), or the bare string ``"0"``.  The
protobuf JSON form (``"1.500s"``) is a special case of that grammar.  Numbers without a
unit are rejected, as Istio rejects them, so ``timeout: 5`` is an error rather than a
silent guess between seconds and milliseconds.
"""
from __future__ import annotations

import re
from fractions import Fraction

_UNITS: dict[str, Fraction] = {
    "ns": Fraction(1, 1_000_000_000),
    "us": Fraction(1, 1_000_000),
    "µs": Fraction(1, 1_000_000),   # U+00B5 micro sign
    "μs": Fraction(1, 1_000_000),   # U+03BC Greek mu, both accepted by Go
    "ms": Fraction(1, 1_000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
# Longer units first so "ms" is not read as minutes followed by a stray "s".
_COMPONENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """The text is not a duration Istio would accept."""


def parse_duration(text: object) -> float:
    """Seconds represented by an Istio duration string; raises DurationError otherwise."""
    return float(parse_duration_exact(text))


def parse_duration_exact(text: object) -> Fraction:
    """Like ``parse_duration`` but exact, so validation can check precision ("1.0001s") without rounding."""
    if not isinstance(text, str):
        raise DurationError(f"duration must be a string such as '1.5s', got {text!r}")
    s = text.strip()
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return Fraction(0)
    if not s:
        raise DurationError(f"invalid duration {text!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(s):
        m = _COMPONENT.match(s, pos)
        if m is None:
            raise DurationError(f"invalid duration {text!r}: expected a number and a unit "
                                f"(ns, us, ms, s, m, h) at {s[pos:]!r}")
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total
