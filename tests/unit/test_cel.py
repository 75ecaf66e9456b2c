"""The CRD's CEL rules and the Python checks agree, on the examples and on generated specs.

The CEL of `x-kubernetes-validations` is evaluated with cel-python (tests/support/k8s_schema.py,
which applies the whole structural schema as kube-apiserver does: pruning, defaults, then rules).
Quantities are also checked against Kubernetes' own parser, ported below from
k8s.io/apimachinery/pkg/api/resource/quantity.go (parseQuantityString + ParseQuantity) and
suffix.go (interpret): every value we accept must be one Kubernetes accepts.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from unit_support import EXAMPLES, KUBERAY_CRDS, ROOT, load

from moe_operator import crdgen
from moe_operator.api import MoEDeployment
from moe_operator.quantity import cel_rule, is_quantity, parse_quantity
from tests.support.k8s_schema import Schema, evaluate_rule, load_crd_schema

CRD_SCHEMA = Schema(crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
GEMMA = load(ROOT / "manifests" / "examples" / "gemma4-26b-a4b-a100-80gb.yaml")


def _crd_rule(*path: str) -> str:
    """The CEL rule the generated CRD carries at spec.<path> (not a copy of the source)."""
    node = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for key in path:
        node = node["properties"][key]
    (rule,) = node["x-kubernetes-validations"]
    return str(rule["rule"])


QUANTITY_RULE = _crd_rule("resources", "memory")


def k8s_parses_quantity(text: str) -> bool:
    """Whether resource.ParseQuantity(text) succeeds (the scanner and suffix table of
    quantity.go / suffix.go; numeric overflow only caps values there, it never fails)."""
    if text == "":
        return False
    pos, end = 0, len(text)
    if text[0] in "+-":
        pos = 1
    while pos < end and text[pos] == "0":
        pos += 1
    if pos >= end:
        return True  # only a sign and zeros: zero
    while pos < end and text[pos].isdigit() and text[pos].isascii():
        pos += 1
    if pos < end and text[pos] == ".":
        pos += 1
        while pos < end and text[pos] in "0123456789":
            pos += 1
    start = pos
    while pos < end and text[pos] in "eEinumkKMGTP":
        pos += 1
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos] in "0123456789":
        pos += 1
    if pos < end:
        return False  # ErrFormatWrong
    suffix = text[start:]
    table = {"", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
    if suffix in table:
        return True
    if len(suffix) > 1 and suffix[0] in "eE":
        return re.fullmatch(r"[+-]?[0-9]+", suffix[1:]) is not None and (
            -(2**63) <= int(suffix[1:]) < 2**63  # strconv.ParseInt(.., 10, 64)
        )
    return False


def test_the_crd_carries_the_declared_quantity_rule() -> None:
    assert cel_rule() == QUANTITY_RULE
    assert _crd_rule("resources", "cpu") == _crd_rule("resources", "sharedMemory") == cel_rule()


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        # issue #13: CEL took these, Python refused them ("mi" / "ki" are no suffixes) ...
        ("5mi", False),
        ("64ki", False),
        # ... and Python took "1.", which CEL refused (Kubernetes takes it: `<digits>.`).
        ("1.", True),
        ("16", True),
        (16, True),
        (0, True),
        ("500m", True),
        ("64Gi", True),
        ("1.5Ti", True),
        (".5", True),
        ("1e3", True),
        ("1E", True),  # exa
        ("+1", True),
        ("-1", False),  # pods refuse negative requests
        (-1, False),
        ("1e1.5", False),
        ("16 ", False),
        ("16\n", False),  # Python's `$` would match before the newline: not used
        ("", False),
        ("Mi", False),
        ("1ki", False),
        (1.5, False),  # int-or-string: no floats
        (True, False),
    ],
)
def test_quantity_rule_agrees_in_cel_and_python(value: Any, valid: bool) -> None:
    """The quantity rule has one declaration (quantity.QUANTITY_REGEX); the CRD's CEL rule and
    the Python check made from it agree, and what they accept Kubernetes parses."""
    assert is_quantity(value) is valid
    if isinstance(value, int | str) and not isinstance(value, bool):
        assert evaluate_rule(QUANTITY_RULE, value) is valid
    if valid and isinstance(value, str):
        assert k8s_parses_quantity(value)
        parse_quantity(value)


QUANTITY_TEXT = st.text(alphabet="0123456789.+-eEinumkKMGTPi \n", max_size=8)


@settings(max_examples=400, deadline=None)
@given(QUANTITY_TEXT | st.integers(min_value=-(2**40), max_value=2**40))
def test_generated_quantities_agree(value: str | int) -> None:
    python = is_quantity(value)
    assert evaluate_rule(QUANTITY_RULE, value) is python, value
    if python and isinstance(value, str):
        assert k8s_parses_quantity(value), value
        assert parse_quantity(value) >= 0


def test_accepted_quantities_match_kuberays_quantity_pattern() -> None:
    """KubeRay's CRDs check pod quantities with apimachinery's OpenAPI pattern: ours must pass."""
    path = KUBERAY_CRDS / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (../shared/kuberay-crds)")
    text = str(load_crd_schema(path))
    (pattern,) = set(re.findall(r"'pattern': '(\^\(\\\\\+\|-\)\?[^']*)'", text))
    pattern = pattern.replace("\\\\", "\\")
    for value in ("1.", ".5", "16", "500m", "1.5Ti", "1e3", "1E", "+1", "0.000000001n"):
        assert is_quantity(value)
        assert re.fullmatch(pattern.strip("^$"), value), value


def _verdicts(body: dict[str, Any]) -> tuple[bool, list[str], str]:
    """(the API server accepts, its errors, the Python error text)."""
    _, problems = CRD_SCHEMA.admit(body)
    try:
        MoEDeployment.model_validate(body)
        python = ""
    except ValidationError as err:
        python = str(err)
    return not problems, problems, python


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_both(path: Any) -> None:
    accepted, problems, python = _verdicts(load(path))
    assert accepted and not python, (problems, python)


SPEC_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.none() | st.integers(-1, 3),
        "autoscaling": st.fixed_dictionaries(
            {},
            optional={
                "enabled": st.booleans(),
                "minReplicas": st.none() | st.integers(-1, 4),
                "maxReplicas": st.integers(0, 4),
                "scaleToZero": st.booleans(),
            },
        ),
        "serving": st.fixed_dictionaries(
            {},
            optional={
                "httpPort": st.sampled_from([8000, 9000, 1023]),
                "grpcPort": st.sampled_from([8000, 9000]),
            },
        ),
        "tracing": st.fixed_dictionaries(
            {},
            optional={
                "enabled": st.booleans(),
                "endpoint": st.none() | st.sampled_from(["http://otel:4317", "otel:4317"]),
            },
        ),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "cpu": QUANTITY_TEXT | st.integers(-2, 64) | st.none() | st.floats(0, 4),
                "memory": st.sampled_from(["64Gi", "64ki", "5mi", "1.", "1e3", "-1"]),
            },
        ),
        "parallelism": st.fixed_dictionaries(
            {},
            optional={
                "tensorParallelSize": st.sampled_from([1, 2, 0, -1, "auto", "Auto", "2"]),
            },
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPEC_CHANGES)
def test_generated_specs_get_the_same_verdict(changes: dict[str, Any]) -> None:
    """Whatever kubectl apply accepts (schema + CEL after defaulting), the operator's models
    accept, and the reverse; a failed cross-field rule says the same thing on both sides."""
    body = copy.deepcopy(GEMMA)
    for section, value in changes.items():
        if isinstance(value, dict):
            body["spec"][section] = {**body["spec"].get(section, {}), **value}
        else:
            body["spec"][section] = value
    accepted, problems, python = _verdicts(body)
    assert accepted is (python == ""), (changes, problems, python)
    for problem in problems:
        if "Invalid value" in problem and '"object"' in problem:  # a rule on an object
            message = problem.split('"object": ', 1)[1]
            assert message in python, (problem, python)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1Ei", 2.0**60), ("2E", 2e18), ("1e3", 1e3), ("3E-2", 0.03), ("64Gi", 64 * 2.0**30)],
)
def test_exa_suffixes_are_not_exponents(text: str, value: float) -> None:
    """`E` / `Ei` are suffixes (quantity.go); an `e`/`E` followed by digits is an exponent.
    hypothesis found "1Ei" read as the exponent "Ei"."""
    from moe_operator.quantity import parse_quantity

    assert parse_quantity(text) == pytest.approx(value)
