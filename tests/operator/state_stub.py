"""A stand-in for the Serve applications' `GET /v1/moe/state` (serving pods cannot run in the
emulated cluster). The real endpoint, on the real engine, is tested in
tests/serving/test_served_app.py; its body format is moe_serving.live_state.state_body, which
this stub uses too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from moe_serving import live_state


@dataclass
class Load:
    """What one deployment reports. Each read advances its clock by `step_s` and its token
    counter by `tokens_per_s * step_s`, so the observed rate is exactly `tokens_per_s`."""

    waiting: int = 0
    running: int = 0
    running_replicas: int = 1
    target_replicas: int | None = 1
    tokens_per_s: float = 0.0
    step_s: float = 0.5
    status: int = 200
    reads: int = 0
    time: float = 1_800_000_000.0
    tokens: float = 0.0
    #: optional features the replicas serve without (feature -> reason), as they report it
    unavailable: dict[str, str] = field(default_factory=dict)
    #: the worst engine's worst-layer max/mean over EP ranks, as `load.expert_imbalance` (how the
    #: replicas' expert windows come to that number is tested on the engine, test_served_app.py)
    expert_imbalance: float | None = None


@dataclass
class StateStub:
    loads: dict[tuple[str, str], Load] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{namespace}}/{{name}}/v1/moe/state"

    async def start(self) -> StateStub:
        app = web.Application()
        app.router.add_get("/{namespace}/{name}/v1/moe/state", self._state)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def hits(self) -> int:
        return sum(load.reads for load in self.loads.values())

    async def _state(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        load = self.loads.get(key)
        if load is None:
            return web.json_response({"error": "no such app"}, status=404)
        load.reads += 1
        if load.status != 200:
            return web.json_response({"error": "unavailable"}, status=load.status)
        load.time += load.step_s
        load.tokens += load.tokens_per_s * load.step_s
        replicas = max(load.running_replicas, 1)
        reports: dict[str, Any] = {}
        for i in range(replicas):
            # Spread over the replicas; replica 0 takes the remainders.
            waiting = load.waiting // replicas + (load.waiting % replicas if i == 0 else 0)
            running = load.running // replicas + (load.running % replicas if i == 0 else 0)
            item = live_state.report(
                f"replica-{i}",
                {"queued": waiting, "in_engine": running, "scheduler_running": running},
                round(load.tokens) if i == 0 else 0,
                requests=0,
                unavailable=load.unavailable,
            )
            item["time"] = load.time
            reports[item["replica"]] = item
        body = live_state.state_body(
            "moe", "LLMEngine", reports, load.running_replicas, load.target_replicas, load.time
        )
        if load.expert_imbalance is not None:
            body["load"]["expert_imbalance"] = load.expert_imbalance
        return web.json_response(body)
