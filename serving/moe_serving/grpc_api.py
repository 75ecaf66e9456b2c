"""Converts between the gRPC messages of `inference.proto` and OpenAI JSON bodies.

The gRPC front end reuses the OpenAI path of the engine (vLLM's request validation, chat
template, sampling): a gRPC request becomes an OpenAI body, and the engine's OpenAI response
(or SSE chunks) become gRPC messages. Pure functions: tested without Ray or vLLM.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from moe_serving.proto import inference_pb2 as pb


class InvalidRequest(ValueError):
    """The gRPC request cannot be turned into a valid OpenAI request (INVALID_ARGUMENT)."""


_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "n",
)


def _json_field(value: str, name: str, kind: type | tuple[type, ...]) -> Any:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, kind):
        names = [k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))]
        raise InvalidRequest(f"{name} must be JSON of type {' or '.join(names)}")
    return parsed


def _sampling(params: pb.SamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        name: getattr(params, name) for name in _SAMPLING_FIELDS if params.HasField(name)
    }
    if params.stop:
        body["stop"] = list(params.stop)
    return body


def _merge_extra(body: dict[str, Any], extra_json: str) -> dict[str, Any]:
    if extra_json:
        extra = _json_field(extra_json, "extra_json", dict)
        clash = sorted(set(extra) & set(body))
        if clash:
            raise InvalidRequest(f"extra_json repeats fields set elsewhere: {clash}")
        body.update(extra)
    return body


def completion_body(request: pb.CompleteRequest, *, stream: bool = False) -> dict[str, Any]:
    """OpenAI `/v1/completions` body for a `CompleteRequest`."""
    if request.prompt and request.prompt_token_ids:
        raise InvalidRequest("set either prompt or prompt_token_ids, not both")
    prompt: str | list[int] = (
        list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt
    )
    body: dict[str, Any] = {"prompt": prompt, **_sampling(request.sampling)}
    if request.model:
        body["model"] = request.model
    if request.return_token_ids:
        body["return_token_ids"] = True
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _merge_extra(body, request.extra_json)


def chat_body(request: pb.ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    """OpenAI `/v1/chat/completions` body for a `ChatRequest`."""
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if not message.role:
            raise InvalidRequest(f"messages[{i}].role must be set")
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls_json:
            item["tool_calls"] = _json_field(
                message.tool_calls_json, f"messages[{i}].tool_calls_json", list
            )
        messages.append(item)
    body: dict[str, Any] = {"messages": messages, **_sampling(request.sampling)}
    if request.model:
        body["model"] = request.model
    if request.return_token_ids:
        body["return_token_ids"] = True
    if request.tools_json:
        body["tools"] = _json_field(request.tools_json, "tools_json", list)
    if request.tool_choice_json:
        body["tool_choice"] = _json_field(request.tool_choice_json, "tool_choice_json", (str, dict))
    if request.response_format_json:
        body["response_format"] = _json_field(
            request.response_format_json, "response_format_json", dict
        )
    if request.chat_template_kwargs_json:
        body["chat_template_kwargs"] = _json_field(
            request.chat_template_kwargs_json, "chat_template_kwargs_json", dict
        )
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _merge_extra(body, request.extra_json)


#: The request's cost in the OpenAI usage (moe_serving.request_cost), copied into pb.Usage.
COST_FIELDS = ("cost_usd", "prompt_cost_usd", "output_cost_usd")


def _usage(usage: dict[str, Any] | None) -> pb.Usage | None:
    if not usage:
        return None
    costs = {k: float(usage[k]) for k in COST_FIELDS if usage.get(k) is not None}
    return pb.Usage(
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
        **costs,
    )


def _tool_calls_json(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls")
    return json.dumps(calls) if calls else ""


def _response_fields(body: dict[str, Any]) -> dict[str, Any]:
    """What a unary response copies from any OpenAI response body besides its choices."""
    return {
        "id": body.get("id", ""),
        "model": body.get("model", ""),
        "created": body.get("created", 0),
        "usage": _usage(body.get("usage")),
    }


def completion_response(body: dict[str, Any]) -> pb.CompleteResponse:
    """`CompleteResponse` from an OpenAI completion response body."""
    choices = [
        pb.Choice(
            index=c.get("index", 0),
            text=c.get("text") or "",
            token_ids=c.get("token_ids") or [],
            finish_reason=c.get("finish_reason") or "",
        )
        for c in body.get("choices", [])
    ]
    return pb.CompleteResponse(choices=choices, **_response_fields(body))


def chat_response(body: dict[str, Any]) -> pb.ChatResponse:
    """`ChatResponse` from an OpenAI chat completion response body."""
    choices = []
    for c in body.get("choices", []):
        message = c.get("message") or {}
        choices.append(
            pb.Choice(
                index=c.get("index", 0),
                text=message.get("content") or "",
                token_ids=c.get("token_ids") or [],
                finish_reason=c.get("finish_reason") or "",
                role=message.get("role") or "",
                tool_calls_json=_tool_calls_json(message),
                reasoning_content=message.get("reasoning_content")
                or message.get("reasoning")
                or "",
            )
        )
    return pb.ChatResponse(choices=choices, **_response_fields(body))


def parse_sse(chunk: str) -> list[dict[str, Any]]:
    """The JSON payloads in an SSE text chunk (`data: {...}` lines; `[DONE]` is dropped)."""
    payloads = []
    for line in chunk.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data and data != "[DONE]":
            payloads.append(json.loads(data))
    return payloads


def stream_chunks(payload: dict[str, Any]) -> list[pb.GenerateChunk]:
    """`GenerateChunk`s for one streamed OpenAI chunk (completion or chat)."""
    chunks = []
    for c in payload.get("choices", []):
        delta = c.get("delta")
        text = (delta.get("content") if delta is not None else c.get("text")) or ""
        chunks.append(
            pb.GenerateChunk(
                id=payload.get("id", ""),
                model=payload.get("model", ""),
                index=c.get("index", 0),
                text=text,
                token_ids=c.get("token_ids") or [],
                finish_reason=c.get("finish_reason") or "",
                tool_calls_json=_tool_calls_json(delta or {}),
                reasoning_content=(delta or {}).get("reasoning_content")
                or (delta or {}).get("reasoning")
                or "",
            )
        )
    usage = _usage(payload.get("usage"))
    if usage is not None and not chunks:
        chunks.append(
            pb.GenerateChunk(id=payload.get("id", ""), model=payload.get("model", ""), usage=usage)
        )
    return chunks


def error_message(payload: dict[str, Any]) -> str | None:
    """The message of an OpenAI error body (also sent as an SSE chunk mid-stream), else None."""
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "error"))
    return None


def error_status(payload: dict[str, Any]) -> int:
    """HTTP status of an OpenAI error body: its own 4xx code (a client error found mid-stream,
    e.g. a token id out of vocabulary) or 503 (retryable: the replica's engine died), else
    500."""
    error = payload.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    try:
        status = int(code) if code is not None else 500
    except (TypeError, ValueError):
        return 500
    return status if 400 <= status < 500 or status == 503 else 500


def models_response(body: dict[str, Any]) -> pb.ListModelsResponse:
    """`ListModelsResponse` from an OpenAI `/v1/models` body."""
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                id=m.get("id", ""),
                owned_by=m.get("owned_by") or "",
                created=m.get("created") or 0,
                max_model_len=m.get("max_model_len") or 0,
                root=m.get("root") or "",
            )
            for m in body.get("data", [])
        ]
    )


# ---- Client side -----------------------------------------------------------------------------

#: The gRPC service config recommended to clients (`proto/client_service_config.json`; README
#: "gRPC clients"): generation RPCs retried on UNAVAILABLE / RESOURCE_EXHAUSTED (the server's
#: retryable refusals) with exponential backoff, the server's `grpc-retry-pushback-ms` hint
#: taking the place of the backoff when it sends one (gRFC A6), up to 5 attempts, and a
#: deadline (`timeout`) per call covering all attempts (600 s, the server's default request
#: timeout; a shorter per-call `timeout=` wins). `grpc.health.v1.Health/Watch` has no deadline.
CLIENT_SERVICE_CONFIG: dict[str, Any] = json.loads(
    resources.files("moe_serving.proto").joinpath("client_service_config.json").read_text()
)


def client_channel_options(
    config: dict[str, Any] | None = None,
) -> list[tuple[str, Any]]:
    """Channel options that apply `config` (default `CLIENT_SERVICE_CONFIG`), e.g.
    `grpc.insecure_channel(target, options=client_channel_options())`."""
    return [
        ("grpc.service_config", json.dumps(CLIENT_SERVICE_CONFIG if config is None else config)),
        ("grpc.enable_retries", 1),
    ]
