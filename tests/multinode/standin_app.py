"""`import_path` target for placement tests: the real application (`moe_serving.app.build`,
same deployment options, same ingress) with `StandInEngine` as its engine deployment."""

from __future__ import annotations

from typing import Any

from ray import serve
from standin_engine import StandInEngine

from moe_serving.app import build
from moe_serving.config import AppConfig


def build_app(args: dict[str, Any]) -> serve.Application:
    return build(AppConfig.model_validate(args), StandInEngine)
