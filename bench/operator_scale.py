"""Operator scale: converge N MoEDeployments against the Kubernetes API emulator.

The emulator is the one the operator's tests use (tests/support/kube_emulator.py: kmock's
emulator with server-side apply, resourceVersion/generation, subresources, GC), served on
127.0.0.1 in this process. The operator is the real one, `kopf run -m moe_operator.handlers`,
in its own subprocess (so its RSS is its own), logging in from a kubeconfig that points at the
emulator. KubeRay cannot run here; the tests' stand-in (`operator_harness.KubeRay`) writes the
RayService status as KubeRay would.

This module is written against the current interface of tests/support/ (ApiServer, KINDS,
MOED, RAYSERVICES/SERVICES/PDBS, `operator_calls`, `KubeRay.serve`, `mixtral`). If those
change, this is the place to follow them.

Per N (1, 50, 200 by default):
* converge: create N MoEDeployments at once; time until every one has its children and a status
  for generation 1, and the operator has gone quiet; the operator's API calls in that window;
* ready: KubeRay reports every RayService serving; time until every MoEDeployment is Ready;
* no-op: restart the operator; every MoEDeployment is reconciled again (kopf's resume) with an
  unchanged spec; the operator's writes in that phase per reconcile (must be 0);
* memory: the operator process's RSS at the end.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kmock
import psutil
import yaml

from moe_operator.api import LABEL_DEPLOYMENT
from tests.support import kube_emulator as em
from tests.support.operator_harness import KINDS, MOED, KubeRay, mixtral

ROOT = Path(__file__).resolve().parents[1]

NS = "bench"
CHILDREN_PER_OWNER = 4  # RayService, HTTP and gRPC Services, PodDisruptionBudget
RECONCILED = re.compile(r"reconciled (\S+)/(\S+) generation (\S+): (.*)$")
#: kopf re-registers its own objects at start-up; these are not reconcile writes.
KOPF_OWN = ("validatingwebhookconfigurations", "clusterkopfpeerings")


@dataclass
class ScalePoint:
    """Measurements at one N."""

    n: int
    converge_s: float | None = None
    converge_calls: int = 0
    converge_calls_by_verb: dict[str, int] = field(default_factory=dict)
    ready_s: float | None = None
    ready_calls: int = 0
    noop_reconciles: int = 0
    noop_writes: int = 0
    noop_writes_detail: list[str] = field(default_factory=list)
    operator_rss_bytes: int | None = None
    error: str | None = None

    @property
    def writes_per_noop_reconcile(self) -> float | None:
        if not self.noop_reconciles:
            return None
        return self.noop_writes / self.noop_reconciles

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["writes_per_noop_reconcile"] = self.writes_per_noop_reconcile
        return out


class OperatorProcess:
    """`kopf run -m moe_operator.handlers` in a subprocess, logging to a file."""

    def __init__(self, kubeconfig: Path, log_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            # kopf refuses to start with admission handlers but no webhook server; the local
            # webhook is plain HTTP on 127.0.0.1, and the emulator calls it on every write.
            MOE_OPERATOR_WEBHOOK_ENABLED="true",
            MOE_OPERATOR_WEBHOOK_LOCAL="true",
            MOE_OPERATOR_WEBHOOK_PORT="0",
            # No serving pods exist behind the emulated RayServices: nothing to read live.
            MOE_OPERATOR_LIVE_STATE_INTERVAL="0",
            PYTHONUNBUFFERED="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    "--standalone",
                    "--all-namespaces",
                    "--log-format=plain",
                    "-m",
                    "moe_operator.handlers",
                ],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def rss(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            proc = psutil.Process(self.proc.pid)
            return int(proc.memory_info().rss) + sum(
                int(c.memory_info().rss) for c in proc.children(recursive=True)
            )
        except psutil.NoSuchProcess:
            return None

    def reconciles(self) -> list[tuple[str, str]]:
        """(owner, what was written) of each reconcile logged since the last start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            match = RECONCILED.search(line)
            if match:
                out.append((f"{match[1]}/{match[2]}", match[4]))
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        """SIGTERM (kopf's graceful stop), then SIGKILL; waits without blocking the emulator."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the emulator keeps answering the shutdown's calls
        self.proc = None


def _kubeconfig(path: Path, url: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": url.rstrip("/")}}],
                "users": [{"name": "op", "user": {"token": "bench-token"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "op"}}],
                "current-context": "emu",
            }
        )
    )


def _items(api: Any, kind: Any, ns: str) -> list[dict[str, Any]]:
    """Stored objects of a kind (the emulator renamed `objects` to `list_items`; accept both)."""
    lister = getattr(api, "list_items", None) or api.objects
    items: list[dict[str, Any]] = lister(kind, ns)
    return items


def _converged(api: Any, names: list[str]) -> bool:
    owners = {o["metadata"]["name"]: o for o in _items(api, MOED, NS)}
    counts: collections.Counter[str] = collections.Counter()
    for kind in (em.RAYSERVICES, em.SERVICES, em.PDBS):
        for obj in _items(api, kind, NS):
            owner = (obj["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT, "")
            counts[owner] += 1
    for name in names:
        status = (owners.get(name) or {}).get("status") or {}
        if status.get("observedGeneration") != 1 or counts[name] < CHILDREN_PER_OWNER:
            return False
    return True


def _ready(api: Any, names: list[str]) -> bool:
    owners = {o["metadata"]["name"]: o for o in _items(api, MOED, NS)}
    for name in names:
        conditions = ((owners.get(name) or {}).get("status") or {}).get("conditions") or []
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return False
    return True


async def _until(check: Any, timeout_s: float, what: str, op: OperatorProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if not op.alive():
            raise RuntimeError(f"the operator exited while waiting for {what}; see {op.log_path}")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")


async def _quiet(api: Any, quiet_s: float, timeout_s: float) -> None:
    """Wait until no new API call has arrived for `quiet_s` (the operator is idle)."""
    deadline = time.monotonic() + timeout_s
    count, since = len(api.calls), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if len(api.calls) != count:
            count, since = len(api.calls), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def _operator_calls(api: Any, mark: int) -> list[Any]:
    return [c for c in api.operator_calls(mark) if c.resource not in KOPF_OWN]


def _say(message: str) -> None:
    print(
        f"    [operator-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


async def measure(
    n: int, workdir: Path, *, quiet_s: float = 1.0, timeout_s: float = 600.0
) -> ScalePoint:
    """Converge, serve, restart: one ScalePoint for N MoEDeployments (fresh emulator)."""
    point = ScalePoint(n)
    api = em.ApiServer()
    for kind in KINDS:
        api.register(kind)
    await api.create(em.NAMESPACES, {"metadata": {"name": NS}})
    names = [f"moe-{i:04d}" for i in range(n)]
    async with api, kmock.Server(api, host="127.0.0.1", port=0) as srv:
        kubeconfig = workdir / f"kubeconfig-{n}"
        _kubeconfig(kubeconfig, str(srv.url))
        op = OperatorProcess(kubeconfig, workdir / f"operator-{n}.log")
        try:
            _say(f"N={n}: starting the operator")
            op.start()
            # Started and listening: its first watch requests have arrived.
            await _until(lambda: len(api.operator_calls()) > 0, 120, "operator start", op)
            await _quiet(api, quiet_s, 60)
            mark = len(api.calls)
            _say(f"N={n}: creating {n} MoEDeployments")
            t0 = time.monotonic()
            for name in names:
                await api.create(MOED, mixtral(name, NS))
            await _until(lambda: _converged(api, names), timeout_s, f"{n} converged", op)
            point.converge_s = time.monotonic() - t0
            await _quiet(api, quiet_s, timeout_s)
            calls = _operator_calls(api, mark)
            point.converge_calls = len(calls)
            point.converge_calls_by_verb = dict(collections.Counter(c.verb for c in calls))

            mark = len(api.calls)
            _say(f"N={n}: converged in {point.converge_s:.1f}s; KubeRay reports serving")
            t0 = time.monotonic()
            kuberay = KubeRay(api)
            for name in names:
                await kuberay.serve(name, NS)
            await _until(lambda: _ready(api, names), timeout_s, f"{n} ready", op)
            point.ready_s = time.monotonic() - t0
            await _quiet(api, quiet_s, timeout_s)
            point.ready_calls = len(_operator_calls(api, mark))
            point.operator_rss_bytes = op.rss()

            # No-op: a restarted operator resumes every MoEDeployment with nothing to change.
            _say(f"N={n}: ready in {point.ready_s:.1f}s; restarting the operator (no-op)")
            await op.stop()
            mark = len(api.calls)
            op.start()
            await _until(lambda: len(op.reconciles()) >= n, timeout_s, "resume reconciles", op)
            await _quiet(api, quiet_s, timeout_s)
            point.noop_reconciles = len(op.reconciles())
            writes = [c for c in _operator_calls(api, mark) if c.is_write]
            point.noop_writes = len(writes)
            point.noop_writes_detail = sorted(
                {f"{c.verb} {c.resource}" for c in writes}  # what, if anything, was written
            )
        except (TimeoutError, RuntimeError) as err:
            point.error = str(err)
        finally:
            _say(f"N={n}: stopping")
            await op.stop()
            await api.drop_watches()
            _say(f"N={n}: done")
    return point


async def run_scale(ns: list[int], workdir: Path | None = None) -> list[ScalePoint]:
    out = []
    with tempfile.TemporaryDirectory(prefix="moe-bench-operator-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for n in ns:
            out.append(await measure(n, base))
    return out


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="operator scale against the API emulator")
    parser.add_argument("-n", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    points = asyncio.run(run_scale(args.n, args.workdir))
    print(json.dumps([p.as_dict() for p in points], indent=2))


if __name__ == "__main__":
    main()
