"""One reconcile pass of a MoEDeployment: parse, plan, render, apply what differs, report.

A child is up to date when the rendered object, including its hash annotation (so a removed
field is noticed), is a subset of the live one; deciding that needs no API call (the kopf
indexes cache the children). Before a write the child is read once more, so a stale cache never
causes a needless write. Children that are no longer rendered are deleted; the status
subresource is patched only when the computed status differs from the live one. A child the API
server refuses is reported (ApplyRejected), not retried.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from moe_operator import eplb_advisor, kube, kuberay, settings, tracing
from moe_operator import status as status_mod
from moe_operator.api import (
    GROUP,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    PLURAL,
    VERSION,
    MoEDeploymentSpec,
    ObjectMeta,
)
from moe_operator.children import CHILDREN
from moe_operator.errors import describe
from moe_operator.planner import Plan, PlanningError, ReplicaLayout, plan
from moe_operator.render import Owner, RenderError, check_renderable, endpoints, render
from moe_operator.runtime import Obj, Runtime, plain
from moe_operator.workqueue import OwnerKey

log = logging.getLogger("moe_operator")

#: Annotation on every child: hash of the rendered object, so a removed field is noticed.
HASH_ANNOTATION = f"{GROUP}/applied-hash"
OWNER = kube.Resource(GROUP, VERSION, PLURAL)


@dataclass
class Outcome:
    """What one reconcile did."""

    writes: list[str] = field(default_factory=list)
    problem: status_mod.Problem | None = None
    error: kube.ApiError | None = None


@dataclass
class Context:
    """One pass over one MoEDeployment: what every step reads, and what they found."""

    rt: Runtime
    api: kube.Client
    body: Obj
    logger: Any
    outcome: Outcome = field(default_factory=Outcome)
    spec: MoEDeploymentSpec | None = None
    plan: Plan | None = None
    ray_service: Obj | None = None  # the live RayService, for the status
    written: MoEDeploymentSpec | None = None  # the spec as written (spec: the effective one)
    eplb_record: Obj | None = None  # status.eplbApplied while it holds (eplb_advisor)

    @property
    def meta(self) -> Obj:
        meta: Obj = self.body["metadata"]
        return meta

    @property
    def key(self) -> OwnerKey:
        return (self.meta["namespace"], self.meta["name"])

    def event(self, kind: str, reason: str, message: str) -> None:
        """An Event on the MoEDeployment (when the config posts events)."""
        if not self.rt.config.post_events:
            return
        target: Any = {
            "apiVersion": self.body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": self.body.get("kind", "MoEDeployment"),
            "metadata": self.meta,
        }
        kopf.event(kopf.Body(target), type=kind, reason=reason, message=message[:1024])


def _hash(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """The rendered object with its hash annotation."""
    out = plain(obj)
    annotations = out["metadata"].setdefault("annotations", {})
    annotations.pop(HASH_ANNOTATION, None)
    annotations[HASH_ANNOTATION] = _hash(out)
    return out


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of `want` is in `have` with the same value (lists elementwise)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and is_subset(v, have[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    return bool(want == have)


def parse(body: Obj) -> tuple[MoEDeploymentSpec | None, Plan | None, status_mod.Problem | None]:
    """Effective spec and plan, or the problem that stops them (InvalidSpec / PlanFailed /
    RenderFailed). Effective: with EPLB on when the operator applied it (status.eplbApplied)."""
    written, problem = parse_written(body)
    if written is None:
        return None, None, problem
    return plan_effective(written, eplb_advisor.applied(written, body.get("status")))


def parse_written(body: Obj) -> tuple[MoEDeploymentSpec | None, status_mod.Problem | None]:
    """The spec as written, or why it is invalid."""
    try:
        ObjectMeta.model_validate({"name": body["metadata"]["name"]})
    except ValidationError as err:
        return None, status_mod.Problem("InvalidSpec", "; ".join(describe(err, "metadata")))
    try:
        return MoEDeploymentSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as err:
        return None, status_mod.Problem("InvalidSpec", "; ".join(describe(err, "spec")))


def plan_effective(
    written: MoEDeploymentSpec, eplb_record: Obj | None
) -> tuple[MoEDeploymentSpec, Plan | None, status_mod.Problem | None]:
    """The written spec with the operator's EPLB record applied, and its plan (or problem)."""
    spec = eplb_advisor.effective(written, eplb_record)
    try:
        check_renderable(spec)  # cluster-only constraints first: they are the real reason
    except RenderError as err:
        return spec, None, status_mod.Problem("RenderFailed", str(err))
    try:
        chosen = plan(spec)
    except PlanningError as err:
        return spec, None, status_mod.Problem("PlanFailed", str(err))
    return spec, chosen, None


def owner_of(body: Obj) -> Owner:
    meta = body["metadata"]
    return Owner(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=int(meta.get("generation") or 1),
    )


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile(rt: Runtime, body: Obj, logger: Any) -> Outcome:
    """One pass, traced: a `moe_operator.reconcile` span with its outcome (tracing.py)."""
    with tracing.reconcile_span(rt.tracer(), body["metadata"]) as span:
        outcome = await _reconcile(rt, body, logger)
        err = outcome.error
        tracing.record_outcome(
            span,
            outcome.writes,
            outcome.problem.reason if outcome.problem else None,
            err.status if err else None,
            err.reason if err else None,
        )
    return outcome


async def _reconcile(rt: Runtime, body: Obj, logger: Any) -> Outcome:
    """One pass: apply what differs, delete what is no longer rendered, report status."""
    if body["metadata"].get("deletionTimestamp"):
        return Outcome()  # going away: garbage collection removes the children
    ctx = Context(rt, rt.api(), body, logger)
    outcome, meta, key = ctx.outcome, ctx.meta, ctx.key
    ctx.written, outcome.problem = parse_written(body)
    if ctx.written is not None:
        ctx.eplb_record = eplb_advisor.applied(ctx.written, body.get("status"))
        ctx.spec, ctx.plan, outcome.problem = plan_effective(ctx.written, ctx.eplb_record)
        if outcome.problem is None and ctx.eplb_record is None:
            _apply_eplb(ctx)
    children: list[Obj] = []
    if outcome.problem is None:
        assert ctx.spec is not None and ctx.plan is not None
        try:
            children = [with_hash(o) for o in render(owner_of(body), ctx.spec, ctx.plan)]
        except RenderError as err:
            outcome.problem = status_mod.Problem("RenderFailed", str(err))
    live = _live_children(ctx)
    try:
        for obj in children:
            ckey = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
            current = live.pop(ckey, None)
            if current is None or not is_subset(obj, current):
                try:
                    current = await _apply_if_needed(ctx, obj)
                except kube.ApiError as err:
                    if not err.rejected:
                        raise
                    # The server refuses the object itself: the same apply would fail forever.
                    outcome.problem = rejected(obj, err)
                    break
            if obj["kind"] == "RayService":
                ctx.ray_service = current
        if outcome.problem is None:
            for (api_version, kind, name), _stale in sorted(live.items()):
                res = kube.KINDS[(api_version, kind)]
                if await ctx.api.delete(res, meta["namespace"], name):
                    outcome.writes.append(f"delete {kind}/{name}")
                    ctx.event("Normal", "Deleted", f"deleted {kind} {name}: no longer rendered")
        await _report(ctx)
    except kube.ApiError as err:
        outcome.error = err
        logger.warning(f"reconcile stopped by the API: {err}")
    problem = outcome.problem
    if problem is not None:
        ctx.event("Warning", problem.reason, problem.message)
    log.info(
        "reconciled %s/%s generation %s: %s",
        *key,
        meta.get("generation"),
        ", ".join(outcome.writes) or "no changes",
        extra={
            "moe_owner": f"{key[0]}/{key[1]}",
            "moe_writes": list(outcome.writes),
            "moe_problem": problem.reason if problem else None,
            "moe_error": str(outcome.error) if outcome.error else None,
        },
    )
    return outcome


def _apply_eplb(ctx: Context) -> None:
    """Under eplb.mode auto with apply: turn EPLB on once the advisor recommends it, with the
    recommended redundant experts or as many as the current layout holds: applying never
    changes the replica's size or split (more copies can need more GPUs; that is the user's
    call). When none fits, say so and leave EPLB off."""
    assert ctx.written is not None and ctx.plan is not None
    poller = ctx.rt.poller
    live = poller.status.get(ctx.key) if poller is not None else None
    if not eplb_advisor.applies(ctx.written) or live is None:
        return
    new = eplb_advisor.record(live.eplb_advice, live.expert_imbalance, _now())
    if new is None:
        return
    recommended = int(new["redundantExperts"])
    ep = ctx.plan.expert_parallel_size
    for count in range(recommended, 0, -ep):  # each keeps experts + count divisible by EP
        candidate = {**new, "redundantExperts": count}
        spec, chosen, problem = plan_effective(ctx.written, candidate)
        if problem is None and chosen is not None and _same_layout(chosen, ctx.plan):
            ctx.spec, ctx.plan, ctx.eplb_record = spec, chosen, candidate
            fewer = (
                ""
                if count == recommended
                else f" ({recommended} recommended; the layout holds {count})"
            )
            ctx.event(
                "Normal",
                "EPLBApplied",
                f"turned EPLB on with redundantExperts {count}{fewer} (sustained expert "
                f"imbalance {new['imbalance']}); the Serve application rolls out with it",
            )
            return
    ctx.event(
        "Warning",
        "EPLBNotApplied",
        f"EPLB with redundantExperts {recommended} does not fit the current layout "
        f"({ctx.plan.gpus_per_replica} GPUs per replica, EP{ep}); set "
        "spec.parallelism.eplb.enabled and redundantExperts yourself if a larger replica is "
        "acceptable",
    )


def _same_layout(a: Plan, b: Plan) -> bool:
    """The same replica size and split (what applying EPLB must not change)."""
    return all(getattr(a, name) == getattr(b, name) for name in ReplicaLayout.model_fields)


def rejected(obj: Obj, err: kube.ApiError) -> status_mod.Problem:
    """The problem of a child the API server refused (kube.ApiError.rejected), with its words."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    return status_mod.Problem(
        "ApplyRejected",
        f"the API server rejected {kind} {name} (HTTP {err.status}): {err.message}. "
        + kuberay.rejection_hint(kind),
    )


def _live_children(ctx: Context) -> dict[tuple[str, str, str], Obj]:
    """Cached children of this owner (only those it controls, by uid)."""
    uid = ctx.meta["uid"]
    out: dict[tuple[str, str, str], Obj] = {}
    for child in CHILDREN:
        for obj in ctx.rt.cached(child.index_id, ctx.key):
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if any(r.get("uid") == uid and r.get("controller") for r in refs):
                out[(*child.key, obj["metadata"]["name"])] = obj
    return out


async def _apply_if_needed(ctx: Context, obj: Obj) -> Obj | None:
    """Re-read the child (the cache may lag our own writes); apply only if it still differs."""
    res = kube.resource_of(obj)
    meta = obj["metadata"]
    fresh = await ctx.api.get(res, meta["namespace"], meta["name"])
    if fresh is not None and is_subset(obj, fresh):
        return fresh
    result = await ctx.api.apply(obj, field_manager=settings.FIELD_MANAGER)
    verb = "created" if fresh is None else "updated"
    ctx.outcome.writes.append(f"{verb[:-1]} {obj['kind']}/{meta['name']}")
    ctx.event("Normal", verb.capitalize(), f"{verb} {obj['kind']} {meta['name']}")
    return result


def _status(ctx: Context, previous: Obj | None) -> Obj:
    """The status this pass computes, given the live one."""
    owner, spec, chosen, problem = owner_of(ctx.body), ctx.spec, ctx.plan, ctx.outcome.problem
    poller = ctx.rt.poller
    inputs = status_mod.Inputs(
        name=owner.name,
        generation=owner.generation,
        now=_now(),
        problem=problem,
        plan=chosen.status_summary() if chosen is not None else None,
        nodes_per_replica=chosen.nodes_per_replica if chosen is not None else 1,
        desired_replicas=chosen.initial_replicas if chosen is not None else None,
        selector=(
            f"{LABEL_DEPLOYMENT}={owner.name},{LABEL_COMPONENT}=engine"
            if chosen is not None
            else None
        ),
        endpoints=endpoints(owner, spec) if spec is not None and problem is None else None,
        ray_service=ctx.ray_service,
        ray_service_name=owner.name,
        live=poller.status.get(ctx.key) if poller is not None else None,
        upgrade_strategy=spec.upgrade_strategy if spec is not None else "NewCluster",
        tool_calling=bool(chosen is not None and chosen.tool_call_parser),
        reasoning=bool(chosen is not None and chosen.reasoning_parser),
        eplb_auto=bool(
            ctx.written is not None
            and chosen is not None
            and ctx.written.parallelism.eplb.mode == "auto"
            and not ctx.written.parallelism.eplb.enabled
            and chosen.expert_parallel_size > 1
        ),
        eplb_applied=ctx.eplb_record,
    )
    return status_mod.compute(inputs, previous)


async def _report(ctx: Context) -> None:
    """Patch the status subresource when the computed status differs from the live one."""
    meta = ctx.meta
    previous = ctx.body.get("status")
    if status_mod.status_patch(previous, _status(ctx, previous)) is None:
        return
    # The cached owner may lag our own last status write: decide on a fresh read.
    fresh = await ctx.api.get(OWNER, meta["namespace"], meta["name"])
    if fresh is None or fresh["metadata"].get("uid") != meta["uid"]:
        return
    if fresh["metadata"].get("generation") != meta.get("generation"):
        return  # a newer spec is on its way; its own reconcile reports
    previous = fresh.get("status")
    patch = status_mod.status_patch(previous, _status(ctx, previous))
    if patch is None:
        return
    await ctx.api.patch_status(OWNER, meta["namespace"], meta["name"], patch)
    ctx.outcome.writes.append("patch status")
    _announce_eplb(ctx, previous, patch)


def _announce_eplb(ctx: Context, previous: Obj | None, patch: Obj) -> None:
    """An Event when the EPLB recommendation turns on (the condition carries it after)."""

    def recommended(status: Obj | None) -> Obj | None:
        for c in (status or {}).get("conditions") or []:
            if c.get("type") == status_mod.EPLB_CONDITION and c.get("status") == "True":
                return c
        return None

    now = recommended(patch)
    if now is not None and recommended(previous) is None:
        ctx.event("Normal", "EPLBRecommended", str(now.get("message", "")))
