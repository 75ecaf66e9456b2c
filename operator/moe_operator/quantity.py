"""Kubernetes resource quantities ("500m", "64Gi", "1e3") as numbers."""

from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX: dict[str, Decimal | int] = {
    "": 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_FORM = re.compile(r"^([+-]?[0-9]*\.?[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]i?|Ki)?$")


def parse_quantity(value: str | int | float) -> float:
    """The quantity's value in base units (bytes, cores). Raises ValueError when malformed."""
    if isinstance(value, int | float):
        return float(value)
    match = _FORM.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '16', '500m', '64Gi')")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return float(Decimal(number) * Decimal(10) ** int(suffix[1:]))
    if suffix not in _SUFFIX:
        raise ValueError(f"{value!r} has an unknown suffix {suffix!r}")
    return float(Decimal(number) * Decimal(str(_SUFFIX[suffix])))
