"""Create, update, no-op resume, drift repair and deletion, over HTTP against the emulator."""

from __future__ import annotations

from typing import Any

import kube_emulator as em
from operator_harness import MOED, NS, KubeRay, Operator, Reconciles, eventually, mixtral

from moe_operator import status as st
from moe_operator.handlers import HASH_ANNOTATION


def cond(api: em.ApiServer, ctype: str, name: str = "mixtral") -> dict[str, Any]:
    """A condition of the MoEDeployment ({} while it has none)."""
    obj = api.find(MOED, NS, name)
    return st.condition((obj or {}).get("status"), ctype) or {}


def is_(api: em.ApiServer, ctype: str, value: str, reason: str | None = None) -> bool:
    c = cond(api, ctype)
    return c.get("status") == value and (reason is None or c.get("reason") == reason)


def children(api: em.ApiServer, ns: str = NS) -> list[str]:
    out = []
    for kind in (em.RAYSERVICES, em.SERVICES, em.PDBS, em.NETPOLS):
        out += [f"{kind.kind}/{o['metadata']['name']}" for o in api.list_items(kind, ns)]
    return sorted(out)


EXPECTED = sorted(
    [
        "RayService/mixtral",
        "Service/mixtral-http",
        "Service/mixtral-grpc",
        "PodDisruptionBudget/mixtral-workers",
    ]
)


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


async def deploy_ready(api: em.ApiServer, operator: Operator, kuberay: KubeRay) -> None:
    """A served MoEDeployment with every child in place and Ready=True."""
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
    await eventually(lambda: not operator.busy, message="idle operator")


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
