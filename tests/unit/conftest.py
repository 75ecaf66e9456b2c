"""Shared fixtures for the pure unit tests (no cluster, no Ray, no vLLM)."""

from __future__ import annotations

from typing import Any

import pytest
from unit_support import ROOT, load


@pytest.fixture
def gemma() -> dict[str, Any]:
    return load(ROOT / "manifests" / "examples" / "gemma4-26b-a4b-a100-80gb.yaml")


@pytest.fixture(autouse=True)
def _moe_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny checkpoints made by planning tiny:// sources go to one session-wide folder.
    monkeypatch.setenv("MOE_HOME", str(tmp_path_factory.getbasetemp() / "moe-home"))
