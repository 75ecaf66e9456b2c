"""A tiny AppConfig: what the served-app tests deploy on a tiny local checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_serving.config import AppConfig, EngineArgs


def tiny_app_config(
    model_dir: Path | str,
    name: str = "tiny",
    *,
    served_model_name: str = "tiny-moe",
    max_model_len: int = 2048,
    **fields: Any,
) -> AppConfig:
    """An AppConfig serving `model_dir` in fp32, eagerly, with a 300 s request timeout.

    Each keyword goes where its name belongs: an engine argument (`tensor_parallel_size=2`,
    `tool_call_parser="hermes"`, ...) into `engine`, anything else (`max_ongoing_requests=2`,
    `resources={...}`, `tracing={...}`, ...) to the top level. Validated as the replicas do.
    """
    engine: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": served_model_name,
        "dtype": "float32",
        "max_model_len": max_model_len,
        "enforce_eager": True,
    }
    app: dict[str, Any] = {"deployment_name": name, "request_timeout_s": 300}
    for key, value in fields.items():
        if key in EngineArgs.model_fields:
            engine[key] = value
        elif key in AppConfig.model_fields and key != "engine":
            app[key] = value
        else:
            raise TypeError(f"tiny_app_config: {key!r} is neither an engine nor an app field")
    return AppConfig.model_validate({**app, "engine": engine})
