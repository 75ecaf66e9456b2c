"""Test harness: the API emulator's kinds, the operator run in-process, a KubeRay stand-in.

The operator is the real one (`moe_operator.handlers` under `kopf.operator`), talking HTTP to
`ApiServer` (kmock's emulator extended in emulator.py). It logs in through its own login
handler from a kubeconfig that points at the emulator. KubeRay cannot run here: `KubeRay`
below writes the RayService status the way KubeRay's controller would (the only stand-in).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import kopf
import kube_emulator as em
import yaml

from moe_operator.api import GROUP, KIND, PLURAL, VERSION

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds"

MOED = em.moedeployments_kind(GROUP, VERSION, PLURAL, KIND)
KINDS = [
    em.CRDS,
    em.NAMESPACES,
    em.EVENTS,
    em.NEW_EVENTS,
    em.SERVICES,
    em.PDBS,
    em.NETPOLS,
    em.RAYSERVICES,
    em.WEBHOOKS,
    em.PEERINGS,
    MOED,
]
NS = "llm"


def example(name: str) -> dict[str, Any]:
    """A manifest from manifests/examples/ (the lead's, shared with the CLI and the docs)."""
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def mixtral(name: str = "mixtral", namespace: str = NS) -> dict[str, Any]:
    body = copy.deepcopy(example("mixtral-8x7b-2xa100-40gb.yaml"))
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


async def eventually(
    check: Callable[[], Any], *, timeout: float = 30.0, message: str = "condition"
) -> Any:
    """Poll until `check()` is truthy (a liveness bound, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}; last value: {last!r}")


class Reconciles(logging.Handler):
    """Collects the operator's "reconciled" log records (one per reconcile pass)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.child_events: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "moe_owner"):
            self.records.append(record)
        if hasattr(record, "moe_child"):
            self.child_events.append(record)

    def writes(self, since: int = 0) -> list[list[str]]:
        """What each reconcile pass from `since` on wrote."""
        return [list(getattr(r, "moe_writes", [])) for r in self.records[since:]]

    def count(self, owner: str | None = None) -> int:
        return sum(1 for r in self.records if owner in (None, getattr(r, "moe_owner", None)))


class Operator:
    """The operator, started, stopped or crashed in-process, on its own thread and event loop.

    kopf treats every task created in its loop after its start as its own and cancels it at
    exit, so it must not share the loop with the emulator and the test (as in production, where
    the API server is another process).
    """

    def __init__(self, api: em.ApiServer) -> None:
        self.api = api
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_flag: threading.Event | None = None
        self.runs = 0
        self.memo: kopf.Memo | None = None
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """True while the operator's reconcile work queue has work."""
        rt = getattr(self.memo, "moe_runtime", None)
        if rt is None:
            return False
        try:
            return bool(
                rt.dirty or rt.workers or any(lock.locked() for lock in list(rt.locks.values()))
            )
        except RuntimeError:  # changed size while read from this thread: it is busy
            return True

    async def start(self) -> None:
        assert self.thread is None, "already running"
        self.stop_flag = threading.Event()
        self.memo = kopf.Memo()
        ready = threading.Event()
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop

            async def main() -> None:
                self.task = asyncio.current_task()
                started.set()
                await kopf.operator(
                    clusterwide=True,
                    standalone=True,
                    stop_flag=self.stop_flag,
                    ready_flag=ready,
                    memo=self.memo,
                )

            try:
                loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            except BaseException as err:  # surfaced by stop()
                self.error = err
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self.thread = threading.Thread(target=run, name=f"operator-{self.runs}", daemon=True)
        self.thread.start()
        self.runs += 1
        await asyncio.to_thread(started.wait, 30)
        if not await asyncio.to_thread(ready.wait, 30):
            raise AssertionError("the operator did not become ready")

    async def _join(self) -> None:
        assert self.thread is not None
        await asyncio.to_thread(self.thread.join, 60)
        assert not self.thread.is_alive(), "the operator did not stop"
        self.thread = None
        self.task = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    async def stop(self) -> None:
        """Graceful stop (SIGTERM-like)."""
        if self.thread is None:
            return
        assert self.stop_flag is not None
        self.stop_flag.set()
        await self._join()

    async def crash(self) -> None:
        """Die at once: the API answers nothing more from this process, then it is gone."""
        if self.thread is None:
            return
        self.api.frozen = True
        assert self.loop is not None and self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        try:
            await self._join()
        finally:
            self.api.frozen = False


class KubeRay:
    """Writes RayService status as KubeRay's controller does (KubeRay cannot run here)."""

    def __init__(self, api: em.ApiServer) -> None:
        self.api = api

    def get(self, name: str, namespace: str = NS) -> dict[str, Any] | None:
        return self.api.find(em.RAYSERVICES, namespace, name)

    async def serve(
        self, name: str, namespace: str = NS, *, ready_workers: int | None = None
    ) -> None:
        """The RayService's current generation is up: cluster ready, app RUNNING."""
        rs = self.api.read(em.RAYSERVICES, namespace, name)
        group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        workers = ready_workers
        if workers is None:
            workers = int(group.get("replicas", 1)) * int(group.get("numOfHosts", 1))
        status = {
            "observedGeneration": rs["metadata"]["generation"],
            "serviceStatus": "Running",
            "numServeEndpoints": max(workers, 1),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "NonZeroServeEndpoints",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
                {
                    "type": "UpgradeInProgress",
                    "status": "False",
                    "reason": "NoPendingCluster",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
            ],
            "activeServiceStatus": {
                "rayClusterName": f"{name}-raycluster-{rs['metadata']['generation']}",
                "applicationStatuses": {"moe": {"status": "RUNNING"}},
                "rayClusterStatus": {
                    "readyWorkerReplicas": workers,
                    "availableWorkerReplicas": workers,
                    "desiredWorkerReplicas": workers,
                },
            },
        }
        await self.api.modify(
            em.RAYSERVICES, namespace, name, {"status": status}, subresource="status"
        )

    async def fail_app(self, name: str, namespace: str = NS, message: str = "boom") -> None:
        rs = self.api.read(em.RAYSERVICES, namespace, name)
        status = copy.deepcopy(rs.get("status") or {})
        status.setdefault("activeServiceStatus", {})["applicationStatuses"] = {
            "moe": {"status": "DEPLOY_FAILED", "message": message}
        }
        await self.api.modify(
            em.RAYSERVICES, namespace, name, {"status": status}, subresource="status"
        )
