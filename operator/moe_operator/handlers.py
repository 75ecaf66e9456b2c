"""kopf wiring of the MoE operator: activities, indexes and thin handlers.

Run with `kopf run --module moe_operator.handlers` (the chart does).

How it reconciles (the pieces live beside this module):

* A MoEDeployment's create / update / resume handler runs one reconcile pass (reconcile.py:
  parse, plan, render, server-side apply of each child that differs from the live object with
  field manager "moe-operator", delete what is no longer rendered, report the status).
* The operator keeps in-memory indexes (kopf indexes, fed by watches) of the MoEDeployments and
  of their children (server-side filtered by the managed-by label; the child kinds are one
  table, children.py). Deciding whether anything must be written needs no API call.
* Child watch events (a child deleted, hand-edited, or a RayService's status moving) queue a
  reconcile of the owner on a small per-owner work queue (workqueue.py); a transient API error
  there is retried with backoff.
* No finalizer and no timer: children go by Kubernetes garbage collection (ownerReferences with
  controller=true), which also works while the operator is down. kopf timers and daemons would
  add a finalizer to every MoEDeployment, so the periodic resync is the watches' own re-listing.
* Live serving state (queue depth, Serve replicas, token rate, cost) comes from one background
  reader started at startup (live_poller.py); a changed value queues the owner's reconcile.
* The validating admission webhook (webhook.py) is registered only when a webhook server runs.
* State of the run (credentials, client, indexes, queue, tracer) is one `Runtime` in kopf's
  memo (runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from moe_operator import eplb_advisor, kube, live_poller, settings
from moe_operator.api import (
    GROUP,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
    MoEDeploymentSpec,
)
from moe_operator.children import CHILDREN, MANAGED_SELECTOR, RAY_SERVICE
from moe_operator.planner import Plan
from moe_operator.reconcile import Outcome, owner_of, parse, reconcile
from moe_operator.render import serving_base_url
from moe_operator.runtime import OWNER_INDEX, Obj, Runtime, lookup, plain
from moe_operator.workqueue import OwnerKey, WorkQueue

log = logging.getLogger("moe_operator")


def runtime(memo: Any) -> Runtime:
    """The run's Runtime, created by whichever activity (login or startup) comes first."""
    rt = getattr(memo, "moe_runtime", None)
    if rt is None:
        config = settings.load()
        queue = WorkQueue(lambda key: _reconcile_cached(made, key), config.retry_delay)
        made = Runtime(config=config, queue=queue)
        memo.moe_runtime = rt = made
    assert isinstance(rt, Runtime)
    return rt


async def _reconcile_cached(rt: Runtime, key: OwnerKey) -> Outcome | None:
    """The work queue's pass: reconcile the cached owner (None: it is gone)."""
    owners = rt.cached(OWNER_INDEX, key)
    if not owners:
        return None
    return await reconcile(rt, owners[0], log)


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
    for child in CHILDREN:
        settings.watching.label_selectors[child.selector] = MANAGED_SELECTOR
    if settings.peering.name == "default":
        settings.peering.name = "moe-operator"  # `--peering=<name>` overrides it
    if cfg.webhook_enabled:
        from moe_operator.webhook import configure_admission, register_validation

        configure_admission(settings, cfg)
        register_validation()


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
        changed=rt.queue.kick,
    )
    rt.poller_task = asyncio.get_running_loop().create_task(rt.poller.run(), name="moe-live-state")


def eplb_settings(spec: MoEDeploymentSpec, chosen: Plan) -> eplb_advisor.Settings | None:
    """The EPLB advisor's inputs for `eplb.mode: auto`, else None."""
    eplb = spec.parallelism.eplb
    if eplb.mode != "auto":
        return None
    return eplb_advisor.Settings(
        threshold=eplb.imbalance_threshold,
        sustain_s=eplb.sustain_seconds,
        min_interval_s=eplb.min_interval_seconds,
        num_experts=chosen.num_experts,
        ep=chosen.expert_parallel_size,
        eplb_enabled=eplb.enabled,
    )


def _live_targets(rt: Runtime) -> list[live_poller.Target]:
    """Deployments whose RayService is ready and whose spec plans (from the caches)."""
    owners = rt.indexes.get(OWNER_INDEX)
    targets = []
    for key in list(owners or ()):
        found = lookup(owners, key)
        if not found:
            continue
        owner = found[0]
        ray_services = rt.cached(RAY_SERVICE.index_id, key)
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
                eplb=eplb_settings(spec, chosen),
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
    await rt.queue.close()
    if rt.client is not None:
        await rt.client.close()
        rt.client = None
    if rt.traces is not None:
        rt.traces.shutdown()


# ---------------------------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, PLURAL, id=OWNER_INDEX)
def index_owner(**kwargs: Any) -> dict[OwnerKey, Obj]:
    return {(kwargs["namespace"], kwargs["name"]): plain(kwargs["body"])}


def _index_child(**kwargs: Any) -> dict[OwnerKey, Obj]:
    return {(kwargs["namespace"], kwargs["labels"][LABEL_DEPLOYMENT]): plain(kwargs["body"])}


_CHILD_FILTER: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY,
    LABEL_DEPLOYMENT: kopf.PRESENT,
}
for _child in CHILDREN:
    kopf.index(*_child.selector, id=_child.index_id, labels=_CHILD_FILTER)(_index_child)


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
    async with rt.queue.exclusive(key):
        outcome = await reconcile(rt, plain(body), logger)
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
        rt.queue.kick((kwargs["namespace"], owner))


for _child in CHILDREN:
    kopf.on.event(*_child.selector, id=_child.event_id, labels=_CHILD_FILTER)(_on_child_event)
