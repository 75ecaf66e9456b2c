"""Launchers: readiness, cold start, RSS of the process tree, guaranteed teardown; engine settings.

The launched process is a stand-in (stub_server.py, standard library): no engine, Ray or vLLM
may start in these tests. The engine settings are checked against the real MoEDeployment API
and planner (pure code).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from stub_system import Stub, stub

from bench.systems import (
    EngineSettings,
    LaunchError,
    VllmServer,
    foreign_engines,
    role_of,
)
from tests.support.ports import free_port
from tests.support.waiting import wait_until


def gone(pids: list[int]) -> bool:
    for pid in pids:
        if psutil.pid_exists(pid):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
    return True


def test_launch_waits_for_ready_and_first_token_then_tears_the_tree_down(tmp_path: Path) -> None:
    system = stub(("--child",))
    with system.launch(tmp_path, sample_interval_s=0.1) as running:
        assert running.ready_at is not None and running.first_token_at is not None
        assert running.launched_at <= running.ready_at <= running.first_token_at
        assert running.cold_start_s is not None and running.cold_start_s > 0
        procs = running.tree.live()
        pids = [p.pid for p in procs]
        assert len(pids) >= 2  # the server and its child
        sample = running.memory.now()
        assert sample.total_rss > 0
        assert sample.total_rss == sum(sample.by_role.values())
        peak = running.memory.peak()
        assert peak is not None and peak.total_rss > 0
    assert gone(pids)
    assert running.proc.returncode is not None
    assert running.facts["teardown"] == []  # SIGINT was enough
    assert "serving on" in running.log_path.read_text()


def test_stubborn_processes_are_killed(tmp_path: Path) -> None:
    system = stub(("--child", "--stubborn"), stop_grace_s=0.5)
    with system.launch(tmp_path) as running:
        pids = [p.pid for p in running.tree.live()]
    assert gone(pids)
    assert any(note.startswith("SIGKILL") for note in running.facts["teardown"])


def test_a_process_that_dies_fails_the_launch_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="exited with code 3") as info:  # noqa: SIM117
        with stub(("--die",)).launch(tmp_path):
            pass
    assert "failing on purpose" in str(info.value)


def test_a_busy_port_is_refused_before_launch(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        system = stub()
        system.http_port = sock.getsockname()[1]
        with pytest.raises(LaunchError, match="already in use"), system.launch(tmp_path):
            pass


def test_not_ready_in_time_is_a_launch_error_and_still_tears_down(tmp_path: Path) -> None:
    @dataclass
    class Silent(Stub):
        def command(self, workdir: Path) -> list[str]:
            return [sys.executable, "-c", "import time; time.sleep(600)"]

    system = Silent(
        name="silent",
        settings=EngineSettings(model_dir=Path("/x")),
        http_port=free_port(),
        ready_timeout_s=1.0,
        stop_grace_s=5.0,
    )
    launched: list[int] = []
    with pytest.raises(LaunchError, match="not ready after"):  # noqa: SIM117
        with system.launch(tmp_path):
            pass
    for proc in psutil.process_iter(["cmdline"]):
        if "time.sleep(600)" in " ".join(proc.info["cmdline"] or []):
            launched.append(proc.pid)
    assert gone(launched)


def test_foreign_engine_processes_are_detected() -> None:
    # A harmless sleeper whose command line looks like Ray's raylet.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "/fake/raylet"],
    )
    try:
        wait_until(
            lambda: any(line.startswith(f"{proc.pid}:") for line in foreign_engines()),
            10,
            0.05,
            "the fake raylet was not detected",
        )
        assert not any(line.startswith(f"{proc.pid}:") for line in foreign_engines({proc.pid}))
    finally:
        proc.kill()
        proc.wait()


def test_roles_of_processes() -> None:
    assert role_of("python -m vllm.entrypoints.openai.api_server", "python") == "other"
    assert role_of("VLLM::EngineCore", "VLLM::EngineCor") == "engine"
    assert role_of("ray::ServeReplica:llm:LLMServer", "ray::ServeRepli") == "replica"
    assert role_of("/venv/bin/raylet --x", "raylet") == "ray"


# ------------------------------------------------------------------- identical engine settings


def test_every_system_gets_the_same_engine_settings(tmp_path: Path) -> None:
    settings = EngineSettings(model_dir=tmp_path / "model")
    args = settings.vllm_cli_args()
    kwargs = settings.engine_kwargs()
    # Every engine kwarg is on the vLLM command line, with the same value.
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        assert flag in args, flag
        if not isinstance(value, bool):
            assert args[args.index(flag) + 1] == str(value)
    assert args[args.index("--model") + 1] == str(tmp_path / "model")
    assert settings.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert settings.env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    cmd = VllmServer("vllm", settings, http_port=8100).command(tmp_path)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    no_ep = EngineSettings(model_dir=tmp_path, expert_parallel=False, tensor_parallel_size=1)
    assert "--enable-expert-parallel" not in no_ep.vllm_cli_args()
    assert "VLLM_CPU_OMP_THREADS_BIND" not in no_ep.env()
    gpu = EngineSettings(model_dir=tmp_path, device="gpu", enforce_eager=False)
    assert not [k for k in gpu.env() if k.startswith("VLLM_CPU")]
    assert "--enforce-eager" not in gpu.vllm_cli_args()


def test_our_manifest_plans_to_the_same_engine_args(tmp_path: Path) -> None:
    """The MoEDeployment given to `moectl up` yields the same engine as the peers get."""
    from moe_operator.api import MoEDeployment
    from moe_operator.local import local_spec
    from moe_operator.planner import plan
    from moe_operator.render import app_config

    settings = EngineSettings(model_dir=tmp_path)
    doc = settings.moe_deployment(http_port=8300, grpc_port=9300)
    dep = MoEDeployment.model_validate(doc)
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
        "torch_dtype": "float32",
    }
    spec = local_spec(dep.spec)
    chosen = plan(spec, model_config=config)
    app = app_config("bench", spec, chosen, model_path=str(tmp_path))
    engine = app.engine
    kwargs = settings.engine_kwargs()
    assert engine.dtype == kwargs["dtype"]
    assert engine.max_model_len == kwargs["max_model_len"]
    assert engine.tensor_parallel_size == kwargs["tensor_parallel_size"]
    assert engine.enable_expert_parallel == kwargs["enable_expert_parallel"]
    assert engine.enforce_eager == kwargs["enforce_eager"]
    for key in ("max_num_seqs", "max_num_batched_tokens", "seed"):
        assert engine.extra[key] == kwargs[key]
    assert engine.served_model_name == settings.served_name
