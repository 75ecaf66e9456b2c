"""A launchable stand-in system (stub_server.py, standard library: no engine, Ray or vLLM) for
the launcher and orchestration tests of tests/bench/. Private to this folder (imported by name,
as pytest puts it on the path)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.systems import EngineSettings, System
from tests.support.ports import free_port

STUB = Path(__file__).with_name("stub_server.py")


@dataclass
class Stub(System):
    flags: tuple[str, ...] = ()

    def command(self, workdir: Path) -> list[str]:
        return [sys.executable, str(STUB), "--port", str(self.http_port), *self.flags]


def stub(flags: tuple[str, ...] = (), **kw: float) -> Stub:
    return Stub(
        name="stub",
        settings=EngineSettings(model_dir=Path("/nonexistent")),
        http_port=free_port(),
        flags=flags,
        ready_timeout_s=kw.get("ready_timeout_s", 60.0),
        stop_grace_s=kw.get("stop_grace_s", 10.0),
    )
