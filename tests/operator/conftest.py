"""Fixtures: the API emulator on loopback, the operator in-process, the KubeRay stand-in, the
operator's spans in memory."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import moe_operator.handlers  # noqa: F401  (registers the handlers in kopf's default registry)
from moe_operator import tracing
from tests.support import kube_emulator as em
from tests.support.operator_harness import KubeRay, Operator, Reconciles, emulated_cluster


@pytest.fixture
async def api(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[em.ApiServer]:
    async with emulated_cluster(tmp_path, monkeypatch) as server:
        yield server


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
    if op.stop_flag is not None:
        op.stop_flag.set()  # releases kopf's executor thread even after a crash or failed start


@pytest.fixture
def kuberay(api: em.ApiServer) -> KubeRay:
    return KubeRay(api)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span of the operator runs started in this test, kept in memory."""
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "EXTRA_PROCESSORS", [SimpleSpanProcessor(exporter)])
    yield exporter
    exporter.shutdown()
