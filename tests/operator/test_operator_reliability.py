"""Reliability of the real operator against the emulated API (issue #7).

* API faults (503s) and HUNG watches (accepted, then silent forever): the operator converges,
  because kopf's watch client timeout (MOE_OPERATOR_WATCH_CLIENT_TIMEOUT) ends a silent stream
  and the watch resumes from its resourceVersion.
* Secret hygiene over a whole lifecycle: the operator never touches `secrets`, and a Secret's
  value appears in none of its requests, the status, Events, its logs or its spans.

(That a permanently invalid spec is not retried in a loop is tested in test_failures.py.)
Each test prints one summary line of its figures (shown with `pytest -s`).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from expectations import EXPECTED, children, is_
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, mixtral
from tests.support.waiting import eventually

#: Served only by the hygiene test's emulator (the harness's default kinds stay as they are).
SECRETS = em.Kind("", "v1", "secrets", "Secret")


def by_operator(call: em.Call) -> bool:
    return call.user_agent.startswith(("kopf", "moe-operator"))


async def test_converges_through_503s_and_hung_watches(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Healthy streams end server-side after 1 s; only the client timeout ends a silent one.
    monkeypatch.setenv("MOE_OPERATOR_WATCH_SERVER_TIMEOUT", "1")
    monkeypatch.setenv("MOE_OPERATOR_WATCH_CLIENT_TIMEOUT", "2")

    def hung_watch(resource: str) -> em.Fault:
        return em.Fault(
            match=lambda c: c.verb == "watch" and c.resource == resource and by_operator(c),
            status=200,
            hang=True,
        )

    def unavailable(match: Any, times: int = 1) -> em.Fault:
        return em.Fault(match=lambda c: match(c) and by_operator(c), status=503, times=times)

    hangs = [hung_watch("moedeployments"), hung_watch("rayservices")]
    errors = [
        unavailable(lambda c: c.is_write and c.resource == "rayservices"),
        unavailable(lambda c: c.is_write and c.resource == "services", times=2),
        unavailable(lambda c: c.verb == "patch" and c.resource == "moedeployments/status"),
        unavailable(lambda c: c.verb == "list" and c.resource == "poddisruptionbudgets"),
        unavailable(lambda c: c.verb == "get" and c.resource == "rayservices"),
    ]
    api.faults.extend([*hangs, *errors])
    await operator.start()
    # The owner's first watch hangs: the creation reaches the operator only after it gave up.
    await eventually(lambda: all(f.hits for f in hangs), message="both watches hung")
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children", timeout=60)
    # The RayService's status reaches the operator through the (resumed) rayservices watch.
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready", timeout=60)

    injected = sum(f.times for f in [*hangs, *errors])
    hit = sum(f.hits for f in [*hangs, *errors])
    assert [f.hits for f in hangs] == [1, 1]
    assert [f.hits for f in errors] == [f.times for f in errors]
    # Each hung watch was followed by a new watch of the same resource (the client gave up).
    for resource in ("moedeployments", "rayservices"):
        watches = [c for c in api.calls if c.verb == "watch" and c.resource == resource]
        hung_at = next(i for i, c in enumerate(watches) if by_operator(c))
        assert len(watches) > hung_at + 1, f"no new {resource} watch after the hang"
    print(
        f"\nfaults injected {injected} / survived {hit} "
        f"(hung watches {len(hangs)}, HTTP 503 {hit - len(hangs)}); converged to Ready"
    )


class Records(logging.Handler):
    """Every log record of the operator and of kopf, with its extras, as text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(f"{record.getMessage()} {record.__dict__!r}")


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("moe_operator", "kopf")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def secret(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": {"token": base64.b64encode(value.encode()).decode()},
    }


async def test_secret_values_never_leave_their_secret(
    api: em.ApiServer,
    operator: Operator,
    kuberay: KubeRay,
    records: Records,
    spans: InMemorySpanExporter,
) -> None:
    api.register(SECRETS)
    api_key = f"sk-moe-{uuid.uuid4().hex}"
    hub_token = f"hf_{uuid.uuid4().hex}"
    await api.create(SECRETS, secret("serving-key", api_key))
    await api.create(SECRETS, secret("hf-token", hub_token))  # the example's tokenSecretRef
    body = mixtral()
    body["spec"].setdefault("serving", {})["apiKeySecretRef"] = {"name": "serving-key"}
    assert body["spec"]["model"]["tokenSecretRef"]["name"] == "hf-token"

    # The whole lifecycle: create, serve, update, serve, delete.
    await operator.start()
    await api.create(MOED, body, admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
    await api.modify(MOED, NS, "mixtral", {"spec": {"serving": {"maxOngoingRequests": 32}}})
    await eventually(
        lambda: api.read(em.RAYSERVICES, NS, "mixtral")["metadata"]["generation"] == 2,
        message="RayService updated",
    )
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Progressing", "False", "UpToDate"), message="rolled out")
    statuses = json.dumps(api.read(MOED, NS, "mixtral")["status"])
    await api.destroy(MOED, NS, "mixtral")
    await eventually(lambda: children(api) == [], message="children collected")
    await eventually(lambda: not operator.busy, message="idle operator")
    await operator.stop()

    # The pods get the values by reference: the operator only names the Secrets.
    sent = [c.body for c in api.calls if by_operator(c) and c.body]
    assert any('"serving-key"' in text and '"hf-token"' in text for text in sent)
    assert not [c for c in api.calls if (c.resource or "").startswith("secrets")]

    events = json.dumps(api.list_items(em.EVENTS) + api.list_items(em.NEW_EVENTS))
    span_text = repr(
        [(s.name, dict(s.attributes or {}), s.status, s.events) for s in spans.get_finished_spans()]
    )
    places = {
        "request bodies": "\n".join(sent),
        "status": statuses,
        "events": events,
        "logs": "\n".join(records.texts),
        "spans": span_text,
    }
    # Every place was really looked at (each holds the deployment's own name).
    assert all("mixtral" in text for text in places.values()), {
        k: len(v) for k, v in places.items()
    }
    values = [
        api_key,
        hub_token,
        *(base64.b64encode(v.encode()).decode() for v in (api_key, hub_token)),
    ]
    leaks = [(where, v) for where, text in places.items() for v in values if v in text]
    assert leaks == []
    secret_calls = [c for c in api.calls if (c.resource or "").startswith("secrets")]
    print(
        f"\nsecret hygiene: {len(api.calls)} requests ({len(sent)} bodies), "
        f"{len(api.list_items(em.EVENTS)) + len(api.list_items(em.NEW_EVENTS))} events, "
        f"{len(records.texts)} log records, {len(spans.get_finished_spans())} spans scanned; "
        f"calls on secrets {len(secret_calls)}, leaks {len(leaks)}"
    )
