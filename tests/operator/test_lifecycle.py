"""Create, update, no-op resume, drift repair and deletion, over HTTP against the emulator."""

from __future__ import annotations

from typing import Any

from expectations import EXPECTED, children, cond, deploy_ready, is_

from moe_operator.reconcile import HASH_ANNOTATION
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, Reconciles, mixtral
from tests.support.waiting import eventually


async def test_create_makes_children_and_reports_progress_then_ready(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await eventually(lambda: is_(api, "Progressing", "True"), message="Progressing=True")
    assert cond(api, "Progressing")["reason"] == "Creating"
    assert cond(api, "Ready")["status"] == "False"
    owner = api.read(MOED, NS, "mixtral")
    status = owner["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoints"]["grpc"] == f"mixtral-grpc.{NS}.svc:9000"
    assert status["endpoints"]["http"].startswith(f"http://mixtral-http.{NS}.svc:8000")
    assert status["plan"]["expertParallelSize"] >= 1
    assert status["selector"].startswith("serving.moeoperator.io/deployment=mixtral")
    # Every child is owned by the MoEDeployment (GC) and carries the managed labels + hash.
    uid = owner["metadata"]["uid"]
    for kind in (em.RAYSERVICES, em.SERVICES, em.PDBS):
        for obj in api.list_items(kind, NS):
            meta = obj["metadata"]
            assert meta["ownerReferences"][0]["uid"] == uid
            assert meta["ownerReferences"][0]["controller"] is True
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "moe-operator"
            assert HASH_ANNOTATION in meta["annotations"]
    # All writes to children are server-side applies by the one field manager.
    applies = [
        c
        for c in api.operator_writes()
        if c.resource in ("rayservices", "services", "poddisruptionbudgets")
    ]
    assert applies and all(
        c.verb == "patch"
        and c.content_type.startswith("application/apply-patch+yaml")
        and c.params.get("fieldManager") == "moe-operator"
        and c.params.get("force") == "true"
        for c in applies
    )

    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
    assert cond(api, "Ready")["reason"] == "Serving"
    assert cond(api, "Progressing")["status"] == "False"
    assert cond(api, "Degraded")["status"] == "False"
    status = api.read(MOED, NS, "mixtral")["status"]
    assert status["readyReplicas"] == 2 and status["replicas"] == 2


async def test_unchanged_spec_on_restart_writes_nothing(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, reconciles: Reconciles
) -> None:
    await deploy_ready(api, operator, kuberay)
    await operator.stop()
    mark, runs, events = len(api.calls), reconciles.count(), len(reconciles.child_events)
    await operator.start()
    # The resume handler reconciles once, and each of the 4 children's initial events is seen.
    await eventually(lambda: reconciles.count() > runs, message="resume reconcile")
    await eventually(lambda: len(reconciles.child_events) >= events + 4, message="child events")
    await eventually(lambda: not operator.busy, message="idle operator")
    # kopf re-registers its webhook configuration at every start (kopf's doing, not a reconcile).
    writes = [
        c for c in api.operator_writes(mark) if c.resource != "validatingwebhookconfigurations"
    ]
    assert writes == [], [(c.verb, c.resource, c.name) for c in writes]
    assert all(w == [] for w in reconciles.writes(runs))
    # Nothing was read per child either: decisions come from the watch caches.
    gets = [c for c in api.operator_calls(mark) if c.verb == "get"]
    assert gets == [], [(c.resource, c.name) for c in gets]


async def test_spec_change_updates_rayservice_and_reports_updating(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    before = api.read(em.RAYSERVICES, NS, "mixtral")
    mark = len(api.calls)
    await api.modify(MOED, NS, "mixtral", {"spec": {"serving": {"maxOngoingRequests": 32}}})
    await eventually(
        lambda: (
            (c := cond(api, "Progressing")) and c["reason"] == "Updating" and c["status"] == "True"
        ),
        message="Progressing=Updating",
    )
    after = api.read(em.RAYSERVICES, NS, "mixtral")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert "max_ongoing_requests: 32" in after["spec"]["serveConfigV2"]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # updated in place, not replaced
    # The old cluster still serves while KubeRay rolls the new spec.
    assert cond(api, "Ready")["status"] == "True"
    status = api.read(MOED, NS, "mixtral")["status"]
    assert status["observedGeneration"] == 2
    # Only the RayService changed; the Services and the PDB were not written.
    child_writes = [
        (c.resource, c.name)
        for c in api.operator_writes(mark)
        if c.resource in ("rayservices", "services", "poddisruptionbudgets")
    ]
    assert child_writes == [("rayservices", "mixtral")]

    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Progressing", "False"), message="rolled out")
    assert cond(api, "Progressing")["reason"] == "UpToDate"


async def test_deleted_child_is_recreated(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    old_uid = api.read(em.SERVICES, NS, "mixtral-http")["metadata"]["uid"]
    mark = len(api.calls)
    await api.destroy(em.SERVICES, NS, "mixtral-http")
    recreated = await eventually(
        lambda: api.find(em.SERVICES, NS, "mixtral-http"), message="Service recreated"
    )
    assert recreated["metadata"]["uid"] != old_uid
    await eventually(lambda: not operator.busy, message="idle operator")
    child_writes = [
        (c.resource, c.name)
        for c in api.operator_writes(mark)
        if c.resource in ("rayservices", "services", "poddisruptionbudgets")
    ]
    assert child_writes == [("services", "mixtral-http")]


async def test_hand_edited_child_is_put_back(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    original = api.read(em.SERVICES, NS, "mixtral-grpc")["spec"]["ports"]
    # Someone edits the Service by hand (kubectl edit: a merge patch by another client).
    await api.modify(em.SERVICES, NS, "mixtral-grpc", {"spec": {"ports": [{"port": 1234}]}})
    await eventually(
        lambda: api.read(em.SERVICES, NS, "mixtral-grpc")["spec"]["ports"] == original,
        message="ports restored",
    )
    # An edit of a field the operator does not manage is left alone.
    await api.modify(
        em.PDBS, NS, "mixtral-workers", {"metadata": {"annotations": {"team": "infra"}}}
    )
    mark = len(api.calls)
    await eventually(lambda: not operator.busy, message="idle operator")
    assert api.read(em.PDBS, NS, "mixtral-workers")["metadata"]["annotations"]["team"] == "infra"
    assert [c for c in api.operator_writes(mark) if c.resource == "poddisruptionbudgets"] == []


async def test_delete_removes_children_by_garbage_collection(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    owner = api.read(MOED, NS, "mixtral")
    # No finalizer: deletion never waits for the operator.
    assert not owner["metadata"].get("finalizers")
    await operator.stop()
    await api.destroy(MOED, NS, "mixtral")  # while the operator is down
    assert api.find(MOED, NS, "mixtral") is None
    assert children(api) == []  # ownerReferences: the API server's GC removed them
    mark = len(api.calls)
    await operator.start()
    await eventually(lambda: not operator.busy, message="idle operator")
    assert children(api) == []
    assert api.operator_writes(mark) == [] or all(
        c.resource == "validatingwebhookconfigurations" for c in api.operator_writes(mark)
    )


async def test_network_policy_toggle_creates_then_prunes(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    await api.modify(MOED, NS, "mixtral", {"spec": {"networkPolicy": {"enabled": True}}})
    await eventually(lambda: api.find(em.NETPOLS, NS, "mixtral"), message="NetworkPolicy")
    await api.modify(MOED, NS, "mixtral", {"spec": {"networkPolicy": {"enabled": False}}})
    await eventually(lambda: api.find(em.NETPOLS, NS, "mixtral") is None, message="pruned")
    assert children(api) == EXPECTED


async def test_scale_subresource_changes_replicas(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await deploy_ready(api, operator, kuberay)
    # kubectl scale moed/mixtral --replicas=3 (the scale subresource's spec.replicas path).
    await api.modify(MOED, NS, "mixtral", {"spec": {"replicas": 3}}, subresource="scale")

    def group() -> dict[str, Any]:
        rs = api.read(em.RAYSERVICES, NS, "mixtral")
        worker: dict[str, Any] = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        return worker

    await eventually(lambda: group()["replicas"] == 3, message="3 replicas")
    await kuberay.serve("mixtral")
    await eventually(
        lambda: api.read(MOED, NS, "mixtral")["status"].get("readyReplicas") == 3,
        message="readyReplicas 3",
    )
    status = api.read(MOED, NS, "mixtral")["status"]
    assert status["desiredReplicas"] == 3
    scale = api._scale_view(MOED, api.read(MOED, NS, "mixtral"))
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == status["selector"]
