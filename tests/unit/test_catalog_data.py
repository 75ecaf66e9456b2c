"""The catalog's rows are data (moe_operator/catalog.yaml): shipped with the package, and a row
that does not fit its class stops the import, naming the row."""

from __future__ import annotations

import copy
import fnmatch
import tomllib
from importlib import resources
from typing import Any

import pytest
import yaml
from unit_support import ROOT

from moe_operator import catalog


def _data() -> dict[str, Any]:
    text = resources.files("moe_operator").joinpath("catalog.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def test_catalog_yaml_is_package_data() -> None:
    """pip install (the operator image: images/operator.Dockerfile) ships catalog.yaml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["moe_operator"]
    assert any(fnmatch.fnmatch("catalog.yaml", g) for g in globs), globs


def test_every_row_is_loaded_in_order() -> None:
    data = _data()
    assert list(catalog.ARCHITECTURES) == [r["key"] for r in data["architectures"]]
    assert list(catalog.ACCELERATORS) == [r["name"] for r in data["accelerators"]]
    assert catalog.ARCHITECTURES["mixtral-8x7b"].hf_ids == (
        "mistralai/Mixtral-8x7B-v0.1",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
    )
    assert catalog.ARCHITECTURES["deepseek-v3"].total_params == 671e9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"total_params": "25.97e9"}, "total_params = '25.97e9' is not of type float"),
        ({"num_layers": True}, "num_layers = True is not of type int"),
        ({"hf_ids": ["a", 1]}, "hf_ids = ('a', 1) is not of type tuple[str, ...]"),
        ({"tool_call_parser": 3}, "tool_call_parser = 3 is not of type str | None"),
        ({"num_expert": 8}, "unexpected keyword argument 'num_expert'"),
    ],
)
def test_a_row_that_does_not_fit_is_refused(change: dict[str, Any], message: str) -> None:
    rows = copy.deepcopy(_data()["architectures"])
    rows[1].update(change)
    with pytest.raises(ValueError, match=r"architectures\[1\]") as err:
        catalog._rows(catalog.Architecture, rows, "architectures")
    assert message in str(err.value)


def test_a_missing_field_is_refused() -> None:
    rows = copy.deepcopy(_data()["accelerators"])
    del rows[0]["memory_gib"]
    with pytest.raises(ValueError, match=r"accelerators\[0\].*memory_gib"):
        catalog._rows(catalog.Accelerator, rows, "accelerators")
