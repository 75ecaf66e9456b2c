"""Prefix-affinity routing, the pure parts: the prefix index and the routing key of a call.
(The router itself runs in Serve: tests/serving/test_prefix_routing.py.)"""

from __future__ import annotations

import subprocess
import sys

from moe_serving.prefix_index import PrefixIndex
from moe_serving.routing import prompt_text

SYSTEM = "You are an agent. " * 40  # ~720 chars: several blocks


def test_longest_recorded_prefix_names_its_replica() -> None:
    index = PrefixIndex(block_chars=64)
    index.record(SYSTEM + "session A turn 1", "r1")
    index.record("something else entirely " * 10, "r2")
    owner, matched = index.match(SYSTEM + "session A turn 2 with more history")
    assert owner == "r1"
    assert matched >= len(SYSTEM) - 64
    assert index.match("unrelated prompt " * 10) == (None, 0)


def test_the_latest_holder_of_a_prefix_wins_and_a_dead_replica_is_forgotten() -> None:
    index = PrefixIndex(block_chars=64)
    index.record(SYSTEM, "r1")
    index.record(SYSTEM + "x" * 64, "r2")
    assert index.match(SYSTEM + "x" * 64)[0] == "r2"
    index.forget("r2")
    assert index.match(SYSTEM)[0] is None  # r2 had overwritten the shared blocks


def test_index_is_bounded() -> None:
    index = PrefixIndex(block_chars=8, max_entries=10)
    for i in range(50):
        index.record(f"{i:08d}" * 4, f"r{i}")
    assert len(index) == 10
    assert index.match(f"{49:08d}" * 4)[0] == "r49"  # the most recent survive


def test_routing_key_of_chat_puts_tools_first_and_keeps_roles() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    text = prompt_text(("chat", body, None))
    assert text.index('"name": "f"') < text.index("system:sys") < text.index("user:")
    # Same tools and history, one more turn: the earlier text is a prefix.
    longer = {**body, "messages": [*body["messages"], {"role": "user", "content": "more"}]}
    assert prompt_text(("chat", longer, None)).startswith(text)


def test_routing_key_of_completions_and_other_calls() -> None:
    assert prompt_text(("completions", {"prompt": "abc"}, None)) == "abc"
    assert prompt_text(("completions", {"prompt": [1, 2, 3]}, None)) == "1 2 3"
    assert prompt_text(("completions", {"prompt": ["a", "b"]}, None)) == "a"
    assert prompt_text(()) == ""  # metrics_text(), check_health(): no body
    assert prompt_text(None) == ""


_INGRESS = r"""
import asyncio
import sys
from types import SimpleNamespace

from ray import cloudpickle

import moe_serving.app  # the ingress's process runs the app's code
from moe_serving import metrics
from moe_serving.prefix_index import PrefixIndex

router_cls = cloudpickle.loads(sys.stdin.buffer.read())
# One affinity decision: the only replica served this prompt's prefix and is idle.
router = object.__new__(router_cls)
router.imbalance_threshold = 4
router.index = PrefixIndex()
prompt = "agent system prompt " * 20
router.index.record(prompt, "A")
replica = SimpleNamespace(replica_id=SimpleNamespace(to_full_id_str=lambda: "A"))


async def idle(replicas):
    return {"A": 0}


router._queue_lens = idle
pending = SimpleNamespace(args=("completions", {"prompt": prompt + "turn 2"}, None))
chosen = asyncio.run(router.choose_replicas([replica], pending))
assert chosen == [[replica]], chosen
print(metrics.routing_text())
"""


def test_decisions_reach_the_ingress_metrics_through_serves_pickling() -> None:
    """Serve ships the router class to each caller pickled *by value* (ray/serve/config.py,
    `RequestRouterConfig._serialize_request_router_cls`: `cloudpickle.register_pickle_by_value`
    on the router's module; the caller's `get_request_router_class` unpickles it). A counter
    defined in the router's module travelled as a copy (or, in a process without the app's
    imports, failed to pickle at all: its lock), so the ingress's /metrics never showed one.
    This serialises the class with Serve's own config
    and unpickles it in a fresh process, as the ingress receives it, then counts with it."""
    from ray.serve.config import RequestRouterConfig

    import moe_serving.app  # noqa: F401  (the builder's process, where Serve pickles the class)

    config = RequestRouterConfig(request_router_class="moe_serving.routing:PrefixAffinityRouter")
    done = subprocess.run(
        [sys.executable, "-c", _INGRESS],
        input=config.get_serialized_request_router_cls(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert 'moe_routing_decisions_total{reason="affinity"} 1.0' in done.stdout.decode()
