"""Prefix-cache-aware routing of requests over engine replicas (Ray Serve request router).

Agent traffic re-sends the same long system prompt and tool definitions on every call of a
session. Serve's default router (power of two choices) spreads a session's calls over replicas,
so each replica prefills prefixes another one already holds in its KV cache (vLLM's prefix
caching). This router sends a request to the replica that served its longest known prefix
(`PrefixIndex`), unless that replica's queue is longer than the shortest one by more than
`imbalance_threshold` requests: then load wins. Without a known prefix (or for calls that are
not generation requests: health, metrics) it routes as Serve's default does.

Why not Ray Serve LLM's `PrefixCacheAffinityRouter` (ray.serve.llm.request_router), which
does the same: it reads the prompt from `.prompt` / `.messages` attributes of the request
object (ours passes the OpenAI body as a dict), keeps its prefix tree in a separate actor that
it queries with a blocking `ray.get` on the caller's event loop, drops tool definitions from
the text (the longest shared part of agent prompts), and reports no reason per decision. The
policy here is the same (affinity while balanced, else power of two), in-process, with
`moe_routing_decisions_total{reason}` (affinity, load, fallback).

Serve pickles this module *by value* into each caller (`RequestRouterConfig.
_serialize_request_router_cls` in ray/serve/config.py calls `cloudpickle.register_pickle_by_value`
on it): a module-level object here would be a private copy in the ingress, so the decision counter
lives in `moe_serving.metrics` (pickled by reference) and is only reached through that module.

Each ingress replica routes with its own index (a session's calls through the same ingress
stick; with several ingress replicas each learns the prefixes it sees).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from moe_serving import metrics
from moe_serving.prefix_index import PrefixIndex

logger = logging.getLogger("ray.serve")

#: Shorter known prefixes than this do not count (one block of the index: ~30 tokens).
MIN_MATCH_CHARS = 128


def prompt_text(args: tuple[Any, ...] | list[Any] | None) -> str:
    """The routing key of an engine call `openai(kind, body, trace_headers)`: the text a prefix
    cache would share, in prompt order (chat: tool definitions, then each message's role and
    content; completions: the prompt, token ids written as numbers). "" for other calls."""
    if not args or len(args) < 2 or not isinstance(args[1], dict):
        return ""
    body = args[1]
    if "messages" in body:
        parts = [json.dumps(body.get("tools") or [], sort_keys=True)]
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                parts.append(f"{message.get('role')}:{text}")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return " ".join(str(t) for t in prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]  # a batch shares its first prompt's prefix at best
    return ""


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Serve request router of the engine deployment (AppConfig.prefix_affinity)."""

    def initialize_state(self, imbalance_threshold: int = 4, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        text = prompt_text(pending_request.args if pending_request is not None else None)
        if text:
            owner, matched = self.index.match(text)
            by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
            if owner in by_id and matched >= MIN_MATCH_CHARS:
                loads = await self._queue_lens(list(by_id.values()))
                if loads.get(owner, 0) - min(loads.values(), default=0) <= self.imbalance_threshold:
                    metrics.count_routing_decision("affinity")
                    return [[by_id[owner]]]
                metrics.count_routing_decision("load")
            else:
                metrics.count_routing_decision("fallback")
        return await super().choose_replicas(candidate_replicas, pending_request)

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Each replica's ongoing requests: Serve's cache, else a probe (as Serve's own routers
        do; a replica that does not answer in time counts as idle)."""
        loads: dict[str, int] = {}
        missing = []
        for r in replicas:
            cached = self.replica_queue_len_cache.get(r.replica_id)
            if cached is None:
                missing.append(r)
            else:
                loads[r.replica_id.to_full_id_str()] = cached
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                loads[r.replica_id.to_full_id_str()] = queue_len or 0
        return loads

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        text = prompt_text(pending_request.args)
        if text:
            self.index.record(text, replica_id.to_full_id_str())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.to_full_id_str())
