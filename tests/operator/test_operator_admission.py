"""The validating admission handler: generated invalid specs are rejected naming the field.

Most cases call the handler directly (hundreds of them); the webhook round trip (the emulator
calling kopf's webhook server, registered by the operator itself) is covered too.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rbac_record import granted, used, without

from moe_operator.api import MoEDeploymentSpec
from moe_operator.webhook import validate_moedeployment
from tests.support import helm_render as helm
from tests.support import kube_emulator as em
from tests.support import webhook_rules
from tests.support.operator_harness import EXAMPLES, MOED, Operator, example, mixtral
from tests.support.ports import free_port
from tests.support.waiting import eventually

CLUSTER_EXAMPLES = sorted(
    p.name for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("tiny-cpu")
)
#: Map-typed fields: any key is valid there, so "unknown key" mutations skip them.
MAP_FIELDS = {"nodeSelector", "allowedClientLabels", "prometheusPodLabels", "engineArgs"}


def validate(body: dict[str, Any], operation: str = "CREATE", old: Any = None) -> None:
    validate_moedeployment(
        body=kopf.Body(body), old=kopf.Body(old) if old else None, operation=operation
    )


def rejection(body: dict[str, Any]) -> str:
    with pytest.raises(kopf.AdmissionError) as info:
        validate(body)
    assert info.value.code == 422
    return str(info.value)


def full_body(name: str) -> dict[str, Any]:
    """An example with every defaulted field spelled out, so every field can be mutated."""
    body = example(name)
    body["spec"] = MoEDeploymentSpec.model_validate(body["spec"]).to_wire()
    return body


def nodes(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (path, value) under `obj`, dicts descended (lists and map fields are leaves)."""
    out = [(path, obj)] if path else []
    if isinstance(obj, dict) and (not path or path[-1] not in MAP_FIELDS):
        for key, value in obj.items():
            out += nodes(value, (*path, key))
    return out


def set_path(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


SPEC_NODES = {name: nodes(full_body(name)["spec"]) for name in CLUSTER_EXAMPLES}


@pytest.mark.parametrize("name", CLUSTER_EXAMPLES)
def test_cluster_examples_are_admitted(name: str) -> None:
    validate(example(name))
    validate(full_body(name))


def test_local_only_example_is_rejected_for_a_cluster() -> None:
    # tiny-cpu.yaml is for `moectl up`: the cluster operator cannot run it and says why.
    message = rejection(example("tiny-cpu.yaml"))
    assert "spec.model.source" in message and "moectl up" in message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_invalid_specs_are_rejected_naming_the_field(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(CLUSTER_EXAMPLES), label="example")
    body = full_body(name)
    path, value = data.draw(st.sampled_from(SPEC_NODES[name]), label="field")
    kind = data.draw(st.sampled_from(["wrong-type", "unknown-key"]), label="mutation")
    if kind == "unknown-key" and isinstance(value, dict) and path[-1] not in MAP_FIELDS:
        key = data.draw(
            st.from_regex(r"\A[a-z][a-zA-Z]{2,12}\Z").filter(lambda k: k not in value),
            label="key",
        )
        node = copy.deepcopy(value)
        node[key] = data.draw(st.one_of(st.integers(), st.text(max_size=5)), label="v")
        set_path(body["spec"], path, node)
        expected = ".".join(("spec", *path, key))
    else:
        # A container where a scalar belongs, or a list where an object/map belongs.
        wrong: Any = [1] if isinstance(value, dict) else {"bad": 1}
        set_path(body["spec"], path, wrong)
        expected = ".".join(("spec", *path))
    message = rejection(body)
    assert expected in message, (expected, message)


@settings(max_examples=100, deadline=None)
@given(
    field=st.sampled_from(
        [
            (("serving", "httpPort"), st.integers(max_value=1023)),
            (("serving", "grpcPort"), st.integers(min_value=65536)),
            (("resources", "gpusPerNode"), st.integers(max_value=0)),
            (("resources", "gpuMemoryUtilization"), st.floats(min_value=0.99, max_value=5)),
            (("autoscaling", "targetQueueDepth"), st.floats(max_value=0)),
            (("model", "maxModelLen"), st.integers(max_value=15)),
            (("replicas",), st.integers(min_value=1001)),
            (("resources", "memory"), st.sampled_from(["lots", "12 GB", "-", "1.2.3Gi"])),
            (("model", "source"), st.sampled_from(["ftp://x/y", "hf://only-org", "model"])),
        ]
    ),
    data=st.data(),
)
def test_out_of_range_values_are_rejected_naming_the_field(field: Any, data: Any) -> None:
    path, values = field
    body = mixtral()
    body["spec"].setdefault(path[0], {})
    set_path(body["spec"], path, data.draw(values))
    message = rejection(body)
    assert ".".join(("spec", *path)) in message, message


def test_unplannable_spec_is_rejected_with_the_planner_advice() -> None:
    body = mixtral()
    body["spec"]["model"]["quantization"] = "none"
    body["spec"]["resources"].update(
        {"accelerator": "L40S-48GB", "gpusPerNode": 1, "maxNodesPerReplica": 1}
    )
    message = rejection(body)
    assert "does not fit" in message and "maxNodesPerReplica" in message


def test_bad_name_is_rejected_naming_metadata_name() -> None:
    body = mixtral(name="a" * 41)
    assert "metadata.name" in rejection(body)


def test_metadata_only_update_of_an_invalid_object_is_not_judged_again() -> None:
    # kopf's own annotation patches must never be blocked (e.g. after a catalog change).
    bad = mixtral()
    bad["spec"]["serving"] = {"httpPort": 1}
    newer = copy.deepcopy(bad)
    newer["metadata"]["annotations"] = {"x": "y"}
    validate(newer, operation="UPDATE", old=bad)


async def test_webhook_round_trip_through_the_api(api: em.ApiServer, operator: Operator) -> None:
    await operator.start()
    # The operator registered its webhook; the emulator calls it for every write of the kind.
    configs = await eventually(
        lambda: [c for c in api.list_items(em.WEBHOOKS) if c.get("webhooks")], message="webhook"
    )
    assert len(configs) == 1 and configs[0]["webhooks"][0]["failurePolicy"] == "Fail"
    bad = mixtral()
    bad["spec"]["parallelism"]["tensorParallelSize"] = 0
    with pytest.raises(em.ApiError) as info:
        await api.create(MOED, bad, admit=True)
    assert info.value.status == 422
    assert "spec.parallelism.tensorParallelSize" in info.value.message
    assert api.find(MOED, "llm", "mixtral") is None
    for index, name in enumerate(CLUSTER_EXAMPLES):
        body = example(name)
        body["metadata"]["namespace"] = f"ns{index}"
        await api.create(MOED, body, admit=True)
    # An update that breaks the spec is refused too; the stored object is unchanged.
    first = example(CLUSTER_EXAMPLES[0])
    with pytest.raises(em.ApiError) as info:
        await api.modify(
            MOED, "ns0", first["metadata"]["name"], {"spec": {"model": {"dtype": "int3"}}}
        )
    assert "spec.model.dtype" in info.value.message
    # What kopf called to manage its webhook configuration is exactly what the chart grants
    # when the webhook is on (on top of the rules test_chart_command.py checks).
    webhook_calls = {
        key: verbs
        for key, verbs in used(api, "test-token").items()
        if key[1] == "validatingwebhookconfigurations"
    }
    extra = without(granted(helm.render({"webhook": {"enabled": True}})), granted(helm.render({})))
    assert webhook_calls == extra


async def test_service_webhook_configuration_passes_the_api_servers_validation(
    api: em.ApiServer, operator: Operator, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The configuration kopf writes for the chart's webhook Service (webhook.enabled=true) is
    one the API server accepts. Rules: kubernetes pkg/apis/admissionregistration/validation/
    validation.go (validateValidatingWebhook) and k8s.io/apiserver pkg/util/webhook/
    validation.go (ValidateWebhookService: the path starts with '/', no empty segment). The
    emulator refuses a write that breaks them, as the API server does; kopf's own
    configuration manager (admission.build_webhooks / _inject_handler_id) builds the object.
    Before the fix the service path was "/" and kopf made it "//validate-spec": a 422, and the
    operator crash-looped."""
    monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_LOCAL", "false")
    monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_SERVICE", "moe-operator-webhook")
    monkeypatch.setenv("MOE_OPERATOR_NAMESPACE", "moe-system")
    monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_SERVICE_PORT", "443")
    monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_PORT", str(free_port()))
    monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_CERT_DIR", str(tmp_path / "certs"))
    await operator.start()
    configs = await eventually(
        lambda: [c for c in api.list_items(em.WEBHOOKS) if c.get("webhooks")], message="webhook"
    )
    (config,) = configs
    assert webhook_rules.configuration_problems(config) == []
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": "moe-operator-webhook",
        "namespace": "moe-system",
        "port": 443,
        "path": "/validate-spec",
    }
    assert hook["clientConfig"]["caBundle"]


def test_webhook_rules_catch_what_the_api_server_refuses() -> None:
    """The checker is not vacuous: the old "//validate-spec" path and other refusals of
    ValidateWebhookService / validateValidatingWebhook are reported."""
    good = {
        "metadata": {"name": "moe-operator.serving.moeoperator.io"},
        "webhooks": [
            {
                "name": "validate-spec.moe-operator.serving.moeoperator.io",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "rules": [
                    {
                        "apiGroups": ["serving.moeoperator.io"],
                        "apiVersions": ["v1alpha1"],
                        "resources": ["moedeployments"],
                        "operations": ["CREATE", "UPDATE"],
                    }
                ],
                "clientConfig": {
                    "service": {"name": "s", "namespace": "n", "port": 443, "path": "/x"},
                    "caBundle": "Y2E=",
                },
            }
        ],
    }
    assert webhook_rules.configuration_problems(good) == []
    for path, value in [
        (("clientConfig", "service", "path"), "//validate-spec"),
        (("clientConfig", "service", "path"), "validate-spec"),
        (("clientConfig", "service", "path"), "/Validate_Spec"),
        (("clientConfig", "service", "port"), 0),
        (("clientConfig", "service", "name"), ""),
        (("clientConfig", "caBundle"), ""),
        (("clientConfig",), {"url": "http://x/y"}),
        (("sideEffects",), "Some"),
        (("timeoutSeconds",), 31),
        (("name",), "validate-spec"),
        (("admissionReviewVersions",), ["v2"]),
    ]:
        bad = copy.deepcopy(good)
        set_path(bad["webhooks"][0], path, value)
        assert webhook_rules.configuration_problems(bad), (path, value)
