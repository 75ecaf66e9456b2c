"""Run a MoEDeployment locally (`moectl up`): the same spec, planner and app config as a cluster.

Cluster-only fields (image, node selector, tolerations, GPU resources, upgrade strategy, network
policy, secrets) mean nothing on a laptop: they are ignored with a note. The model source must be a
local path or `tiny://<arch>` (a tiny random checkpoint made on the spot and cached).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_operator.api import MoEDeployment, MoEDeploymentSpec
from moe_operator.planner import Plan, PlanningError, plan
from moe_operator.render import app_config
from moe_serving.config import AppConfig

TINY_ARCHES = ("gemma4", "qwen3_moe", "mixtral")


def moe_home() -> Path:
    """Where local runs keep checkpoints and logs ($MOE_HOME, default ~/.cache/moe-operator)."""
    return Path(os.environ.get("MOE_HOME") or Path.home() / ".cache" / "moe-operator")


@dataclass
class LocalRun:
    """Everything `moectl up` needs, resolved from a MoEDeployment."""

    deployment: MoEDeployment
    model_dir: Path
    plan: Plan
    app: AppConfig
    notes: list[str] = field(default_factory=list)


def tiny_model_dir(arch: str, seed: int = 0) -> Path:
    """Cache folder of the tiny checkpoint `tiny://<arch>`."""
    return moe_home() / "models" / f"tiny-{arch}-seed{seed}"


def resolve_model(spec: MoEDeploymentSpec, *, make: bool = True) -> Path:
    """The local checkpoint folder for the spec's source, making a tiny one if asked."""
    source = spec.model.source
    if source.startswith("tiny://"):
        arch, _, seed_text = source.removeprefix("tiny://").partition("?seed=")
        if arch not in TINY_ARCHES:
            raise PlanningError(
                f"spec.model.source {source!r}: tiny models exist for {', '.join(TINY_ARCHES)}"
            )
        seed = int(seed_text or 0)
        out = tiny_model_dir(arch, seed)
        if make:
            from moe_serving.tinymodel import make_model

            make_model(arch, out, seed=seed)  # type: ignore[arg-type,unused-ignore]
        return out
    if source.startswith("file://"):
        source = source.removeprefix("file://")
    if source.startswith(("hf://", "s3://", "pvc://")):
        raise PlanningError(
            f"spec.model.source {source!r} needs a cluster (no model hub or object store here); "
            "for a local run pass a checkpoint folder with --model or use tiny://gemma4"
        )
    path = Path(source).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise PlanningError(f"spec.model.source: {path} has no config.json (not a checkpoint)")
    return path


def cluster_only_notes(spec: MoEDeploymentSpec) -> list[str]:
    """Fields a local run ignores, so the user knows."""
    notes = []
    defaults = MoEDeploymentSpec.model_validate({"model": spec.model.to_wire()})
    if spec.image != defaults.image:
        notes.append("spec.image is ignored locally (the installed packages serve)")
    if spec.resources.node_selector or spec.resources.tolerations:
        notes.append("spec.resources.nodeSelector/tolerations are ignored locally")
    if spec.resources.accelerator != "CPU":
        notes.append(
            f"spec.resources.accelerator {spec.resources.accelerator} is replaced by CPU locally"
        )
    if spec.network_policy.enabled:
        notes.append("spec.networkPolicy is ignored locally")
    if spec.model.token_secret_ref:
        notes.append("spec.model.tokenSecretRef is ignored locally")
    if spec.upgrade_strategy != defaults.upgrade_strategy:
        notes.append("spec.upgradeStrategy is ignored locally")
    return notes


def local_spec(
    spec: MoEDeploymentSpec, model_override: str | None = None, nodes: int | None = None
) -> MoEDeploymentSpec:
    """The spec as a local run uses it: CPU ranks, and the --model override if given.

    `nodes` (moectl up --nodes N): one replica as N data-parallel ranks with the experts
    sharded over them (DP N x EP N, TP 1), one rank per node of a local multi-node cluster.
    """
    wire = spec.to_wire()
    if model_override:
        wire["model"]["source"] = str(Path(model_override).expanduser().resolve())
        wire["model"].pop("architecture", None)
    resources = wire.setdefault("resources", {})
    par = wire.setdefault("parallelism", {})
    if resources.get("accelerator") != "CPU":
        resources["accelerator"] = "CPU"
        resources["gpusPerNode"] = 2
        resources.pop("nodeSelector", None)
        resources.pop("tolerations", None)
        resources["memory"] = "8Gi"
        # A GPU layout's attention DP is not what a laptop should run by default.
        if par.get("dataParallelSize") not in (None, "auto", 1):
            par["dataParallelSize"] = 1
    # GPU-only all-to-all kernels (DeepEP, ...) are not available on the CPU.
    par["all2allBackend"] = "auto"
    if nodes is not None:
        if nodes < 1:
            raise ValueError(f"--nodes {nodes}: give 1 or more nodes")
        par.update(tensorParallelSize=1, dataParallelSize=nodes, expertParallel=True)
        resources.update(gpusPerNode=1, maxNodesPerReplica=nodes)
    cores = resources.get("gpusPerNode", 2)
    if isinstance(par.get("tensorParallelSize"), int) and par["tensorParallelSize"] > cores:
        par["tensorParallelSize"] = cores
    return MoEDeploymentSpec.model_validate(wire)


def prepare(
    deployment: MoEDeployment,
    *,
    model_override: str | None = None,
    tracing_overrides: dict[str, Any] | None = None,
    nodes: int | None = None,
) -> LocalRun:
    """Resolve the checkpoint, plan on the CPU and build the app config."""
    notes = cluster_only_notes(deployment.spec)
    spec = local_spec(deployment.spec, model_override, nodes)
    model_dir = resolve_model(spec)
    config = json.loads((model_dir / "config.json").read_text())
    the_plan = plan(spec, model_config=config)
    app = app_config(
        deployment.metadata.name,
        spec,
        the_plan,
        model_path=str(model_dir),
        tracing_overrides=tracing_overrides,
    )
    return LocalRun(deployment=deployment, model_dir=model_dir, plan=the_plan, app=app, notes=notes)
