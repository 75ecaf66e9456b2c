"""The API models: examples are valid, bad input is rejected with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from unit_support import EXAMPLES, load

from moe_operator.api import MoEDeployment, MoEDeploymentSpec
from moe_operator.errors import describe


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Any) -> None:
    dep = MoEDeployment.model_validate(load(path))
    assert dep.spec.model.name
    # Round trip: what we write back is what we read.
    again = MoEDeploymentSpec.model_validate(dep.spec.to_wire())
    assert again == dep.spec


def _errors(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        MoEDeploymentSpec.model_validate(spec)
    return describe(info.value)


BAD_CASES = [
    # (mutation path, value, field path expected in the message, words expected)
    (("model", "source"), "ftp://x/y", "spec.model.source", "unsupported model source"),
    (("model", "dtype"), "int4", "spec.model.dtype", "bfloat16"),
    (("model", "maxModelLen"), 0, "spec.model.maxModelLen", "greater than or equal"),
    (("model", "bogus"), 1, "spec.model.bogus", "unknown field"),
    (("parallelism", "tensorParallelSize"), 0, "spec.parallelism.tensorParallelSize", "positive"),
    (("parallelism", "tensorParallelSize"), "many", "spec.parallelism.tensorParallelSize", "auto"),
    (("parallelism", "all2allBackend"), "mpi", "spec.parallelism.all2allBackend", "naive"),
    (
        ("parallelism", "eplb", "redundantExperts"),
        -1,
        "spec.parallelism.eplb.redundantExperts",
        "greater than or equal",
    ),
    (("resources", "accelerator"), "TPU-v5", "spec.resources.accelerator", "A100-80GB"),
    (("resources", "memory"), "lots", "spec.resources.memory", "Kubernetes quantity"),
    (("resources", "gpusPerNode"), 0, "spec.resources.gpusPerNode", "greater than or equal"),
    (("autoscaling", "minReplicas"), 5, "spec.autoscaling", "must not exceed maxReplicas"),
    (("serving", "grpcPort"), 8000, "spec.serving", "must differ"),
    (
        ("serving", "engineArgs"),
        {"tensor_parallel_size": 4},
        "spec.serving.engineArgs",
        "set by the planner",
    ),
    (("serving", "engineArgs"), {"max_num_seqs": "lots"}, "spec.serving.engineArgs", "must be int"),
    (("serving", "engineArgs"), {"made_up_arg": 1}, "spec.serving.engineArgs", "not a supported"),
    (("tracing", "endpoint"), None, "spec.tracing", "needs tracing.endpoint"),
    (("upgradeStrategy",), "Recreate", "spec.upgradeStrategy", "NewCluster"),
    (("replicas",), -1, "spec.replicas", "greater than or equal"),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    BAD_CASES,
    ids=[".".join(c[0]) + "=" + repr(c[1]) for c in BAD_CASES],
)
def test_bad_fields_are_named(
    gemma: dict[str, Any], path: tuple[str, ...], value: Any, field: str, words: str
) -> None:
    spec = copy.deepcopy(gemma["spec"])
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    messages = _errors(spec)
    assert any(m.startswith(field) and words in m for m in messages), messages


def test_missing_model_is_named() -> None:
    assert _errors({}) == ["spec.model: required field is missing"]


def test_replica_bounds() -> None:
    base = {"model": {"name": "m", "source": "hf://a/b"}}
    assert MoEDeploymentSpec.model_validate(base).replica_bounds() == (1, 1, 1)
    auto = {**base, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}}
    assert MoEDeploymentSpec.model_validate(auto).replica_bounds() == (2, 2, 5)
    pinned = {**auto, "replicas": 3}  # kubectl scale pins min = max
    assert MoEDeploymentSpec.model_validate(pinned).replica_bounds() == (3, 3, 3)


# ----------------------------------------------------------------------------- fuzzed bad specs

_WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**9), max_value=-1),
    st.just(10**12),
    st.text(min_size=0, max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=2),
)

#: Fields and a predicate telling whether a value is acceptable there (fuzz skips those).
_FIELDS: dict[tuple[str, ...], Any] = {
    ("model", "name"): lambda v: isinstance(v, str) and v and v[0].isalnum(),
    ("model", "dtype"): lambda v: v in ("auto", "bfloat16", "float16", "float32"),
    ("model", "maxModelLen"): lambda v: v is None or (type(v) is int and 16 <= v <= 1_048_576),
    ("parallelism", "expertParallel"): lambda v: isinstance(v, bool),
    ("parallelism", "tensorParallelSize"): lambda v: v == "auto" or (type(v) is int and v >= 1),
    ("parallelism", "dataParallelSize"): lambda v: v == "auto" or (type(v) is int and v >= 1),
    ("parallelism", "eplb", "windowSize"): lambda v: type(v) is int and v >= 1,
    ("resources", "gpusPerNode"): lambda v: type(v) is int and 1 <= v <= 16,
    ("resources", "cpu"): lambda v: (
        (type(v) is int and v >= 0) or (None if isinstance(v, str) else False)
    ),
    ("resources", "accelerator"): lambda v: False,
    ("autoscaling", "maxReplicas"): lambda v: type(v) is int and 1 <= v <= 1000,
    ("autoscaling", "targetQueueDepth"): lambda v: type(v) in (int, float) and 0 < v <= 10_000,
    ("serving", "httpPort"): lambda v: type(v) is int and 1024 <= v <= 65535,
    ("serving", "requestTimeoutSeconds"): lambda v: type(v) in (int, float) and 0 < v <= 86_400,
    ("tracing", "sampleRatio"): lambda v: type(v) in (int, float) and 0 <= v <= 1,
    ("replicas",): lambda v: v is None or (type(v) is int and 1 <= v <= 1000),
    ("image",): lambda v: isinstance(v, str) and len(v) > 0,
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(_FIELDS)), value=_WRONG_VALUES, unknown=st.booleans())
def test_fuzzed_invalid_specs_are_rejected_naming_the_field(
    field: tuple[str, ...], value: Any, unknown: bool
) -> None:
    from unit_support import ROOT

    spec = copy.deepcopy(load(ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml")["spec"])
    node = spec
    for key in field[:-1]:
        node = node.setdefault(key, {})
    name = field[-1] + ("X" if unknown else "")
    ok = _FIELDS[field](value)
    if value is None and field != ("model", "name"):
        ok = True  # null is unset, as the API server prunes it, and the default applies
    if not unknown and ok in (True, None):
        return  # a valid (or undecidable here) value: nothing to check
    node[name] = value
    messages = _errors(spec)
    path = "spec." + ".".join((*field[:-1], name))
    assert any(
        m.startswith(path) or m.startswith("spec." + ".".join(field[:-1])) for m in messages
    ), (
        path,
        messages,
    )
