"""What the chart deploys: the kopf command line, image, probes, peering and webhook wiring."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.support.helm_render import (
    CHART,
    VALUE_SETS,
    Obj,
    by_kind,
    one,
    operator_container,
    render,
)

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
HOOK = "post-install,post-upgrade"


def env_of(container: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def port_number(container: Obj, name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def test_default_command_line_runs_kopf_on_all_namespaces_with_peering() -> None:
    container = operator_container(render({}))
    assert container["command"] == ["kopf"]
    assert container["args"] == [
        "run",
        "--module=moe_operator.handlers",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--log-format=full",
        "--all-namespaces",
        "--peering=moe-operator",
        "--priority=0",
    ]


def test_watched_namespaces_become_namespace_flags() -> None:
    args = operator_container(render(VALUE_SETS["namespaces"]))["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=a", "--namespace=b"]
    assert "--all-namespaces" not in args
    patterns = operator_container(render(VALUE_SETS["patterns"]))["args"]
    assert "--namespace=team-*" in patterns
    assert "--namespace=ml" in patterns


def test_peering_off_runs_standalone_without_peering_objects() -> None:
    objs = render(VALUE_SETS["no-peering"])
    args = operator_container(objs)["args"]
    assert "--standalone" in args
    assert not [a for a in args if a.startswith(("--peering", "--priority"))]
    assert not [o for o in objs if o["apiVersion"].startswith("kopf.dev/")]
    assert not by_kind(objs, "CustomResourceDefinition")


def test_peering_objects_and_crds() -> None:
    objs = render({})
    crds = {c["metadata"]["name"]: c for c in by_kind(objs, "CustomResourceDefinition")}
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        (version,) = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True
    peering = one(objs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "moe-operator"
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == HOOK
    assert not by_kind(objs, "KopfPeering")

    namespaced = render(VALUE_SETS["namespaces"])
    assert not by_kind(namespaced, "ClusterKopfPeering")
    for obj in by_kind(namespaced, "KopfPeering"):
        assert obj["metadata"]["name"] == "moe-operator"
        assert obj["metadata"]["annotations"]["helm.sh/hook"] == HOOK

    shared_crds = render({"peering": {"installCRDs": False, "name": "shared", "priority": 7}})
    assert not by_kind(shared_crds, "CustomResourceDefinition")
    assert one(shared_crds, "ClusterKopfPeering")["metadata"]["name"] == "shared"
    args = operator_container(shared_crds)["args"]
    assert "--peering=shared" in args
    assert "--priority=7" in args


def test_default_image_is_the_app_version() -> None:
    container = operator_container(render({}))
    assert container["image"] == f"ghcr.io/moe-operator/moe-operator:{APP_VERSION}"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_custom_image_resources_env_and_logging() -> None:
    objs = render(VALUE_SETS["custom"])
    container = operator_container(objs)
    assert container["image"] == "registry.example.com/ml/moe-operator:9.9.9-test"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == VALUE_SETS["custom"]["resources"]
    assert env_of(container)["MOE_OPERATOR_EXTRA"] == "on"
    assert "--verbose" in container["args"]
    assert "--log-format=json" in container["args"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_live_state_values_become_the_operators_settings() -> None:
    from moe_operator import settings

    default = env_of(operator_container(render({})))
    assert default["MOE_OPERATOR_LIVE_STATE_INTERVAL"] == "15"
    assert "MOE_OPERATOR_LIVE_STATE_URL" not in default
    url = "http://127.0.0.1:8000/{namespace}/{name}/v1/moe/state"
    values = {"liveState": {"intervalSeconds": 0, "timeoutSeconds": 2.5, "url": url}}
    env = env_of(operator_container(render(values)))
    config = settings.load({k: v for k, v in env.items() if isinstance(v, str)})
    assert config.live_state_interval == 0
    assert config.live_state_timeout == 2.5
    assert config.live_state_url == url


def test_log_levels_map_to_kopf_flags() -> None:
    flags = {"--verbose", "--debug", "--quiet"}
    for level, expected in [("info", set()), ("verbose", {"--verbose"}), ("debug", {"--debug"})]:
        args = operator_container(render({"logLevel": level}))["args"]
        assert flags & set(args) == expected, level
    assert "--quiet" in operator_container(render({"logLevel": "quiet"}))["args"]


def test_probes_hit_kopfs_health_endpoint() -> None:
    container = operator_container(render({}))
    health = port_number(container, "health")
    assert f"--liveness=http://0.0.0.0:{health}/healthz" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert get["port"] == "health"
    moved = operator_container(render({"healthPort": 8181}))
    assert port_number(moved, "health") == 8181
    assert "--liveness=http://0.0.0.0:8181/healthz" in moved["args"]


def test_hardened_container() -> None:
    objs = render({})
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(objs)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable path is an emptyDir at /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    (volume,) = pod["volumes"]
    assert volume["name"] == "tmp"
    assert "emptyDir" in volume
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert env_of(container)["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_single_replica_recreated_on_upgrade() -> None:
    spec = one(render({}), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_service_account_is_the_pods() -> None:
    objs = render({})
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    external = render({"serviceAccount": {"create": False, "name": "byo"}})
    assert not by_kind(external, "ServiceAccount")
    assert one(external, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "byo"


def test_webhook_service_routes_443_to_kopfs_webhook_port() -> None:
    objs = render(VALUE_SETS["webhook"])
    service = one(objs, "Service")
    deployment = one(objs, "Deployment")
    container = operator_container(objs)
    ports = {p["port"]: port_number(container, p["targetPort"]) for p in service["spec"]["ports"]}
    # 443 is the Service port; 9443 too, because kopf puts its listening port in the webhook URL.
    assert ports == {443: 9443, 9443: 9443}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    env = env_of(container)
    assert env["MOE_OPERATOR_WEBHOOK_ENABLED"] == "true"
    assert env["MOE_OPERATOR_WEBHOOK_PORT"] == "9443"
    assert env["MOE_OPERATOR_WEBHOOK_SERVICE"] == service["metadata"]["name"]
    assert env["MOE_OPERATOR_WEBHOOK_HOST"] == f"{service['metadata']['name']}.moe-system.svc"


def test_webhook_off_by_default() -> None:
    objs = render({})
    assert not by_kind(objs, "Service")
    container = operator_container(objs)
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert env_of(container)["MOE_OPERATOR_WEBHOOK_ENABLED"] == "false"


def test_selector_labels_match_pod_labels() -> None:
    deployment = one(render({}), "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_installed_kopf_accepts_the_rendered_command_line(name: str) -> None:
    """The args parse with the real kopf CLI (kopf's own click command, not invoked)."""
    kopf_cli = pytest.importorskip("kopf.cli", reason="kopf is not installed (operator extra)")
    values = VALUE_SETS[name]
    args = operator_container(render(values))["args"]
    assert args[0] == "run"
    params = kopf_cli.run.make_context("kopf run", list(args[1:])).params
    assert params["modules"] == ("moe_operator.handlers",)
    assert params["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    watched = values.get("watchNamespaces", [])
    assert params["clusterwide"] is (not watched)
    assert list(params["namespaces"]) == watched
    peering = values.get("peering", {}).get("enabled", True)
    assert params["peering_name"] == ("moe-operator" if peering else None)
    assert params["standalone"] is (None if peering else True)


def test_kopf_cli_check_rejects_a_bad_command_line() -> None:
    """The check above can fail: kopf's parser refuses unknown flags and bad choices."""
    kopf_cli = pytest.importorskip("kopf.cli", reason="kopf is not installed (operator extra)")
    import click

    with pytest.raises(click.UsageError):
        kopf_cli.run.make_context("kopf run", ["--namespaces=a"])
    with pytest.raises(click.UsageError):
        kopf_cli.run.make_context("kopf run", ["--log-format=loud"])
