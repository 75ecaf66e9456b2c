"""Test harness: the API emulator's kinds, the operator run in-process, a KubeRay stand-in.

The operator is the real one (`moe_operator.handlers` under `kopf.operator`), talking HTTP to
`ApiServer` (kmock's emulator extended in kube_emulator.py). It logs in through its own login
handler from a kubeconfig that points at the emulator. KubeRay cannot run here: `KubeRay`
below writes the RayService status the way KubeRay's controller would (the only stand-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import pathlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kmock
import kopf
import pytest
import yaml

from moe_operator import crdgen
from moe_operator.api import GROUP, KIND, PLURAL, VERSION

from . import kube_emulator as em
from .k8s_schema import load_crd_schema
from .ports import free_port

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
        self.crashing = False

    @property
    def busy(self) -> bool:
        """True while the operator's reconcile work queue has work."""
        rt = getattr(self.memo, "moe_runtime", None)
        if rt is None:
            return False
        try:
            queue = rt.queue
            return bool(
                queue.dirty
                or queue.workers
                or any(lock.locked() for lock in list(queue.locks.values()))
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
            asyncio.set_event_loop(loop)
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
            except RuntimeError:
                if not self.crashing:  # "Event loop stopped before Future completed"
                    raise
            except BaseException as err:  # surfaced by stop()
                self.error = err
            finally:
                # Whatever kopf left behind stops here too (as when a process exits).
                # Some swallow one cancellation (kopf's retries): cancel again, a bounded number
                # of rounds; a dead process would not wait for them at all.
                for _ in range(20):
                    leftovers = asyncio.all_tasks(loop)
                    if not leftovers:
                        break
                    for task in leftovers:
                        task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        loop.run_until_complete(asyncio.wait(leftovers, timeout=0.25))
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), timeout=1))
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
        assert self.loop is not None
        self.crashing = True
        self.loop.call_soon_threadsafe(self.loop.stop)  # no graceful anything
        try:
            await self._join()
        finally:
            self.crashing = False
            self.api.frozen = False
            # kopf waits for its threading stop flag in an executor thread; with the loop gone
            # nothing sets it, and the interpreter would wait for that thread forever at exit.
            if self.stop_flag is not None:
                self.stop_flag.set()


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
            # Promoted: KubeRay empties the pending status (reconcilePromotionAndServingStatus).
            "pendingServiceStatus": None,
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

    async def fail_first_rollout(
        self, name: str, deployment_error: str, namespace: str = NS
    ) -> None:
        """A first rollout whose engine replicas fail to start, as KubeRay reports it: the new
        cluster is still the pending one (no active cluster until it is ready), so the Serve
        application's status, copied from the dashboard with its deployments' messages, is under
        pendingServiceStatus; Ready stays False/Initializing (rayservice_controller.go:
        calculateStatus, getAndCheckServeStatus, calculateConditions)."""
        rs = self.api.read(em.RAYSERVICES, namespace, name)
        initializing = "RayService is initializing"
        status = {
            "observedGeneration": rs["metadata"]["generation"],
            "conditions": [
                {
                    "type": kind,
                    "status": "False",
                    "reason": "Initializing",
                    "message": initializing,
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
                for kind in ("Ready", "UpgradeInProgress")
            ],
            "pendingServiceStatus": {
                "rayClusterName": f"{name}-raycluster-abcde",
                "applicationStatuses": {
                    "moe": {
                        "status": "DEPLOY_FAILED",
                        "message": "Failed to update the deployments ['LLMEngine'].",
                        "serveDeploymentStatuses": {
                            "Ingress": {"status": "HEALTHY", "message": ""},
                            "LLMEngine": {"status": "DEPLOY_FAILED", "message": deployment_error},
                        },
                    }
                },
            },
        }
        await self.api.modify(
            em.RAYSERVICES, namespace, name, {"status": status}, subresource="status"
        )

    async def time_out_initializing(self, name: str, namespace: str = NS) -> None:
        """KubeRay's initializing timeout (the ray.io/initializing-timeout annotation): Ready
        False with reason InitializingTimeout, a terminal state
        (markFailedOnInitializingTimeout)."""
        rs = self.api.read(em.RAYSERVICES, namespace, name)
        status = copy.deepcopy(rs.get("status") or {})
        status["observedGeneration"] = rs["metadata"]["generation"]
        status["conditions"] = [
            {
                "type": "Ready",
                "status": "False",
                "reason": "InitializingTimeout",
                "message": "RayService failed to become ready within the configured timeout "
                "of 10m0s. Time spent initializing: 10m0.5s",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ]
        status.setdefault("activeServiceStatus", {})["rayClusterName"] = ""
        status.setdefault("pendingServiceStatus", {})["rayClusterName"] = ""
        await self.api.modify(
            em.RAYSERVICES, namespace, name, {"status": status}, subresource="status"
        )


def kuberay_crd(file: str, release: str | None = None) -> pathlib.Path | None:
    """A KubeRay CRD file from ../shared/kuberay-crds/ (None when the folder is absent)."""
    folder = KUBERAY_CRDS / "versions" / release if release else KUBERAY_CRDS
    if release and not folder.is_dir():
        pytest.skip(f"KubeRay {release} CRDs not found at {folder} (../shared/kuberay-crds)")
    path = folder / file
    return path if path.is_file() else None


async def retrying(action: Callable[[], Awaitable[Any]], *, timeout: float = 30.0) -> Any:
    """Retry a client write that fails while the webhook's operator restarts (as kubectl would)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await action()
        except em.ApiError as err:
            if err.status < 500 or loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def emulated_cluster(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, *, kuberay: str | None = None
) -> AsyncIterator[em.ApiServer]:
    """The emulator on a loopback port, a kubeconfig pointing at it, the operator's env.

    MoEDeployments get our generated CRD's schema; RayServices get KubeRay's (the newest in
    ../shared/kuberay-crds/, or release `kuberay`, e.g. "v1.4.2"), when that folder exists.
    """
    server = em.ApiServer()
    schemas = {MOED.key: crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]}
    rayservice_crd = kuberay_crd("ray.io_rayservices.yaml", kuberay)
    if rayservice_crd is not None:
        schemas[em.RAYSERVICES.key] = load_crd_schema(rayservice_crd)
    for kind in KINDS:
        server.register(kind, schemas.get(kind.key))
    async with server, kmock.Server(server, host="127.0.0.1", port=0) as srv:
        kubeconfig = tmp_path / f"kubeconfig-{srv.port}"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emu", "cluster": {"server": str(srv.url).rstrip("/")}}],
                    "users": [{"name": "op", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "op"}}],
                    "current-context": "emu",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_ENABLED", "true")
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_LOCAL", "true")
        # One webhook port per cluster: a restarted operator serves where it was registered.
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_PORT", str(free_port()))
        # Short delays keep the tests fast; the logic is the same as with the defaults.
        monkeypatch.setenv("MOE_OPERATOR_RETRY_DELAY", "0.2")
        monkeypatch.setenv("MOE_OPERATOR_WAIT_DELAY", "0.5")
        # No live-state reads unless a test serves them (test_live_status.py).
        monkeypatch.setenv("MOE_OPERATOR_LIVE_STATE_INTERVAL", "0")
        try:
            yield server
        finally:
            await server.drop_watches()  # let the server close without waiting on open streams
