"""Skip the chart tests, with the reason, when no helm binary is installed."""

from __future__ import annotations

import pytest

from tests.support.helm_render import helm_binary


@pytest.fixture(autouse=True)
def _require_helm() -> None:
    if helm_binary() is None:
        pytest.skip(
            "helm is not installed: run `python hack/install_helm.py --dest .venv/bin` "
            "(or `make install`) to run the chart tests"
        )
