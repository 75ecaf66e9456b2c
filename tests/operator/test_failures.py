"""Unplannable specs, API faults, dropped watches and crashes: the operator converges anyway."""

from __future__ import annotations

import asyncio
import os
import pathlib
from typing import Any

import pytest
from expectations import EXPECTED, children, cond, handled_spec_stored, is_, unplannable

from moe_operator.reconcile import HASH_ANNOTATION
from tests.support import kube_emulator as em
from tests.support.operator_harness import (
    MOED,
    NS,
    KubeRay,
    Operator,
    Reconciles,
    emulated_cluster,
    mixtral,
    retrying,
)
from tests.support.waiting import eventually

CHILD_RESOURCES = ("rayservices", "services", "poddisruptionbudgets", "networkpolicies")


async def test_unplannable_spec_is_degraded_without_retrying(
    api: em.ApiServer, operator: Operator, reconciles: Reconciles
) -> None:
    # It passed admission (say the webhook was off when it was created).
    api.admission_enabled = False
    await operator.start()
    await api.create(MOED, unplannable())
    await eventually(lambda: is_(api, "Degraded", "True"), message="Degraded")
    degraded = cond(api, "Degraded")
    assert degraded["reason"] == "PlanFailed"
    assert "does not fit" in degraded["message"] and "To fix" in degraded["message"]
    assert cond(api, "Ready")["status"] == "False"
    assert cond(api, "Progressing") == {**cond(api, "Progressing"), "status": "False"}
    assert children(api) == []
    await eventually(lambda: not operator.busy, message="idle operator")
    # kopf's own last write after a permanent failure stores the handled spec (the diff base);
    # only after it is the operator meant to be quiet.
    await eventually(lambda: handled_spec_stored(api), message="diff base stored")
    runs, mark = reconciles.count(), len(api.calls)
    # A retry loop would run again within a few retry delays (0.2 s here): watch for 5 of them.
    await asyncio.sleep(1.0)
    assert reconciles.count() == runs
    calls = api.operator_calls(mark)
    assert [c for c in calls if c.verb != "watch" and c.resource != "events"] == []
    assert len([c for c in calls if c.resource == "events"]) <= 2  # the failure's own Events
    # A warning Event says what to change.
    events = api.list_items(em.EVENTS, NS)
    assert any(e.get("reason") == "PlanFailed" and e.get("type") == "Warning" for e in events)

    # Fixing the spec is a new generation: the operator deploys it.
    await api.modify(MOED, NS, "mixtral", {"spec": {"resources": {"maxNodesPerReplica": 4}}})
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await eventually(lambda: is_(api, "Degraded", "False"), message="not Degraded")


async def test_converges_through_api_faults(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    def writes(resource: str, code: int) -> em.Fault:
        return em.Fault(
            match=lambda c: (
                c.is_write and c.resource == resource and c.user_agent.startswith("moe")
            ),
            status=code,
            retry_after=1 if code == 429 else None,
        )

    faults = [
        writes("rayservices", 409),  # a conflict on the first apply
        writes("services", 500),  # a server error on the first Service
        writes("moedeployments/status", 429),  # throttled status write (Retry-After: 1)
        em.Fault(match=lambda c: c.verb == "list" and c.resource == "rayservices", status=500),
    ]
    api.faults.extend(faults)
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children", timeout=60)
    # Watches drop (and the history is compacted: resuming them gets 410 Gone).
    await api.drop_watches()
    api.compact()
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready", timeout=60)
    assert [f.hits for f in faults] == [1, 1, 1, 1]
    # After a drop, the children's watches resumed: a deleted child is still noticed.
    await api.drop_watches()
    await api.destroy(em.PDBS, NS, "mixtral-workers")
    await eventually(lambda: api.find(em.PDBS, NS, "mixtral-workers"), message="PDB back")


async def _scenario(api: em.ApiServer, kuberay: KubeRay) -> None:
    """Create, serve, change the spec, serve again (the test side of a rollout)."""
    await retrying(lambda: api.create(MOED, mixtral(), admit=True))
    await eventually(lambda: children(api) == EXPECTED, message="children", timeout=60)
    await eventually(lambda: is_(api, "Progressing", "True"), message="Progressing", timeout=60)
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready", timeout=60)
    await retrying(
        lambda: api.modify(MOED, NS, "mixtral", {"spec": {"serving": {"maxOngoingRequests": 32}}})
    )
    await eventually(
        lambda: api.read(em.RAYSERVICES, NS, "mixtral")["metadata"]["generation"] == 2,
        message="RayService updated",
        timeout=60,
    )
    await kuberay.serve("mixtral")
    await eventually(
        lambda: (
            is_(api, "Progressing", "False", "UpToDate")
            and api.read(MOED, NS, "mixtral")["status"]["observedGeneration"] == 2
        ),
        message="rolled out",
        timeout=60,
    )


def _final_state(api: em.ApiServer) -> dict[str, Any]:
    """What must not depend on where the operator crashed (uids differ between clusters)."""
    owner = api.read(MOED, NS, "mixtral")
    state: dict[str, Any] = {"children": children(api)}
    for kind in (em.RAYSERVICES, em.SERVICES, em.PDBS, em.NETPOLS):
        for obj in api.list_items(kind, NS):
            meta = obj["metadata"]
            assert [r["uid"] for r in meta["ownerReferences"]] == [owner["metadata"]["uid"]]
            assert HASH_ANNOTATION in meta["annotations"]
            state[f"{kind.kind}/{meta['name']}"] = (meta["labels"], obj["spec"])
    status = owner["status"]
    state["conditions"] = sorted(
        (c["type"], c["status"], c["reason"]) for c in status["conditions"]
    )
    state["status"] = {k: v for k, v in status.items() if k != "conditions"}
    return state


def _reconcile_writes(api: em.ApiServer) -> list[em.Call]:
    """Writes of the reconcile itself (not kopf's webhook registration or Events)."""
    return [
        c
        for c in api.operator_writes()
        if c.resource in CHILD_RESOURCES or (c.resource or "").startswith("moedeployments")
    ]


# A crashed operator's event loop is abandoned mid-flight, as a killed process would be.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
async def test_crash_after_any_write_converges_to_the_same_state(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reference: an uninterrupted run.
    async with emulated_cluster(tmp_path, monkeypatch) as api:
        operator, kuberay = Operator(api), KubeRay(api)
        await operator.start()
        await _scenario(api, kuberay)
        reference = _final_state(api)
        total = len(_reconcile_writes(api))
        await operator.stop()
    assert total >= 6

    points = range(1, total + 1)
    if os.environ.get("MOE_TEST_CRASH_AT"):  # to debug one crash point
        points = range(
            int(os.environ["MOE_TEST_CRASH_AT"]), int(os.environ["MOE_TEST_CRASH_AT"]) + 1
        )
    for crash_at in points:
        async with emulated_cluster(tmp_path, monkeypatch) as api:
            assert await _run_with_crash(api, crash_at) == reference, (
                f"crash after write {crash_at}"
            )


async def _run_with_crash(api: em.ApiServer, crash_at: int) -> dict[str, Any]:
    """Run the scenario, killing the operator right after its `crash_at`-th reconcile write."""
    operator, kuberay = Operator(api), KubeRay(api)
    crashed = asyncio.Event()
    count = 0

    def after_write(call: em.Call) -> None:
        nonlocal count
        if call.resource in CHILD_RESOURCES or (call.resource or "").startswith("moedeployments"):
            count += 1
            if count == crash_at and not crashed.is_set():
                api.frozen = True  # nothing after this write gets through
                crashed.set()

    async def crash_and_restart() -> None:
        await crashed.wait()
        await operator.crash()
        await operator.start()

    api.after_write = after_write
    await operator.start()
    restarter = asyncio.create_task(crash_and_restart())
    await _scenario(api, kuberay)
    await restarter
    assert operator.runs == 2, f"no crash at write {crash_at}"
    await eventually(lambda: not operator.busy, message="idle operator")
    state = _final_state(api)
    await operator.stop()
    return state
