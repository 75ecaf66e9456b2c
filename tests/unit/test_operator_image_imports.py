"""The operator image has no Ray, vLLM or torch: its entry points import without them.

Each check runs in a fresh interpreter whose import system refuses `ray`, `vllm` and `torch`
(and everything under them), as the operator image built from images/operator.Dockerfile (the
`operator` extra only) would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from unit_support import ROOT

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
        BLOCKED = ("ray", "vllm", "torch")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "operator"), str(ROOT / "serving"), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_blocker_blocks() -> None:
    """The check below could fail: here `import ray` does fail."""
    done = _run("import ray\n")
    assert done.returncode != 0 and "No module named 'ray'" in done.stderr


def test_operator_entry_points_import_without_ray_vllm_torch() -> None:
    """`kopf run --module moe_operator.handlers` (the chart's command), the webhook, the CLI and
    every other moe_operator module import, and nothing pulled in ray, vllm or torch."""
    done = _run(
        """
        import importlib, pkgutil, sys
        import moe_operator
        names = sorted(m.name for m in pkgutil.iter_modules(moe_operator.__path__))
        for name in names:
            importlib.import_module(f"moe_operator.{name}")
        import kopf
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm", "torch"))
        assert not heavy, heavy
        assert "handlers" in names and "cli" in names and "webhook" in names, names
        print("imported", len(names))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported")


def test_moectl_plan_and_render_work_without_ray_vllm_torch() -> None:
    example = ROOT / "manifests" / "examples" / "gemma4-26b-a4b-a100-80gb.yaml"
    for command in ("plan", "render", "validate"):
        done = _run(
            f"from moe_operator.cli import main\nmain([{command!r}, '-f', {str(example)!r}])"
        )
        assert done.returncode == 0, (command, done.stderr)


def test_moectl_up_names_the_extra_to_install() -> None:
    """Not a bare ModuleNotFoundError traceback: what is missing and how to install it."""
    done = _run("from moe_operator.cli import main\nmain(['up'])\n")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "ray, vllm, torch cannot be imported" in done.stderr
    assert "pip install 'moe-operator[serving,cpu]'" in done.stderr
