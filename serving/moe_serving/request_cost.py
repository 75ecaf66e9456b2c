"""The cost of each request: the replica's hourly price shared by token-seconds (pure).

A replica costs `hourly_usd / 3600` per second whether it is busy or not. While requests run
in its engine (from the moment vLLM receives one until its last output), every instant's cost
is split among them in proportion to the tokens each holds in the engine at that instant (its
prompt plus what it has generated so far): its share of the replica's token-seconds.

    cost_i = sum over intervals dt of  hourly_usd / 3600 * dt * tokens_i / sum_j tokens_j

Each request's cost is reported in two parts: `prompt_cost_usd`, accrued from its arrival in
the engine to its first output token (its prefill, including waiting in vLLM's scheduler), and
`output_cost_usd`, accrued after that (decoding). Time with no request in the engine is idle:
attributed to nobody. So over a window in which the engine is never idle, the requests' costs
add up to the replica's cost for that window exactly (up to the requests straddling its edges).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestCost:
    prompt_usd: float
    output_usd: float

    @property
    def total_usd(self) -> float:
        return self.prompt_usd + self.output_usd

    def usage_fields(self) -> dict[str, float]:
        """The extension fields of an OpenAI `usage` object (README: Cost per request)."""
        return {
            "cost_usd": round(self.total_usd, 12),
            "prompt_cost_usd": round(self.prompt_usd, 12),
            "output_cost_usd": round(self.output_usd, 12),
        }


@dataclass
class _Share:
    tokens: int
    decoding: bool = False
    prompt_usd: float = 0.0
    output_usd: float = 0.0


@dataclass
class CostMeter:
    """Shares one replica's cost among the requests in its engine (one per replica process)."""

    hourly_usd: float
    clock: Callable[[], float] = time.monotonic
    active: dict[Hashable, _Share] = field(default_factory=dict)
    attributed_usd: float = 0.0  # everything handed to requests so far
    _last: float | None = None

    def _advance(self) -> None:
        now = self.clock()
        if self._last is not None and self.active:
            dt = max(0.0, now - self._last)
            total = sum(max(s.tokens, 1) for s in self.active.values())
            usd = self.hourly_usd / 3600.0 * dt
            for share in self.active.values():
                part = usd * max(share.tokens, 1) / total
                if share.decoding:
                    share.output_usd += part
                else:
                    share.prompt_usd += part
            self.attributed_usd += usd
        self._last = now

    def start(self, key: Hashable, prompt_tokens: int) -> None:
        """vLLM received the request (its prompt, tokenized)."""
        self._advance()
        self.active[key] = _Share(tokens=prompt_tokens)

    def progress(self, key: Hashable, tokens: int) -> None:
        """The request now holds `tokens` (prompt + generated); it has produced output."""
        self._advance()
        share = self.active.get(key)
        if share is not None:
            share.tokens = tokens
            share.decoding = True

    def finish(self, key: Hashable) -> RequestCost | None:
        """The request left the engine (finished, aborted); its cost, once."""
        self._advance()
        share = self.active.pop(key, None)
        if share is None:
            return None
        return RequestCost(share.prompt_usd, share.output_usd)
