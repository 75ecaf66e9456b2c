"""Run the real `helm` binary on the chart and parse what it renders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moe-operator"
CRD_DIR = CHART / "crds"
INSTALL_YAML = ROOT / "manifests" / "install.yaml"
RENDER_SCRIPT = ROOT / "hack" / "render_manifests.py"
NAMESPACE = "moe-system"
# Kubernetes version the objects are rendered for and validated against (kubernetes-validate
# ships schemas for it).
KUBE_VERSION = "1.30.0"

Obj = dict[str, Any]

# Value sets every render/lint/validation test runs over (name -> values file content).
VALUE_SETS: dict[str, Obj] = {
    "defaults": {},
    "namespaces": {"watchNamespaces": ["a", "b"]},
    "no-peering": {"peering": {"enabled": False}},
    "webhook": {"webhook": {"enabled": True}},
    "custom": {
        "image": {
            "repository": "registry.example.com/ml/moe-operator",
            "tag": "9.9.9-test",
            "pullPolicy": "Always",
        },
        "resources": {
            "requests": {"cpu": "250m", "memory": "300Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        "env": [{"name": "MOE_OPERATOR_EXTRA", "value": "on"}],
        "logLevel": "verbose",
        "logFormat": "json",
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "patterns": {"watchNamespaces": ["team-*", "ml"], "peering": {"createObjects": False}},
    "namespaces-webhook-standalone": {
        "watchNamespaces": ["a", "b"],
        "webhook": {"enabled": True},
        "peering": {"enabled": False},
    },
}


def helm_binary() -> str | None:
    """The venv's helm (installed by hack/install_helm.py), else helm on PATH."""
    beside_python = Path(sys.executable).parent / "helm"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("helm")


def run_helm(*args: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm with the given arguments (and a values file holding `values`)."""
    helm = helm_binary()
    assert helm is not None, "helm missing: the test should have been skipped"
    cmd = [helm, *args]
    if values is not None:
        # JSON is YAML; helm reads it as a values file.
        cmd += ["--values", "-"]
    return subprocess.run(
        cmd,
        input=json.dumps(values) if values is not None else None,
        capture_output=True,
        text=True,
        check=False,
    )


def template(values: Obj, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_helm(
        "template",
        "moe-operator",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *extra,
        values=values,
    )


@cache
def _render_text(values_json: str) -> str:
    proc = template(json.loads(values_json))
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return proc.stdout


def render(values: Obj) -> list[Obj]:
    """The objects `helm template` renders for these values (hooks included)."""
    return parse_documents(_render_text(json.dumps(values, sort_keys=True)))


def parse_documents(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str) -> Obj:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(objs: list[Obj]) -> Obj:
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def crd_files() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml")) + sorted(CRD_DIR.glob("*.yml"))
