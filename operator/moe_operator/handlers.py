"""kopf handlers of the MoE operator: parse, plan, render, apply, report.

Run with `kopf run --module moe_operator.handlers` (the chart does).

How it reconciles:

* A MoEDeployment's create / update / resume handler validates the spec, plans the layout,
  renders the children and server-side-applies each one that differs from the live object
  (field manager "moe-operator"); children that are no longer rendered are deleted.
* The operator keeps in-memory indexes (kopf indexes, fed by watches) of the MoEDeployments and
  of their children (server-side filtered by the managed-by label). Deciding whether anything
  must be written needs no API call: a child is up to date when the rendered object, including
  its hash annotation, is a subset of the live one. Before a write, the child is read once more,
  so a stale cache never causes a needless write.
* Child watch events (a child deleted, hand-edited, or a RayService's status moving) queue a
  reconcile of the owner on a small per-owner work queue; a transient API error there is retried
  with backoff. Writes happen only when something differs; the status subresource is patched
  only when the computed status differs from the live one.
* No finalizer and no timer: children go by Kubernetes garbage collection (ownerReferences with
  controller=true), which also works while the operator is down. kopf timers and daemons would
  add a finalizer to every MoEDeployment, so the periodic resync is the watches' own re-listing.
* Live serving state (queue depth, Serve replicas, token rate, cost) comes from one background
  reader started at startup (live_poller.py); a changed value queues the owner's reconcile.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from moe_operator import kube, kuberay, live_poller, settings, tracing
from moe_operator import status as status_mod
from moe_operator.api import (
    GROUP,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
    MoEDeploymentSpec,
    ObjectMeta,
)
from moe_operator.errors import describe
from moe_operator.planner import Plan, PlanningError, plan
from moe_operator.render import (
    Owner,
    RenderError,
    check_renderable,
    endpoints,
    render,
    serving_base_url,
)

Obj = dict[str, Any]
OwnerKey = tuple[str, str]  # (namespace, name)

log = logging.getLogger("moe_operator")

#: Annotation on every child: hash of the rendered object, so a removed field is noticed.
HASH_ANNOTATION = f"{GROUP}/applied-hash"
OWNER = kube.Resource(GROUP, VERSION, PLURAL)
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

#: The children kinds, with the id of the kopf index that caches them.
CHILD_INDEXES: dict[tuple[str, str], str] = {
    ("ray.io/v1", "RayService"): "rayservice_children",
    ("v1", "Service"): "service_children",
    ("policy/v1", "PodDisruptionBudget"): "pdb_children",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy_children",
}
OWNER_INDEX = "moedeployment_owners"


# ------------------------------------------------------------------------------ runtime state


@dataclass
class Runtime:
    """State of one operator run (kept in kopf's memo, shared by all handlers)."""

    config: settings.OperatorConfig
    configuration: kube.Configuration | None = None  # the official client's, from login
    client: kube.Client | None = None
    indexes: Mapping[str, Any] = field(default_factory=dict)
    locks: dict[OwnerKey, asyncio.Lock] = field(default_factory=dict)
    dirty: set[OwnerKey] = field(default_factory=set)
    workers: dict[OwnerKey, asyncio.Task[None]] = field(default_factory=dict)
    failures: dict[OwnerKey, int] = field(default_factory=dict)
    traces: tracing.Tracing | None = None
    poller: live_poller.LivePoller | None = None
    poller_task: asyncio.Task[None] | None = None

    def tracer(self) -> tracing.Tracer:
        """This run's tracer (tracing.py; a no-op one without an OTLP endpoint)."""
        if self.traces is None:
            self.traces = tracing.setup(self.config)
        return self.traces.tracer

    def api(self) -> kube.Client:
        if self.client is None:
            self.client = kube.Client(
                lambda: self.configuration,
                user_agent=settings.USER_AGENT,
                request_timeout=self.config.request_timeout,
                connect_timeout=self.config.connect_timeout,
                workers=self.config.api_workers,
                tracer=self.tracer(),
            )
        return self.client

    def lock(self, key: OwnerKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def remember(self, kwargs: Mapping[str, Any]) -> None:
        """Keep the kopf indexes (the same objects for the whole run) for the work queue."""
        found = {k: kwargs[k] for k in (OWNER_INDEX, *CHILD_INDEXES.values()) if k in kwargs}
        if found:
            self.indexes = found


def runtime(memo: Any) -> Runtime:
    """The run's Runtime, created by whichever activity (login or startup) comes first."""
    rt = getattr(memo, "moe_runtime", None)
    if rt is None:
        rt = Runtime(config=settings.load())
        memo.moe_runtime = rt
    assert isinstance(rt, Runtime)
    return rt


# ------------------------------------------------------------------------------- activities


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else kubeconfig, read by the official `kubernetes` client
    (kube.load_configuration): the operator's client uses that Configuration (exec plugins and
    token rotation included), and kopf gets the same credentials, mapped as
    kopf.login_via_client maps them. kopf logs in again after a 401: a fresh Configuration."""
    cfg = kube.load_configuration()
    if cfg is None:
        return None
    runtime(memo).configuration = cfg
    scheme, token = kube.authorization(cfg)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,  # the loaders write a kubeconfig's inline data to files
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    """kopf settings: storage, timeouts, server-side watch filters, events, peering, webhook."""
    rt = runtime(memo)
    rt.remember(kwargs)
    cfg = rt.config
    # Progress and the last handled spec live in annotations under our group, not in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # kopf mirrors log lines as Events from this level on; our own Events are explicit.
    settings.posting.enabled = cfg.post_events
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = cfg.watch_server_timeout
    settings.watching.client_timeout = cfg.watch_client_timeout
    settings.watching.connect_timeout = cfg.connect_timeout
    settings.networking.connect_timeout = cfg.connect_timeout
    settings.networking.request_timeout = cfg.request_timeout
    # Only our own children are watched (server-side), never every Service in the cluster.
    for selector in (
        ("ray.io", "rayservices"),
        ("v1", "services"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ):
        settings.watching.label_selectors[selector] = MANAGED_SELECTOR
    if settings.peering.name == "default":
        settings.peering.name = "moe-operator"  # `--peering=<name>` overrides it
    if cfg.webhook_enabled:
        from moe_operator.webhook import configure_admission

        configure_admission(settings, cfg)
        _register_validation()


@kopf.on.startup()
async def start_live_state(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Start reading the live serving state of ready deployments (live_poller.py)."""
    rt = runtime(memo)
    if rt.config.live_state_interval <= 0 or rt.poller_task is not None:
        return
    rt.poller = live_poller.LivePoller(
        config=rt.config,
        api=rt.api,
        peering=live_poller.peering_of(settings.peering),
        targets=lambda: _live_targets(rt),
        changed=lambda key: kick(rt, key),
    )
    rt.poller_task = asyncio.get_running_loop().create_task(rt.poller.run(), name="moe-live-state")


def _live_targets(rt: Runtime) -> list[live_poller.Target]:
    """Deployments whose RayService is ready and whose spec plans (from the caches)."""
    owners = rt.indexes.get(OWNER_INDEX)
    targets = []
    for key in list(owners or ()):
        found = _lookup(owners, key)
        if not found:
            continue
        owner = found[0]
        ray_services = _lookup(rt.indexes.get(CHILD_INDEXES[("ray.io/v1", "RayService")]), key)
        ready = [rs for rs in ray_services if live_poller.is_ready(rs)]
        if not ready:
            continue
        spec, chosen, problem = parse(owner)
        if problem is not None or spec is None or chosen is None:
            continue
        # What serves in this upgrade strategy (the -http alias does not exist in all).
        base = serving_base_url(owner_of(owner), spec, ready[0])
        if base is None:
            continue
        targets.append(
            live_poller.Target(
                key=key,
                url=live_poller.url_for(rt.config, key[1], key[0], base),
                hourly_cost_per_replica=chosen.hourly_cost_per_replica,
            )
        )
    return targets


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    if rt.poller_task is not None:
        rt.poller_task.cancel()
        await asyncio.gather(rt.poller_task, return_exceptions=True)
        rt.poller_task = None
    for task in list(rt.workers.values()):
        task.cancel()
    await asyncio.gather(*rt.workers.values(), return_exceptions=True)
    rt.workers.clear()
    if rt.client is not None:
        await rt.client.close()
        rt.client = None
    if rt.traces is not None:
        rt.traces.shutdown()


# ---------------------------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, PLURAL, id=OWNER_INDEX)
def index_owner(**kwargs: Any) -> dict[OwnerKey, Obj]:
    return {(kwargs["namespace"], kwargs["name"]): _plain(kwargs["body"])}


def _index_child(**kwargs: Any) -> dict[OwnerKey, Obj]:
    return {(kwargs["namespace"], kwargs["labels"][LABEL_DEPLOYMENT]): _plain(kwargs["body"])}


_CHILD_FILTER: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY,
    LABEL_DEPLOYMENT: kopf.PRESENT,
}
kopf.index("ray.io", "v1", "rayservices", id="rayservice_children", labels=_CHILD_FILTER)(
    _index_child
)
kopf.index("v1", "services", id="service_children", labels=_CHILD_FILTER)(_index_child)
kopf.index("policy", "v1", "poddisruptionbudgets", id="pdb_children", labels=_CHILD_FILTER)(
    _index_child
)
kopf.index(
    "networking.k8s.io", "v1", "networkpolicies", id="networkpolicy_children", labels=_CHILD_FILTER
)(_index_child)


def _plain(body: Mapping[str, Any]) -> Obj:
    plain: Obj = json.loads(json.dumps(dict(body), default=dict))
    return plain


def _lookup(index: Any, key: OwnerKey) -> list[Obj]:
    if index is None or key not in index:
        return []
    return list(index[key])


# --------------------------------------------------------------------------- owner handlers


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_handler(
    body: kopf.Body, memo: kopf.Memo, logger: logging.Logger | kopf.Logger, **kwargs: Any
) -> None:
    """Bring the children and status in line with the spec (idempotent)."""
    rt = runtime(memo)
    rt.remember(kwargs)
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    async with rt.lock(key):
        rt.dirty.discard(key)
        outcome = await reconcile(rt, _plain(body), logger)
    _raise_for(outcome, rt.config)


def _raise_for(outcome: Outcome, cfg: settings.OperatorConfig) -> None:
    if outcome.problem is not None:
        # Retrying cannot help: only a new spec can (which is a new update event).
        raise kopf.PermanentError(f"{outcome.problem.reason}: {outcome.problem.message}")
    if outcome.error is not None:
        err = outcome.error
        delay = err.retry_after if err.retry_after else cfg.retry_delay
        if not err.transient:
            delay = max(delay, cfg.wait_delay)
        raise kopf.TemporaryError(str(err), delay=delay)


# --------------------------------------------------------------------------- child handlers


async def _on_child_event(**kwargs: Any) -> None:
    """A child changed or went away: queue a reconcile of its owner (never blocks)."""
    rt = runtime(kwargs["memo"])
    rt.remember(kwargs)
    owner = kwargs["labels"].get(LABEL_DEPLOYMENT)
    log.debug(
        "child event %s %s/%s",
        kwargs.get("type"),
        kwargs["namespace"],
        kwargs.get("name"),
        extra={"moe_child": f"{kwargs['namespace']}/{kwargs.get('name')}"},
    )
    if owner:
        kick(rt, (kwargs["namespace"], owner))


for _group, _version, _plural, _id in (
    ("ray.io", "v1", "rayservices", "rayservice_event"),
    ("", "v1", "services", "service_event"),
    ("policy", "v1", "poddisruptionbudgets", "pdb_event"),
    ("networking.k8s.io", "v1", "networkpolicies", "networkpolicy_event"),
):
    kopf.on.event(
        *((_group, _version, _plural) if _group else (_version, _plural)),
        id=_id,
        labels=_CHILD_FILTER,
    )(_on_child_event)


def kick(rt: Runtime, key: OwnerKey) -> None:
    """Mark an owner for reconciliation; one worker per owner drains the marks."""
    rt.dirty.add(key)
    worker = rt.workers.get(key)
    if worker is None or worker.done():
        rt.workers[key] = asyncio.get_running_loop().create_task(
            _work(rt, key), name=f"moe-reconcile {key[0]}/{key[1]}"
        )


async def _work(rt: Runtime, key: OwnerKey) -> None:
    """Reconcile `key` while it is marked dirty; back off on transient API errors."""
    try:
        while key in rt.dirty:
            async with rt.lock(key):
                if key not in rt.dirty:
                    break
                rt.dirty.discard(key)
                owners = _lookup(rt.indexes.get(OWNER_INDEX), key)
                if not owners:
                    break  # deleted: its children go by garbage collection
                owner = owners[0]
                outcome = await reconcile(rt, owner, log)
            if outcome.error is not None:
                failures = rt.failures.get(key, 0) + 1
                rt.failures[key] = failures
                err = outcome.error
                delay = err.retry_after or min(rt.config.retry_delay * 2 ** (failures - 1), 300)
                log.warning("reconcile of %s/%s failed (%s); retrying in %.0fs", *key, err, delay)
                rt.dirty.add(key)
                await asyncio.sleep(delay)  # a background worker, not a kopf handler
            else:
                rt.failures.pop(key, None)
    finally:
        if rt.workers.get(key) is asyncio.current_task():
            del rt.workers[key]


# ------------------------------------------------------------------------------- reconcile


@dataclass
class Outcome:
    """What one reconcile did."""

    writes: list[str] = field(default_factory=list)
    problem: status_mod.Problem | None = None
    error: kube.ApiError | None = None


def _hash(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """The rendered object with its hash annotation."""
    out = _plain(obj)
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
    """Spec and plan, or the problem that stops them (InvalidSpec / PlanFailed / RenderFailed)."""
    try:
        ObjectMeta.model_validate({"name": body["metadata"]["name"]})
    except ValidationError as err:
        return None, None, status_mod.Problem("InvalidSpec", "; ".join(describe(err, "metadata")))
    try:
        spec = MoEDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as err:
        return None, None, status_mod.Problem("InvalidSpec", "; ".join(describe(err, "spec")))
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
    outcome = Outcome()
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if meta.get("deletionTimestamp"):
        return outcome  # going away: garbage collection removes the children
    api = rt.api()
    spec, chosen, problem = parse(body)
    children: list[Obj] = []
    if problem is None:
        assert spec is not None and chosen is not None
        try:
            children = [with_hash(o) for o in render(owner_of(body), spec, chosen)]
        except RenderError as err:
            problem = status_mod.Problem("RenderFailed", str(err))
    outcome.problem = problem
    live = _live_children(rt, key, meta["uid"])
    ray_service: Obj | None = None
    try:
        for obj in children:
            ckey = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
            current = live.pop(ckey, None)
            if current is None or not is_subset(obj, current):
                try:
                    current = await _apply_if_needed(rt, api, body, obj, outcome, logger)
                except kube.ApiError as err:
                    if not err.rejected:
                        raise
                    # The server refuses the object itself: the same apply would fail forever.
                    problem = outcome.problem = rejected(obj, err)
                    break
            if obj["kind"] == "RayService":
                ray_service = current
        if problem is None:
            for (api_version, kind, name), _stale in sorted(live.items()):
                res = kube.KINDS[(api_version, kind)]
                if await api.delete(res, meta["namespace"], name):
                    outcome.writes.append(f"delete {kind}/{name}")
                    message = f"deleted {kind} {name}: no longer rendered"
                    _event(rt, body, "Normal", "Deleted", message)
        await _report(rt, api, body, spec, chosen, problem, ray_service, outcome)
    except kube.ApiError as err:
        outcome.error = err
        logger.warning(f"reconcile stopped by the API: {err}")
    if problem is not None:
        _event(rt, body, "Warning", problem.reason, problem.message)
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


def rejected(obj: Obj, err: kube.ApiError) -> status_mod.Problem:
    """The problem of a child the API server refused (kube.ApiError.rejected), with its words."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    return status_mod.Problem(
        "ApplyRejected",
        f"the API server rejected {kind} {name} (HTTP {err.status}): {err.message}. "
        + kuberay.rejection_hint(kind),
    )


def _live_children(rt: Runtime, key: OwnerKey, uid: str) -> dict[tuple[str, str, str], Obj]:
    """Cached children of this owner (only those it controls, by uid)."""
    out: dict[tuple[str, str, str], Obj] = {}
    for (api_version, kind), index_id in CHILD_INDEXES.items():
        for obj in _lookup(rt.indexes.get(index_id), key):
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if any(r.get("uid") == uid and r.get("controller") for r in refs):
                out[(api_version, kind, obj["metadata"]["name"])] = obj
    return out


async def _apply_if_needed(
    rt: Runtime, api: kube.Client, owner: Obj, obj: Obj, outcome: Outcome, logger: Any
) -> Obj | None:
    """Re-read the child (the cache may lag our own writes); apply only if it still differs."""
    res = kube.resource_of(obj)
    meta = obj["metadata"]
    fresh = await api.get(res, meta["namespace"], meta["name"])
    if fresh is not None and is_subset(obj, fresh):
        return fresh
    result = await api.apply(obj, field_manager=settings.FIELD_MANAGER)
    verb = "created" if fresh is None else "updated"
    outcome.writes.append(f"{verb[:-1]} {obj['kind']}/{meta['name']}")
    _event(rt, owner, "Normal", verb.capitalize(), f"{verb} {obj['kind']} {meta['name']}")
    return result


async def _report(
    rt: Runtime,
    api: kube.Client,
    body: Obj,
    spec: MoEDeploymentSpec | None,
    chosen: Plan | None,
    problem: status_mod.Problem | None,
    ray_service: Obj | None,
    outcome: Outcome,
) -> None:
    """Patch the status subresource when the computed status differs from the live one."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])

    def compute(previous: Obj | None) -> Obj:
        owner = owner_of(body)
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
            ray_service=ray_service,
            ray_service_name=owner.name,
            live=rt.poller.status.get(key) if rt.poller is not None else None,
            upgrade_strategy=spec.upgrade_strategy if spec is not None else "NewCluster",
            tool_calling=bool(chosen is not None and chosen.tool_call_parser),
            reasoning=bool(chosen is not None and chosen.reasoning_parser),
        )
        return status_mod.compute(inputs, previous)

    previous = body.get("status")
    if status_mod.status_patch(previous, compute(previous)) is None:
        return
    # The cached owner may lag our own last status write: decide on a fresh read.
    fresh = await api.get(OWNER, meta["namespace"], meta["name"])
    if fresh is None or fresh["metadata"].get("uid") != meta["uid"]:
        return
    if fresh["metadata"].get("generation") != meta.get("generation"):
        return  # a newer spec is on its way; its own reconcile reports
    previous = fresh.get("status")
    patch = status_mod.status_patch(previous, compute(previous))
    if patch is None:
        return
    await api.patch_status(OWNER, meta["namespace"], meta["name"], patch)
    outcome.writes.append("patch status")


def _event(rt: Runtime, owner: Obj, kind: str, reason: str, message: str) -> None:
    if not rt.config.post_events:
        return
    target: Any = {
        "apiVersion": owner.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": owner.get("kind", "MoEDeployment"),
        "metadata": owner["metadata"],
    }
    kopf.event(kopf.Body(target), type=kind, reason=reason, message=message[:1024])


# -------------------------------------------------------------------------------- admission


def validate_body(body: Mapping[str, Any]) -> list[str]:
    """Problems with a MoEDeployment as the webhook reports them (empty list: valid)."""
    problems: list[str] = []
    name = (body.get("metadata") or {}).get("name")
    if name is not None:
        try:
            ObjectMeta.model_validate({"name": name})
        except ValidationError as err:
            problems += describe(err, prefix="metadata")
    try:
        spec = MoEDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as err:
        return problems + describe(err, prefix="spec")
    try:
        check_renderable(spec)
        chosen = plan(spec)
        render(Owner(name or "x", "default", "uid"), spec, chosen)
    except (PlanningError, RenderError) as err:
        problems.append(str(err))
    return problems


def _register_validation() -> None:
    """Register the admission handler, once. Only with a webhook server: kopf refuses to start
    when admission handlers exist and no server is configured (the chart's default)."""
    registry = kopf.get_default_registry()
    if any(h.id == "validate-spec" for h in registry._webhooks.get_all_handlers()):
        return
    kopf.on.validate(GROUP, VERSION, PLURAL, id="validate-spec", operations=["CREATE", "UPDATE"])(
        validate_moedeployment
    )


def validate_moedeployment(**kwargs: Any) -> None:
    """Reject a spec the operator could not deploy, naming the field and what to change."""
    body, old = kwargs["body"], kwargs.get("old")
    if kwargs.get("operation") == "UPDATE" and old is not None and _same_spec(old, body):
        return  # metadata-only changes (labels, kopf's annotations) are not re-judged
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    problems = validate_body(body)
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)


def _same_spec(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return _plain(old.get("spec") or {}) == _plain(new.get("spec") or {})


def iter_children(objs: Iterable[Obj]) -> list[str]:
    """`Kind/name` of objects (logs, tests)."""
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objs]
