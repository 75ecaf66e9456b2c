"""The API server refuses a rendered child for a schema reason: Degraded with its words, no loop.

The emulator validates RayServices against KubeRay's CRD (tests/support/k8s_schema.py), here
the CRD of a KubeRay release older than the operator supports.
"""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from expectations import cond, handled_spec_stored, is_

from moe_operator.kuberay import MIN_KUBERAY
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, Operator, Reconciles, emulated_cluster, mixtral
from tests.support.waiting import eventually


async def test_rayservice_refused_by_an_old_kuberay_is_degraded_without_retrying(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, reconciles: Reconciles
) -> None:
    """KubeRay v1.4.2's RayService CRD has no `spec.rayClusterConfig.authOptions` (it appears in
    v1.5.1: ../shared/kuberay-crds/SOURCE.md). Server-side apply of our RayService then fails
    with kube-apiserver's HTTP 500 "failed to create typed patch object (...): .spec.
    rayClusterConfig.authOptions: field not declared in schema" (structured-merge-diff's error
    is not a metav1.Status: k8s.io/apimachinery/pkg/util/managedfields/internal/
    structuredmerge.go, kubernetes/kubernetes#122480 and #139253). kube.py took that 500 for a
    transient error and retried forever; now the MoEDeployment is Degraded (ApplyRejected) with
    the server's message and what to do, and the operator stops until something changes."""
    async with emulated_cluster(tmp_path, monkeypatch, kuberay="v1.4.2") as api:
        operator = Operator(api)
        await operator.start()
        try:
            await api.create(MOED, mixtral(), admit=True)
            await eventually(lambda: is_(api, "Degraded", "True"), message="Degraded")
            degraded = cond(api, "Degraded")
            assert degraded["reason"] == "ApplyRejected"
            status, message = api.schema_rejections[0]
            assert status == 500
            assert "authOptions: field not declared in schema" in message
            assert message in degraded["message"]
            assert MIN_KUBERAY in degraded["message"]  # and what to do about it
            assert cond(api, "Ready")["status"] == "False"
            assert cond(api, "Progressing")["status"] == "False"
            assert api.find(em.RAYSERVICES, NS, "mixtral") is None

            await eventually(lambda: not operator.busy, message="idle operator")
            await eventually(lambda: handled_spec_stored(api), message="diff base stored")
            runs, mark = reconciles.count(), len(api.calls)
            refused = len(api.schema_rejections)
            # A retry loop would apply again within a few retry delays (0.2 s here).
            await asyncio.sleep(1.0)
            assert reconciles.count() == runs
            assert len(api.schema_rejections) == refused
            calls = api.operator_calls(mark)
            assert [c for c in calls if c.verb != "watch" and c.resource != "events"] == []
            events = api.list_items(em.EVENTS, NS)
            assert any(e.get("reason") == "ApplyRejected" for e in events)
        finally:
            await operator.stop()
