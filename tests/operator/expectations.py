"""What the operator's tests expect of the `mixtral` MoEDeployment and its children, read from
the emulator, and the states several tests start from (served and Ready; an unplannable spec).
Private to tests/operator/ (imported by name, as pytest puts this folder on the path)."""

from __future__ import annotations

from typing import Any

from moe_operator import status as st
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, mixtral
from tests.support.waiting import eventually


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


async def deploy_ready(api: em.ApiServer, operator: Operator, kuberay: KubeRay) -> None:
    """A served MoEDeployment with every child in place and Ready=True."""
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
    await eventually(lambda: not operator.busy, message="idle operator")


def unplannable() -> dict[str, Any]:
    """Valid for the schema, but Mixtral's ~90 GiB of bf16 weights fit no single 48 GB GPU."""
    body = mixtral()
    body["spec"]["model"]["quantization"] = "none"
    body["spec"]["resources"].update(
        {"accelerator": "L40S-48GB", "gpusPerNode": 1, "maxNodesPerReplica": 1}
    )
    return body


def handled_spec_stored(api: em.ApiServer) -> bool:
    """kopf has written the last-handled-configuration annotation and no handler progress."""
    annotations = api.read(MOED, NS, "mixtral")["metadata"].get("annotations", {})
    progress = [k for k in annotations if k.startswith("serving.moeoperator.io/reconcile")]
    return "serving.moeoperator.io/last-handled-configuration" in annotations and not progress
