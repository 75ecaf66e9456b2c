"""Expert-load counting inside vLLM's worker processes (where the routing ids exist).

vLLM on the CPU cannot return the routed experts of a request (that needs Model Runner V2), and
its Prometheus metrics have no per-expert series. The top-k expert ids of every MoE layer pass
through the experts' `apply` method inside each worker process, which is where the EP fix
(`moe_serving.ep_fix`) already patches. `install()` wraps that method once more to count them:

* with expert parallelism (`expert_map` given), each rank counts the (token, expert) pairs routed
  to the experts it holds, so the ranks' counts add up to tokens x top_k per layer and the
  per-rank totals show EP imbalance;
* without it, only the first tensor-parallel rank counts (every TP rank sees the same ids).

Counts live in process memory and a daemon thread writes them, when changed, as one JSON file
per process into `$MOE_EXPERT_LOAD_DIR` (set by the replica before vLLM starts; unset = off).
The replica sums the files at scrape time (`moe_serving.expert_metrics`). Exact for the TP+EP layout
(every rank sees every token's ids); meant for eager CPU execution (counting inside a captured
CUDA graph would not run per step).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vllm.moe_serving.expert_load")

ENV_DIR = "MOE_EXPERT_LOAD_DIR"
_MARK = "__moe_expert_load_original__"
FLUSH_INTERVAL_S = 0.25


def _ranks() -> tuple[int, bool]:
    """(EP rank of this process, whether it counts when no expert_map is given)."""
    try:
        from vllm.distributed import parallel_state as ps

        ep_rank = ps.get_ep_group().rank_in_group if ps._EP is not None else 0
        first_tp = ps.get_tensor_model_parallel_rank() == 0
        return ep_rank, first_tp
    except Exception:  # not initialised (unit use): a single rank
        return 0, True


class ExpertCounter:
    """Per-process counts: layer (first-seen order) -> tokens routed to each global expert."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.layer_of: dict[int, int] = {}  # id(experts object) -> layer index
        self.counts: dict[int, list[int]] = {}
        self.rank: tuple[int, bool] | None = None
        self.dirty = False
        self._thread: threading.Thread | None = None

    def record(
        self, owner: object, topk_ids: torch.Tensor, expert_map: torch.Tensor | None
    ) -> None:
        import torch

        if self.rank is None:
            self.rank = _ranks()
        ids = topk_ids.reshape(-1).to(torch.long)
        if expert_map is not None:
            ids = ids[expert_map.to(torch.long)[ids] >= 0]  # only experts this rank holds
            size = int(expert_map.numel())
        elif not self.rank[1]:
            return
        else:
            size = int(ids.max().item()) + 1 if ids.numel() else 0
        binned = torch.bincount(ids, minlength=size).tolist()
        with self.lock:
            layer = self.layer_of.setdefault(id(owner), len(self.layer_of))
            current = self.counts.setdefault(layer, [])
            if len(current) < len(binned):
                current.extend([0] * (len(binned) - len(current)))
            for expert, n in enumerate(binned):
                current[expert] += n
            self.dirty = True
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moe-expert-load", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def _loop(self) -> None:
        event = threading.Event()
        while not event.wait(FLUSH_INTERVAL_S):
            self.flush()

    def flush(self) -> None:
        """Write this process's counts atomically (readers never see half a file)."""
        with self.lock:
            if not self.dirty:
                return
            self.dirty = False
            ep_rank = self.rank[0] if self.rank else 0
            payload = {
                "ep_rank": ep_rank,
                "pid": os.getpid(),
                "layers": {str(k): list(v) for k, v in self.counts.items()},
            }
        target = self.directory / f"rank{ep_rank}-pid{os.getpid()}.json"
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh)
            os.replace(tmp, target)
        except OSError as exc:  # the replica removed the directory: stop quietly
            logger.debug("expert load flush failed: %s", exc)


_COUNTER: list[ExpertCounter] = []


def counter() -> ExpertCounter | None:
    """This process's counter, or None when counting is off (no `$MOE_EXPERT_LOAD_DIR`)."""
    if _COUNTER:
        return _COUNTER[0]
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    _COUNTER.append(ExpertCounter(path))
    return _COUNTER[0]


def counting_apply(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an experts `apply(self, ..., topk_ids, ..., expert_map, ...)` to count routing."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def apply(*args: Any, **kwargs: Any) -> Any:
        found = counter()
        if found is not None:
            bound = signature.bind(*args, **kwargs)
            topk_ids = bound.arguments.get("topk_ids")
            if topk_ids is not None:
                found.record(args[0], topk_ids, bound.arguments.get("expert_map"))
        return original(*args, **kwargs)

    setattr(apply, _MARK, original)
    return apply


def install(classes: list[type]) -> list[str]:
    """Wrap `apply` of each class (idempotent; only when counting is on). Returns names done."""
    if not os.environ.get(ENV_DIR):
        return []
    done = []
    for cls in classes:
        current = cls.__dict__.get("apply")
        if current is None or hasattr(current, _MARK):
            continue
        params = inspect.signature(current).parameters
        if "topk_ids" not in params:
            continue
        cls.apply = counting_apply(current)  # type: ignore[attr-defined]
        done.append(cls.__name__)
    return done
