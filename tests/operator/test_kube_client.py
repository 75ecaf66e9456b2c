"""The operator's API client is the official `kubernetes` client (moe_operator.kube).

* Errors: what the API server answers (a Status with a reason, Retry-After) reaches the
  handlers as `kube.ApiError` with the same status, reason, message and delay.
* Login: the operator reads the kubeconfig with the official client's loaders, so a kubeconfig
  exec credential plugin (which kopf's own kubeconfig parser does not run) authenticates both
  kopf's watches and the operator's server-side applies.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import yaml
from expectations import EXPECTED, children

from moe_operator import kube, settings
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, Operator, mixtral
from tests.support.waiting import eventually

SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "probe", "namespace": NS},
    "spec": {"ports": [{"port": 80}]},
}


def _client(token: str = "test-token") -> kube.Client:
    kubeconfig = yaml.safe_load(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    cfg = kube.Configuration(host=server, api_key={"BearerToken": f"Bearer {token}"})
    return kube.Client(lambda: cfg, user_agent=settings.USER_AGENT, workers=2)


async def test_api_answers_map_to_api_error(api: em.ApiServer) -> None:
    client = _client()
    try:
        api.faults.append(em.Fault(match=lambda c: c.verb == "patch", status=429, retry_after=7))
        with pytest.raises(kube.ApiError) as throttled:
            await client.apply(SERVICE, field_manager=settings.FIELD_MANAGER)
        assert throttled.value.status == 429
        assert throttled.value.retry_after == 7.0
        assert throttled.value.reason == "Injected"  # the Status's reason, not the HTTP phrase
        assert throttled.value.message == "injected fault 429"
        assert throttled.value.transient and not throttled.value.rejected

        api.faults.append(em.Fault(match=lambda c: c.verb == "patch", status=409))
        with pytest.raises(kube.ApiError) as conflict:
            await client.apply(SERVICE, field_manager=settings.FIELD_MANAGER)
        assert (conflict.value.status, conflict.value.retry_after) == (409, None)
        assert conflict.value.transient

        services = kube.KINDS[("v1", "Service")]
        assert await client.get(services, NS, "absent") is None  # 404 is "not there"
        assert not await client.delete(services, NS, "absent")

        # The same request without a fault goes through, as a server-side apply.
        applied = await client.apply(SERVICE, field_manager=settings.FIELD_MANAGER)
        assert applied["metadata"]["name"] == "probe"
        sent = [c for c in api.calls if c.verb == "patch" and c.resource == "services"]
        assert {c.content_type.split(";")[0] for c in sent} == {"application/apply-patch+yaml"}
        assert {c.params.get("fieldManager") for c in sent} == {settings.FIELD_MANAGER}
        assert {c.user_agent for c in sent} == {settings.USER_AGENT}
    finally:
        await client.close()


async def test_kubeconfig_exec_plugin_login_goes_through_the_official_client(
    api: em.ApiServer,
    operator: Operator,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kubeconfig = yaml.safe_load(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": "exec-token"},
    }
    kubeconfig["users"] = [
        {
            "name": "op",
            "user": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1beta1",
                    "command": sys.executable,
                    "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
                }
            },
        }
    ]
    path = tmp_path / "kubeconfig-exec"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))

    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")

    applies = [
        c
        for c in api.calls
        if c.user_agent.startswith("moe-operator")
        and c.content_type.startswith("application/apply")
    ]
    assert applies, "the operator applied its children"
    assert {c.token for c in applies} == {"exec-token"}
    kopf_calls = [c for c in api.calls if c.user_agent.startswith("kopf")]
    assert kopf_calls and {c.token for c in kopf_calls} == {"exec-token"}
