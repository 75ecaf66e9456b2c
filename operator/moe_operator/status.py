"""MoEDeployment status from what its children report (pure: no kopf, no client, no I/O).

Conditions follow Kubernetes conventions (metav1.Condition):

* Ready: the RayService serves (KubeRay's Ready condition, or serviceStatus Running on older
  KubeRay). It stays True during a rolling upgrade while the old cluster still serves.
* Progressing: True while the RayService has not yet reported our latest spec ready: KubeRay
  has not observed its new generation, an upgrade (pending cluster) is under way, or it was
  never ready. Reason Creating for a first rollout, Updating for a changed spec.
* Degraded: True when the spec cannot be deployed (InvalidSpec / PlanFailed / RenderFailed),
  the API server refused a rendered child (ApplyRejected, e.g. a KubeRay too old for the
  RayService), the Serve application failed (ServeApplicationFailed, with the replica's
  exception: moe_serving.failures; read from the active *and* the pending cluster's status,
  since KubeRay deploys a first rollout to a pending cluster; Progressing then turns False), or
  KubeRay gave up on the RayService (RayServiceFailed: its Ready reason InitializingTimeout or
  ValidationFailed).

* ToolCallingAvailable / ReasoningAvailable (only when the plan configures a tool-call /
  reasoning parser): False when the serving replicas run without it because the checkpoint's
  tokenizer cannot support the parser (reason ParserUnsupported, with the replica's words; they
  refuse requests that ask for tools with a 400), True once they report serving it, Unknown
  until the operator has read the app's live state.

`lastTransitionTime` only moves when a condition's status changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_operator.live import LiveStatus
from moe_serving.failures import FAILED_APP_STATES, app_failure

Obj = dict[str, Any]

#: Status keys this module owns; others (written by other actors) are left alone.
OWNED_KEYS = (
    "observedGeneration",
    "conditions",
    "replicas",
    "readyReplicas",
    "desiredReplicas",
    "selector",
    "plan",
    "endpoints",
    "queueDepth",
    "servingReplicas",
    "outputTokensPerSecond",
    "costPerMillionTokens",
    "expertImbalance",
    "eplbApplied",
    "rayService",
)

#: Reasons of KubeRay's Ready condition after which it stops trying: the RayService failed its
#: validation, or did not become ready within its initializing timeout (rayservice_types.go;
#: rayservice_controller.go, validateRayService / markFailedOnInitializingTimeout).
KUBERAY_TERMINAL_REASONS = frozenset({"ValidationFailed", "InitializingTimeout"})


@dataclass(frozen=True)
class Problem:
    """Why the spec cannot be deployed (reason is CamelCase, message says what to change)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Inputs:
    """Everything the status is computed from."""

    name: str
    generation: int
    now: str  # RFC 3339
    problem: Problem | None = None
    plan: Obj | None = None  # status.plan block
    nodes_per_replica: int = 1
    desired_replicas: int | None = None
    selector: str | None = None
    endpoints: Obj | None = None
    ray_service: Obj | None = None  # the live RayService, None when absent
    ray_service_name: str | None = None
    live: LiveStatus | None = None  # from the Serve app's live state; None when not read
    upgrade_strategy: str = "NewCluster"
    tool_calling: bool = False  # the plan configures a tool-call parser
    reasoning: bool = False  # the plan configures a reasoning parser
    eplb_auto: bool = False  # spec.parallelism.eplb.mode auto, EP > 1, EPLB off as written
    eplb_applied: Obj | None = None  # status.eplbApplied: EPLB on by the operator (eplb_advisor)


@dataclass(frozen=True)
class RayServiceView:
    """What the operator reads from a KubeRay RayService."""

    exists: bool
    observed: bool  # KubeRay has seen the current spec (status.observedGeneration)
    generation: int
    ready: bool
    upgrading: bool
    failed_apps: tuple[str, ...]
    ready_workers: int
    available_workers: int
    kuberay_failure: str | None = None  # KubeRay gave up: its Ready condition's reason/message

    @classmethod
    def read(cls, rs: Obj | None) -> RayServiceView:
        if rs is None:
            return cls(False, False, 0, False, False, (), 0, 0)
        meta = rs.get("metadata") or {}
        status = rs.get("status") or {}
        generation = int(meta.get("generation") or 1)
        observed_gen = status.get("observedGeneration")
        observed = observed_gen is not None and int(observed_gen) >= generation
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        if "Ready" in conditions:
            ready = conditions["Ready"].get("status") == "True"
        else:
            ready = status.get("serviceStatus") == "Running"
        pending = (status.get("pendingServiceStatus") or {}).get("rayClusterName")
        upgrading = bool(pending) or (
            conditions.get("UpgradeInProgress", {}).get("status") == "True"
        )
        active = status.get("activeServiceStatus") or {}
        pending = status.get("pendingServiceStatus") or {}
        # KubeRay deploys to the pending cluster until it is ready: the first rollout's (and an
        # upgrade's) application statuses are under pendingServiceStatus, not active.
        failed = tuple(
            f"{which}Serve application {app} is {info.get('status')}: {app_failure(info)}"
            for which, where in (("", active), ("the new cluster's ", pending))
            for app, info in sorted((where.get("applicationStatuses") or {}).items())
            if (info or {}).get("status") in FAILED_APP_STATES
        )
        ready_condition = conditions.get("Ready") or {}
        kuberay_failure = None
        if (
            ready_condition.get("status") == "False"
            and ready_condition.get("reason") in KUBERAY_TERMINAL_REASONS
        ):
            kuberay_failure = f"{ready_condition.get('reason')}: {ready_condition.get('message')}"
        cluster = active.get("rayClusterStatus") or {}
        return cls(
            exists=True,
            observed=observed,
            generation=generation,
            ready=ready,
            upgrading=upgrading,
            failed_apps=failed,
            ready_workers=int(cluster.get("readyWorkerReplicas") or 0),
            available_workers=int(cluster.get("availableWorkerReplicas") or 0),
            kuberay_failure=kuberay_failure,
        )


#: Optional serving features (live state `unavailable` keys) -> their condition type.
FEATURE_CONDITIONS = {"tool_calling": "ToolCallingAvailable", "reasoning": "ReasoningAvailable"}


def _feature_conditions(inputs: Inputs) -> list[tuple[str, bool | None, str, str]]:
    """A condition per configured optional feature, from the replicas' live report."""
    configured = {"tool_calling": inputs.tool_calling, "reasoning": inputs.reasoning}
    out: list[tuple[str, bool | None, str, str]] = []
    for feature, ctype in FEATURE_CONDITIONS.items():
        if not configured[feature]:
            continue
        live = inputs.live
        if live is None or live.unavailable is None:
            out.append(
                (ctype, None, "NotReported", "the serving replicas have not reported it yet")
            )
            continue
        reason = dict(live.unavailable).get(feature)
        if reason is not None:
            out.append((ctype, False, "ParserUnsupported", reason))
        else:
            out.append((ctype, True, "Serving", "the serving replicas serve it"))
    return out


def _eplb_condition(
    live: LiveStatus | None, applied: Obj | None
) -> tuple[str, bool | None, str, str]:
    """`EPLBRecommended` under eplb.mode auto, from the advisor's reading of the live state (or
    the operator's own application of it)."""
    if applied is not None:
        message = (
            f"EPLB turned on by the operator at {applied.get('time')} with redundantExperts "
            f"{applied.get('redundantExperts')} (sustained expert imbalance "
            f"{applied.get('imbalance')}); remove parallelism.eplb.apply to turn it off"
        )
        return (EPLB_CONDITION, True, "Applied", message)
    advice = live.eplb_advice if live is not None else None
    if advice is None:
        return (EPLB_CONDITION, None, "NotObserved", "no expert imbalance observed yet")
    if advice.recommend:
        return (EPLB_CONDITION, True, "ExpertImbalance", advice.message)
    return (EPLB_CONDITION, False, "Balanced", advice.message)


#: Condition of the EPLB advisor (moe_operator.eplb_advisor).
EPLB_CONDITION = "EPLBRecommended"


def _condition(
    ctype: str,
    status: bool | None,
    reason: str,
    message: str,
    inputs: Inputs,
    previous: Obj | None,
) -> Obj:
    value = "Unknown" if status is None else "True" if status else "False"
    old = next(
        (c for c in (previous or {}).get("conditions") or [] if c.get("type") == ctype), None
    )
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or inputs.now,
        "observedGeneration": inputs.generation,
    }


def _ready_replicas(rs: RayServiceView, nodes: int, live: LiveStatus | None) -> int:
    """Replicas that serve. The Serve app's own count when the operator has read it: KubeRay's
    worker readiness probe also checks a Serve proxy, which Ray runs only on nodes hosting a
    Serve replica, so pods of a multi-host slice that hold only engine ranks may stay NotReady
    while the replica serves. Pod readiness per slice otherwise."""
    if live is not None:
        return live.serving_replicas
    return rs.ready_workers // nodes


def compute(inputs: Inputs, previous: Obj | None = None) -> Obj:
    """The owned part of `status` (camelCase), given the inputs and the previous status."""
    rs = RayServiceView.read(inputs.ray_service)
    nodes = max(inputs.nodes_per_replica, 1)
    conds: list[tuple[str, bool | None, str, str]]
    if inputs.problem is not None:
        p = inputs.problem
        conds = [
            ("Ready", False, p.reason, "not deployed: " + p.message),
            ("Progressing", False, p.reason, "waiting for a spec that can be deployed"),
            ("Degraded", True, p.reason, p.message),
        ]
    else:
        rs_name = inputs.ray_service_name or inputs.name
        first_rollout = rs.generation <= 1
        verb = "Creating" if first_rollout else "Updating"
        if not rs.exists:
            progressing = (True, "Creating", f"creating RayService {rs_name}")
        elif not rs.observed or rs.upgrading:
            what = (
                "starting"
                if first_rollout
                else (f"rolling out the new spec ({inputs.upgrade_strategy} upgrade)")
            )
            progressing = (True, verb, f"RayService {rs_name} is {what}")
        elif not rs.ready:
            progressing = (True, verb, f"waiting for RayService {rs_name} to become ready")
        else:
            progressing = (False, "UpToDate", f"RayService {rs_name} runs the current spec")
        ready_replicas = _ready_replicas(rs, nodes, inputs.live)
        if rs.ready:
            ready = (True, "Serving", f"{ready_replicas} replica(s) ready")
        elif rs.exists:
            ready = (False, verb, f"RayService {rs_name} is not ready yet")
        else:
            ready = (False, "Creating", f"RayService {rs_name} does not exist yet")
        if rs.kuberay_failure:
            message = (
                f"KubeRay stopped deploying RayService {rs_name} ({rs.kuberay_failure}); "
                "fix the cause, then delete the RayService so the operator recreates it"
            )
            degraded = (True, "RayServiceFailed", message)
            progressing = (False, "RayServiceFailed", message)
        elif rs.failed_apps:
            message = "; ".join(rs.failed_apps)
            degraded = (True, "ServeApplicationFailed", message)
            if progressing[0]:
                # Waiting cannot help: Serve gave up on the replicas of this rollout.
                progressing = (False, "ServeApplicationFailed", message)
        else:
            degraded = (False, "AsExpected", "")
        conds = [("Ready", *ready), ("Progressing", *progressing), ("Degraded", *degraded)]
        conds += _feature_conditions(inputs)
        if inputs.eplb_auto:
            conds.append(_eplb_condition(inputs.live, inputs.eplb_applied))

    status: Obj = {
        "observedGeneration": inputs.generation,
        "conditions": [_condition(t, s, r, m, inputs, previous) for t, s, r, m in conds],
    }
    if inputs.problem is None:
        status["replicas"] = rs.available_workers // nodes
        status["readyReplicas"] = _ready_replicas(rs, nodes, inputs.live)
        status["rayService"] = inputs.ray_service_name or inputs.name
    live = inputs.live if inputs.problem is None else None
    desired = inputs.desired_replicas
    if live is not None and live.desired_replicas is not None:
        desired = live.desired_replicas  # the autoscaler's current target
    optional: Obj = {
        "desiredReplicas": desired,
        "selector": inputs.selector,
        "plan": inputs.plan,
        "endpoints": inputs.endpoints,
        "eplbApplied": inputs.eplb_applied,
    }
    if live is not None:
        status["queueDepth"] = live.queue_depth
        status["servingReplicas"] = live.serving_replicas
        optional |= {
            "outputTokensPerSecond": live.output_tokens_per_second,
            "costPerMillionTokens": live.cost_per_million_tokens,
            "expertImbalance": live.expert_imbalance,
        }
    status.update({key: value for key, value in optional.items() if value is not None})
    return status


def owned(status: Obj | None) -> Obj:
    """The keys of a live status that this module computes."""
    return {k: v for k, v in (status or {}).items() if k in OWNED_KEYS}


def status_patch(live: Obj | None, desired: Obj) -> Obj | None:
    """A merge patch turning the live status into the desired one; None when already equal.

    Owned keys absent from `desired` are deleted (null), so stale values do not linger.
    """
    current = owned(live)
    if current == desired:
        return None
    patch: Obj = dict(desired)
    for key in current:
        if key not in desired:
            patch[key] = None
    return patch


def condition(status: Obj | None, ctype: str) -> Obj | None:
    """A condition by type (for callers and tests)."""
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == ctype), None)
