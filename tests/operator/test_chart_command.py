"""The operator exactly as the Helm chart runs it: `kopf run` with the chart's args and env.

The command line, environment and peering objects come from `helm template` of the real
chart; the operator runs in its own process and talks HTTP to the emulator. Only three things
differ from a pod: the kubeconfig (the emulator instead of a service account), the POD_ID
(the pod name, from the downward API in a cluster) and the liveness port (a free one here).

This is also where RBAC is checked against reality: every API call the chart's operator made
over a full lifecycle is compared with the ClusterRole the chart grants it.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import yaml
from expectations import EXPECTED, children, is_
from rbac_record import granted, used, without
from state_stub import Load, StateStub

from moe_operator.api import LABEL_DEPLOYMENT, LABEL_MANAGED_BY, MANAGED_BY
from tests.support import helm_render as helm
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, mixtral
from tests.support.ports import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(
    helm.helm_binary() is None, reason="helm is not installed (make install fetches it)"
)


class ChartOperator:
    """One operator process started from the chart's Deployment."""

    def __init__(self, objs: list[dict[str, Any]], server: str, workdir: pathlib.Path, pod: str):
        container = helm.operator_container(objs)
        self.pod, self.token = pod, f"token-{pod}"
        self.port = free_port()
        args = [
            a.replace(":8080/", f":{self.port}/") if a.startswith("--liveness=") else a
            for a in container["args"]
        ]
        assert container["command"] == ["kopf"]
        # The image's `kopf` is the one installed with the project (the venv's here).
        self.argv = [str(pathlib.Path(sys.executable).parent / "kopf"), *args]
        kubeconfig = workdir / f"kubeconfig-{pod}"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emu", "cluster": {"server": server}}],
                    "users": [{"name": "op", "user": {"token": self.token}}],
                    "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "op"}}],
                    "current-context": "emu",
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_OPERATOR_")}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif field := item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"):
                # The downward API's pod fields.
                env[item["name"]] = {"metadata.name": pod, "metadata.namespace": "moe-system"}[
                    field
                ]
            else:
                raise AssertionError(f"env {item['name']}: no stand-in for {item}")
        env["KUBECONFIG"] = str(kubeconfig)
        self.env = env
        self.log = workdir / f"{pod}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        await eventually(self.alive, timeout=60, message=f"{self.pod} liveness")

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.pod} exited:\n{self.log.read_text()[-3000:]}")
        with suppress(OSError):
            url = f"http://127.0.0.1:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> None:
        """SIGTERM, as the kubelet stops a pod: kopf leaves the peering before it exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)
            raise AssertionError(f"{self.pod} ignored SIGTERM:\n{self.output()[-3000:]}") from None


def _server_url() -> str:
    config = yaml.safe_load(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
    return str(config["clusters"][0]["cluster"]["server"])


@asynccontextmanager
async def chart_operators(
    api: em.ApiServer, tmp_path: pathlib.Path, *pods: str, values: dict[str, Any] | None = None
) -> AsyncIterator[tuple[list[dict[str, Any]], list[ChartOperator]]]:
    """The chart's default install: its peering object created, its operator pod(s) defined."""
    objs = helm.render(values or {})
    for peering in helm.by_kind(objs, "ClusterKopfPeering"):
        await api.create(em.PEERINGS, peering)
    operators = [ChartOperator(objs, _server_url(), tmp_path, pod) for pod in pods]
    try:
        yield objs, operators
    finally:
        for op in operators:
            await op.stop()


#: The smallest RayService spec KubeRay's schema takes (the emulator validates against it).
OLD_RAYSERVICE_SPEC = {
    "serveConfigV2": "",
    "rayClusterConfig": {
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": "ray:2.60.0"}]}},
        }
    },
}


async def leftovers(api: em.ApiServer, owner: str) -> None:
    """A RayService, Service and PDB of this owner that the current version does not render."""
    meta = api.read(MOED, NS, owner)["metadata"]
    ref = {
        "apiVersion": MOED.api_version,
        "kind": MOED.kind,
        "name": owner,
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: owner}
    for kind, name, spec in (
        (em.RAYSERVICES, f"{owner}-v0", OLD_RAYSERVICE_SPEC),
        (em.SERVICES, f"{owner}-metrics", {"ports": [{"port": 8080}]}),
        (em.PDBS, f"{owner}-head", {"maxUnavailable": 0}),
    ):
        body = {
            "apiVersion": kind.api_version,
            "kind": kind.kind,
            "metadata": {"name": name, "labels": labels, "ownerReferences": [ref]},
            "spec": spec,
        }
        await api.create(kind, body, namespace=NS)


async def test_chart_command_line_runs_the_whole_lifecycle_within_its_rbac(
    api: em.ApiServer, tmp_path: pathlib.Path
) -> None:
    kuberay = KubeRay(api)
    # Live-state reads from a stub of the serving pods, often enough to happen in this test.
    stub = await StateStub().start()
    stub.loads[(NS, "mixtral")] = Load(waiting=2, running=1, tokens_per_s=40.0)
    live = {"liveState": {"intervalSeconds": 0.3, "url": stub.url_template}}
    async with (
        chart_operators(api, tmp_path, "moe-operator-7d9f-a", values=live) as (objs, (op,)),
    ):
        await op.start()
        body = mixtral()
        body["spec"]["networkPolicy"] = {"enabled": True}
        await api.create(MOED, body)
        await eventually(lambda: len(children(api)) == len(EXPECTED) + 1, message="children")
        await kuberay.serve("mixtral")
        await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
        # The operator keeps its heartbeat in the chart's peering object under the pod's name.
        peering = api.read(em.PEERINGS, None, "moe-operator")
        assert op.pod in (peering.get("status") or {}), peering
        # The live serving state reaches the status (the reader checked the peering first).
        await eventually(
            lambda: api.read(MOED, NS, "mixtral")["status"].get("queueDepth") == 2.0,
            message="live queue depth",
        )
        # Update, prune, scale, repair: every kind of write the operator has.
        await api.modify(MOED, NS, "mixtral", {"spec": {"networkPolicy": {"enabled": False}}})
        await eventually(lambda: children(api) == EXPECTED, message="NetworkPolicy pruned")
        await api.modify(MOED, NS, "mixtral", {"spec": {"replicas": 2}}, subresource="scale")
        await eventually(
            lambda: (
                api.read(em.RAYSERVICES, NS, "mixtral")["spec"]["rayClusterConfig"][
                    "workerGroupSpecs"
                ][0]["replicas"]
                == 2
            ),
            message="scaled RayService",
        )
        await kuberay.serve("mixtral")
        # Ready replicas come from the Serve app's own count (the live state) once it is read.
        stub.loads[(NS, "mixtral")].running_replicas = 2
        stub.loads[(NS, "mixtral")].target_replicas = 2
        await eventually(
            lambda: api.read(MOED, NS, "mixtral")["status"].get("readyReplicas") == 2,
            message="readyReplicas 2",
        )
        # Children an older operator version rendered under other names: pruned.
        await leftovers(api, "mixtral")
        await eventually(lambda: children(api) == EXPECTED, message="leftovers pruned")
        await api.destroy(em.SERVICES, NS, "mixtral-http")
        await eventually(lambda: api.find(em.SERVICES, NS, "mixtral-http"), message="repaired")
        await api.destroy(MOED, NS, "mixtral")
        assert children(api) == []
        assert "Traceback" not in op.output(), op.output()[-3000:]
        await op.stop()
        assert op.proc is not None and op.proc.returncode == 0, op.output()[-3000:]

        calls, grants = used(api, op.token), granted(objs)
        # Everything it called is granted; everything granted was called (least privilege).
        assert without(calls, grants) == {}
        assert without(grants, calls) == {}
    await stub.stop()


async def test_two_chart_replicas_never_act_at_once(
    api: em.ApiServer, tmp_path: pathlib.Path
) -> None:
    pods = ("moe-operator-7d9f-a", "moe-operator-7d9f-b")
    async with chart_operators(api, tmp_path, *pods) as (_, (first, second)):
        await first.start()
        await api.create(MOED, mixtral("before"))
        await eventually(lambda: api.find(em.RAYSERVICES, NS, "before"), message="first acts")
        # A second replica with the same command line (a scaled Deployment, or an upgrade
        # overlapping the old pod): both see an equal-priority peer and both pause.
        await second.start()
        # The first pauses on seeing the second; the second starts paused (kopf acts only
        # once its peering allows it) and sees the first.
        await eventually(lambda: "Pausing all operators" in first.output(), message="paused")
        await eventually(
            lambda: f"same priority: [<Peer {first.pod}" in second.output(),
            message="second sees the first",
        )
        mark = len(api.calls)
        await api.create(MOED, mixtral("during"))
        await asyncio.sleep(3)  # what a running operator needs for a create is well below this
        assert api.find(em.RAYSERVICES, NS, "during") is None
        tokens = {first.token, second.token}
        acted = [
            c
            for c in api.calls[mark:]
            if c.token in tokens and c.is_write and c.resource != "clusterkopfpeerings"
        ]
        assert acted == []
        # The second one goes away (SIGTERM, it leaves the peering): the first resumes.
        await second.stop()
        await eventually(lambda: api.find(em.RAYSERVICES, NS, "during"), message="resumed")
        during = [c for c in api.calls[mark:] if c.is_write and c.resource == "rayservices"]
        assert {c.token for c in during} == {first.token}
