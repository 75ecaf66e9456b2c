"""Paths and loaders shared by the unit tests (a plain module: tests/ is not a package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
CLUSTER_EXAMPLES = [p for p in EXAMPLES if "tiny" not in p.name]
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data
