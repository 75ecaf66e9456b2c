"""CEL as the API server evaluates `x-kubernetes-validations`, for the Python side of a rule.

A cross-field rule is written once, in CEL (api.Rule): the CRD carries the expression and the
models evaluate the very same expression here, with cel-python, on the wire form of the object
(camelCase, defaults applied, unset optionals absent: what the API server evaluates after
defaulting and pruning). So `kubectl apply` and the operator cannot disagree about a rule.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import celpy


@functools.cache
def _program(expression: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def holds(expression: str, value: Any) -> bool:
    """Whether the CEL `expression` is true with `self` bound to the JSON `value`.

    An evaluation error (e.g. a missing field) counts as false: the API server refuses the
    object then too. Verdicts are remembered by value (cel-python takes about a millisecond an
    evaluation, and the same spec is validated again on every reconcile)."""
    return _holds(expression, json.dumps(value, sort_keys=True))


@functools.lru_cache(maxsize=4096)
def _holds(expression: str, value: str) -> bool:
    try:
        result = _program(expression).evaluate({"self": celpy.json_to_cel(json.loads(value))})
    except celpy.CELEvalError:
        return False
    if isinstance(result, celpy.CELEvalError):
        return False
    return bool(result)
