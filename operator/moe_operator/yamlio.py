"""YAML output that stays readable: multi-line strings (serveConfigV2) as literal blocks."""

from __future__ import annotations

from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_all(objects: list[dict[str, Any]]) -> str:
    """Kubernetes objects as one multi-document YAML stream."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)
