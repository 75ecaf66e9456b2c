"""kube.api_error: the official client's ApiException as the handlers' kube.ApiError."""

from __future__ import annotations

import json

from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException
from urllib3 import HTTPHeaderDict

from moe_operator import kube


def _exception(
    status: int, reason: str, body: str | None, headers: dict[str, str] | None = None
) -> ApiException:
    err = ApiException(status=status, reason=reason, body=body)
    err.headers = HTTPHeaderDict(headers or {})
    return err


def _status(code: int, reason: str, message: str) -> str:
    return json.dumps(
        {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}
    )


def test_status_body_and_retry_after() -> None:
    err = kube.api_error(
        _exception(
            429,
            "Too Many Requests",
            _status(429, "TooManyRequests", "slow down"),
            {"Retry-After": "3"},
        )
    )
    assert (err.status, err.reason, err.message, err.retry_after) == (
        429,
        "TooManyRequests",
        "slow down",
        3.0,
    )
    assert err.transient and not err.rejected


def test_conflict_and_invalid() -> None:
    conflict = kube.api_error(_exception(409, "Conflict", _status(409, "Conflict", "changed")))
    assert conflict.status == 409 and conflict.transient and conflict.retry_after is None
    invalid = kube.api_error(_exception(422, "Unprocessable Entity", _status(422, "Invalid", "x")))
    assert invalid.rejected and not invalid.transient


def test_schema_500_without_reason_is_rejected() -> None:
    """Server-side apply's error for a field the schema lacks: 500, a message, no reason."""
    body = json.dumps({"kind": "Status", "code": 500, "message": "field not declared in schema"})
    err = kube.api_error(_exception(500, "Internal Server Error", body))
    assert err.status == 500 and err.reason == "Internal Server Error"
    assert err.rejected and not err.transient


def test_plain_text_body_and_http_date_retry_after() -> None:
    err = kube.api_error(
        _exception(503, "Service Unavailable", "upstream gone", {"Retry-After": "Wed, 21 Oct 2015"})
    )
    assert (err.status, err.reason, err.message, err.retry_after) == (
        503,
        "Service Unavailable",
        "upstream gone",
        None,
    )
    assert err.transient


def test_no_http_answer_is_unavailable() -> None:
    """The client's status 0 (e.g. a TLS failure before any answer) is a transient 503."""
    err = kube.api_error(ApiException(status=0, reason="SSLError\ncertificate verify failed"))
    assert err.status == 503 and err.transient
    assert "certificate verify failed" in err.message


def test_authorization_as_kopf_reads_it() -> None:
    bearer = Configuration(api_key={"BearerToken": "Bearer abc"})
    assert kube.authorization(bearer) == ("Bearer", "abc")
    basic = Configuration(api_key={"authorization": "Basic dXNlcjpwdw=="})
    assert kube.authorization(basic) == ("Basic", "dXNlcjpwdw==")
    assert kube.authorization(Configuration()) == (None, None)
