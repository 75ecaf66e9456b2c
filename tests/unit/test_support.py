"""The shared test helpers (tests/support) that the engine tests rely on without running here."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from tests.support.appconfig import tiny_app_config
from tests.support.ports import free_port
from tests.support.served import Served
from tests.support.waiting import poll_until, wait_for_items, wait_until


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_wait_until_returns_the_first_good_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter), 5, 0) == 1  # 0 is falsy
    counter = itertools.count()
    assert wait_until(lambda: next(counter), 5, 0, ok=lambda n: n >= 3) == 3


def test_wait_until_fails_with_the_message_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"never settled: \{'total': 2\}"):
        wait_until(lambda: {"total": 2}, 0.05, 0.01, "never settled", ok=lambda d: not d["total"])
    with pytest.raises(AssertionError, match=r"^no load$"):
        wait_until(lambda: False, 0.05, 0.01, "no load")  # a plain False is not repeated
    with pytest.raises(AssertionError, match=r"^3 left$"):
        wait_until(lambda: 3, 0.05, 0.01, lambda last: f"{last} left", ok=lambda n: n == 0)


def test_wait_until_polls_through_ignored_errors_only() -> None:
    answers = iter([KeyError("total"), ValueError("not json"), {"total": 0}])

    def probe() -> dict[str, int]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(probe, 5, 0, ignore=(KeyError, ValueError)) == {"total": 0}
    with pytest.raises(AssertionError, match="KeyError"):
        wait_until(lambda: {}["x"], 0.05, 0.01, ignore=(KeyError,))
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, 5, 0, ignore=(KeyError,))


def test_poll_until_returns_the_last_value_without_failing() -> None:
    assert poll_until(lambda: [1], 0.05, 0.01, ok=lambda left: not left) == [1]
    counter = itertools.count()
    assert poll_until(lambda: next(counter), 5, 0, ok=lambda n: n == 2) == 2


def test_wait_for_items_counts_what_other_threads_appended() -> None:
    items = ["a", "b"]
    wait_for_items(items, 2, 0.05, "load")
    with pytest.raises(AssertionError, match=r"load: 2 of 3, the last \['a', 'b'\]"):
        wait_for_items(items, 3, 0.05, "load", interval_s=0.01)


def test_tiny_app_config_puts_each_field_where_it_belongs() -> None:
    config = tiny_app_config(
        Path("/models/tiny"),
        "moe-test",
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        max_queued_requests=2,
        resources={"num_cpus_per_rank": 1},
    )
    assert config.deployment_name == "moe-test" and config.request_timeout_s == 300
    engine = config.engine
    assert (engine.model, engine.served_model_name, engine.dtype) == (
        "/models/tiny",
        "tiny-moe",
        "float32",
    )
    assert engine.max_model_len == 2048 and engine.enforce_eager
    assert engine.tensor_parallel_size == 2 and engine.enable_expert_parallel
    assert config.max_queued_requests == 2 and config.resources.num_cpus_per_rank == 1
    served = Served("http://127.0.0.1:1", "127.0.0.1:2", config)
    assert served.model_dir == Path("/models/tiny") and not served.stopped
    with pytest.raises(TypeError, match="max_num_seqs"):
        tiny_app_config("/m", max_num_seqs=4)  # an engine `extra`, not a field
