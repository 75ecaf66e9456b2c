"""Live serving state in the status: read from each ready deployment's /v1/moe/state (a stub
stands in for the serving pods here), written only when it changes, dropped when unreachable,
and not read at all while kopf's peering puts another operator in charge."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from state_stub import Load, StateStub

from moe_operator import kube, live_poller, settings
from moe_operator.api import MoEDeploymentSpec
from moe_operator.planner import plan
from moe_operator.throughput import cost_per_million_tokens
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, mixtral
from tests.support.waiting import eventually


@pytest.fixture
async def stub() -> AsyncIterator[StateStub]:
    server = await StateStub().start()
    yield server
    await server.stop()


@pytest.fixture
def fast_reads(stub: StateStub, monkeypatch: pytest.MonkeyPatch, api: em.ApiServer) -> StateStub:
    monkeypatch.setenv("MOE_OPERATOR_LIVE_STATE_INTERVAL", "0.1")
    monkeypatch.setenv("MOE_OPERATOR_LIVE_STATE_URL", stub.url_template)
    return stub


def status(api: em.ApiServer) -> dict[str, Any]:
    found: dict[str, Any] = (api.find(MOED, NS, "mixtral") or {}).get("status") or {}
    return found


LIVE_KEYS = ("queueDepth", "servingReplicas", "outputTokensPerSecond", "costPerMillionTokens")


async def test_live_state_reaches_the_status_and_nothing_is_written_while_it_holds(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, fast_reads: StateStub
) -> None:
    stub = fast_reads
    load = stub.loads[(NS, "mixtral")] = Load(
        waiting=6, running=4, running_replicas=2, target_replicas=3, tokens_per_s=250.0
    )
    await operator.start()
    await api.create(MOED, mixtral())
    await eventually(lambda: api.find(em.RAYSERVICES, NS, "mixtral"), message="RayService")
    await asyncio.sleep(0.5)
    assert load.reads == 0, "read before the RayService was ready"
    await kuberay.serve("mixtral")

    chosen = plan(MoEDeploymentSpec.model_validate(mixtral()["spec"]))
    cost = cost_per_million_tokens(chosen.hourly_cost_per_replica * 2, 250.0)
    assert cost is not None
    await eventually(lambda: "costPerMillionTokens" in status(api), message="live cost")
    got = status(api)
    assert got["queueDepth"] == 3.0  # 6 waiting over 2 serving replicas
    assert got["servingReplicas"] == 2
    assert got["desiredReplicas"] == 3  # the Serve autoscaler's target, not the plan's count
    assert got["outputTokensPerSecond"] == 250.0
    assert got["costPerMillionTokens"] == pytest.approx(cost, rel=5e-3)

    # Steady load: reads go on, the API sees no write at all.
    reads, mark = load.reads, len(api.calls)
    await asyncio.sleep(1.0)
    assert load.reads > reads + 3
    writes = [c for c in api.operator_calls(mark) if c.is_write and c.resource != "events"]
    assert writes == []

    # The queue grows: one status write with the new depth.
    load.waiting = 20
    await eventually(lambda: status(api).get("queueDepth") == 10.0, message="new depth")

    # The app stops answering: the live values go (no stale numbers), the planned count is back.
    load.status = 503
    await eventually(
        lambda: not any(k in status(api) for k in LIVE_KEYS), message="live values dropped"
    )
    assert status(api)["desiredReplicas"] == chosen.initial_replicas
    assert status(api)["conditions"]  # the rest of the status is untouched


async def test_reads_stop_while_another_operator_is_in_charge(
    api: em.ApiServer, stub: StateStub
) -> None:
    """The reader is not a kopf handler, so kopf's peering does not pause it: it applies the
    same rule to the peering object itself (and reads nothing while paused)."""
    kubeconfig = yaml.safe_load(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    cfg = kube.Configuration(host=server, api_key={"BearerToken": "Bearer test-token"})
    client = kube.Client(
        lambda: cfg,
        user_agent=settings.USER_AGENT,
        request_timeout=10,
        connect_timeout=5,
    )
    stub.loads[(NS, "a")] = Load(waiting=1, tokens_per_s=10.0)
    changed: list[tuple[str, str]] = []
    poller = live_poller.LivePoller(
        config=settings.load({"MOE_OPERATOR_LIVE_STATE_URL": stub.url_template}),
        api=lambda: client,
        peering=live_poller.Peering(name="moe-operator", priority=0, clusterwide=True),
        targets=lambda: [
            live_poller.Target((NS, "a"), stub.url_template.format(namespace=NS, name="a"), 1.0)
        ],
        changed=changed.append,
    )
    now = datetime.datetime.now(datetime.UTC)
    fresh = now.isoformat()
    me = {"priority": 0, "lifetime": 60, "lastseen": fresh}
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": "moe-operator"},
        "status": {"me": me, "other": {**me, "priority": 100}},
    }
    try:
        # No peering object at all: kopf would run standalone, and so does the reader.
        await poller.round()
        assert stub.hits() == 1 and changed == [(NS, "a")]
        await api.create(em.PEERINGS, peering)
        await poller.round()
        await poller.round()
        assert stub.hits() == 1, "read while a higher-priority operator is in charge"
        # The other operator died (its heartbeat expired): this one is in charge again.
        dead = (now - datetime.timedelta(minutes=5)).isoformat()
        await api.modify(
            em.PEERINGS, None, "moe-operator", {"status": {"other": {"lastseen": dead}}}
        )
        await poller.round()
        assert stub.hits() == 2
    finally:
        await client.close()
        if poller.session is not None:
            await poller.session.close()


async def test_a_checkpoint_without_tool_tokens_shows_tool_calling_unavailable(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, fast_reads: StateStub
) -> None:
    """The replicas of a Mixtral 8x7B Instruct v0.1 checkpoint (no [TOOL_CALLS] token) serve
    without the `mistral` tool parser and say why in /v1/moe/state
    (moe_serving.parser_support); the MoEDeployment is Ready with ToolCallingAvailable False
    and those words, instead of a replica that never starts and a deployment Progressing
    forever."""
    reason = "tool calling is off: vLLM's 'mistral' parser cannot be used with ..."
    load = fast_reads.loads[(NS, "mixtral")] = Load(unavailable={"tool_calling": reason})
    await operator.start()
    await api.create(MOED, mixtral())
    await eventually(lambda: api.find(em.RAYSERVICES, NS, "mixtral"), message="RayService")

    def tool_condition() -> dict[str, Any] | None:
        return next(
            (c for c in status(api).get("conditions") or [] if c["type"] == "ToolCallingAvailable"),
            None,
        )

    await eventually(lambda: tool_condition() is not None, message="condition")
    before = tool_condition()
    assert before is not None and before["status"] == "Unknown"  # not read before Ready
    await kuberay.serve("mixtral")
    await eventually(
        lambda: (tool_condition() or {}).get("status") == "False", message="tool calling off"
    )
    got = tool_condition()
    assert got is not None and got["reason"] == "ParserUnsupported" and got["message"] == reason
    ready = next(c for c in status(api)["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    # A fixed checkpoint (new replicas report nothing off): the condition turns True.
    load.unavailable = {}
    await eventually(
        lambda: (tool_condition() or {}).get("status") == "True", message="tool calling on"
    )


def _eplb_args(api: em.ApiServer) -> dict[str, Any]:
    rs = api.find(em.RAYSERVICES, NS, "mixtral") or {}
    config = yaml.safe_load(rs.get("spec", {}).get("serveConfigV2") or "{}") or {}
    app = (config.get("applications") or [{}])[0]
    engine: dict[str, Any] = app.get("args", {}).get("engine", {})
    return dict(engine.get("eplb") or {})


async def test_eplb_auto_apply_turns_it_on_once_and_never_flaps(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, fast_reads: StateStub
) -> None:
    """eplb.mode auto with apply: a sustained imbalance turns EPLB on in the rendered Serve
    config (the written spec untouched, the decision in status.eplbApplied); a calm reading
    afterwards changes nothing, and removing apply turns it off again."""
    stub = fast_reads
    load = stub.loads[(NS, "mixtral")] = Load(tokens_per_s=10.0, expert_imbalance=1.8)
    body = mixtral()
    body["spec"]["parallelism"]["eplb"] = {
        "mode": "auto",
        "apply": True,
        "sustainSeconds": 0,
        "minIntervalSeconds": 0,
    }
    await operator.start()
    await api.create(MOED, body)
    await eventually(lambda: api.find(em.RAYSERVICES, NS, "mixtral"), message="RayService")
    assert _eplb_args(api)["enabled"] is False
    await kuberay.serve("mixtral")

    await eventually(lambda: status(api).get("eplbApplied"), message="EPLB applied")
    applied = status(api)["eplbApplied"]
    # Mixtral: 8 experts over EP2; max/mean 1.8 -> ceil(0.8 x 4) = 4 copies recommended, but
    # with 4 the planner needs EP4 on 4 GPUs: applying keeps the 2-GPU layout, which holds 2.
    assert applied["redundantExperts"] == 2 and applied["imbalance"] == 1.8
    await eventually(lambda: _eplb_args(api).get("enabled") is True, message="rendered")
    assert _eplb_args(api)["num_redundant_experts"] == 2
    written = (api.find(MOED, NS, "mixtral") or {})["spec"]["parallelism"]["eplb"]
    assert not written.get("enabled") and not written.get("redundantExperts")  # as written
    cond = next(c for c in status(api)["conditions"] if c["type"] == "EPLBRecommended")
    assert cond["reason"] == "Applied", cond
    assert status(api)["plan"]["expertsPerRank"] == 5  # (8 + 2) / 2
    assert status(api)["plan"]["gpusPerReplica"] == 2
    events = await eventually(
        lambda: [e for e in api.list_items(em.EVENTS, NS) if e.get("reason") == "EPLBApplied"],
        message="EPLBApplied event",
    )
    assert "4 recommended" in events[0]["message"], events

    # Calm now: EPLB stays on, and nothing about it is written again.
    load.expert_imbalance = 1.0
    await kuberay.serve("mixtral")  # the rollout of the new config is up
    await asyncio.sleep(1.5)
    mark = len(api.calls)
    await asyncio.sleep(1.5)
    rs_writes = [c for c in api.operator_calls(mark) if c.is_write and c.resource == "rayservices"]
    assert rs_writes == []
    assert status(api)["eplbApplied"] == applied
    assert _eplb_args(api)["enabled"] is True

    # The user takes apply away: EPLB as written (off), the record gone.
    await api.modify(MOED, NS, "mixtral", {"spec": {"parallelism": {"eplb": {"apply": False}}}})
    await eventually(lambda: _eplb_args(api).get("enabled") is False, message="EPLB off again")
    await kuberay.serve("mixtral")
    await eventually(lambda: "eplbApplied" not in status(api), message="record dropped")
