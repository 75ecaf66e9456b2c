"""Kubernetes resource quantities ("500m", "64Gi", "1e3"): the one rule and their value.

The rule is declared once, here, as a regular expression; the CRD's CEL rule (`cel_rule`) and
the Python check (`is_quantity`) are both made from it, so `kubectl apply` and the operator
accept exactly the same values (tests/unit/test_cel.py evaluates the CRD's CEL to prove it).

It is the quantity grammar of Kubernetes (k8s.io/apimachinery/pkg/api/resource/quantity.go:
`<signedNumber><suffix>`, suffix `Ki..Ei`, `n u m "" k M G T P E` or `e<exponent>`), narrowed to
what a pod's requests and limits take: no negative sign (pod validation refuses negative
amounts) and an exponent of at most three digits (ParseQuantity wraps larger ones). Every value
it accepts parses with ParseQuantity and matches the Quantity pattern in KubeRay's CRDs.

The expression uses only syntax that Python's `re` and RE2 (CEL's `matches`) read alike: ASCII
classes, no `\\d`/`\\w`/`\\s` (Unicode in Python), and no `$` in Python (it also matches before a
final newline there): Python uses `re.fullmatch`, CEL the anchored form.
"""

from __future__ import annotations

import re
from decimal import Decimal

#: The unanchored quantity expression (number, then an optional suffix).
QUANTITY_REGEX = r"[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]{1,3}|[KMGTPE]i|[numkMGTPE])?"
QUANTITY_EXAMPLES = "'16', '500m', '64Gi' or '1.5Ti'"
QUANTITY_MESSAGE = (
    f"must be a non-negative Kubernetes quantity such as {QUANTITY_EXAMPLES} "
    "(suffixes: m, k, M, G, T, Ki, Mi, Gi, Ti, ...; no spaces)"
)

_COMPILED = re.compile(QUANTITY_REGEX)

#: Multipliers of the suffixes: decimal SI (n .. E) and binary (Ki .. Ei).
_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1),
    **{s: Decimal(10) ** e for s, e in zip("num", (-9, -6, -3), strict=True)},
    **{s: Decimal(10) ** (3 * i) for i, s in enumerate("kMGTPE", start=1)},
    **{f"{s}i": Decimal(2) ** (10 * i) for i, s in enumerate("KMGTPE", start=1)},
}


def cel_rule() -> str:
    """The CRD's CEL rule for an int-or-string quantity field (`self` is the field)."""
    return f"type(self) == int ? self >= 0 : self.matches('^{QUANTITY_REGEX}$')"


def is_quantity(value: object) -> bool:
    """The same rule in Python, on a JSON value (int-or-string; booleans are not ints here)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and _COMPILED.fullmatch(value) is not None


def parse_quantity(value: str | int | float) -> float:
    """The quantity's value in base units (bytes, cores). Raises ValueError when malformed."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not is_quantity(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. {QUANTITY_EXAMPLES}")
    match = _COMPILED.fullmatch(str(value))
    assert match is not None
    number = Decimal(match.group(1))
    suffix = match.group(3) or ""
    if suffix not in _SUFFIX:  # an exponent ("e3", "E-2"); "E" and "Ei" are suffixes
        return float(number * Decimal(10) ** int(suffix[1:]))
    return float(number * _SUFFIX[suffix])
