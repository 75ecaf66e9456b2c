"""Fixtures: the API emulator on loopback, the operator in-process, the KubeRay stand-in."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator, Iterator

import kmock
import kube_emulator as em
import pytest
import yaml
from operator_harness import KINDS, KubeRay, Operator, Reconciles

import moe_operator.handlers  # noqa: F401  (registers the handlers in kopf's default registry)


@pytest.fixture
async def api(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[em.ApiServer]:
    server = em.ApiServer()
    for kind in KINDS:
        server.register(kind)
    async with server, kmock.Server(server, host="127.0.0.1", port=0) as srv:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emu", "cluster": {"server": str(srv.url).rstrip("/")}}],
                    "users": [{"name": "op", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "op"}}],
                    "current-context": "emu",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_ENABLED", "true")
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_LOCAL", "true")
        monkeypatch.setenv("MOE_OPERATOR_WEBHOOK_PORT", "0")
        # Short delays keep the tests fast; the logic is the same as with the defaults.
        monkeypatch.setenv("MOE_OPERATOR_RETRY_DELAY", "0.2")
        monkeypatch.setenv("MOE_OPERATOR_WAIT_DELAY", "0.5")
        yield server
        await server.drop_watches()  # let the server close without waiting on open streams


@pytest.fixture
def reconciles() -> Iterator[Reconciles]:
    handler = Reconciles()
    logger = logging.getLogger("moe_operator")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
async def operator(api: em.ApiServer) -> AsyncIterator[Operator]:
    op = Operator(api)
    yield op
    await op.stop()


@pytest.fixture
def kuberay(api: em.ApiServer) -> KubeRay:
    return KubeRay(api)
