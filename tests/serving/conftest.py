"""Fixtures shared by the serving tests: tiny checkpoints made once per session, offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# No model hub here: everything is made locally (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from moe_serving.tinymodel import Arch, make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Arch], Path]:
    """Returns a function giving the session's tiny checkpoint of an architecture (made once)."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: Arch) -> Path:
        return make_model(arch, root / arch, seed=0)

    return get


@pytest.fixture(scope="session")
def tiny_gemma4(tiny_models: Callable[[Arch], Path]) -> Path:
    """The default tiny Gemma-4-style MoE checkpoint."""
    return tiny_models("gemma4")
