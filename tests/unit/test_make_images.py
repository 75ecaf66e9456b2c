"""`make images`: builds both images with Docker where there is one, says what to do where not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from unit_support import ROOT

if shutil.which("make") is None:
    pytest.skip("GNU make is not installed", allow_module_level=True)


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "images", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "MAKEFLAGS": ""},
    )


def _fake_docker(tmp_path: Path, engine: bool) -> tuple[Path, Path]:
    """A `docker` that records its arguments; `info` fails when there is no engine."""
    log = tmp_path / "docker.log"
    script = tmp_path / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        + ("" if engine else 'if [ "$1" = info ]; then exit 1; fi\n')
        + "exit 0\n"
    )
    script.chmod(0o755)
    return script, log


def test_without_docker_it_fails_saying_what_to_do() -> None:
    done = _make("DOCKER=/nonexistent/docker")
    assert done.returncode != 0
    assert "'/nonexistent/docker' not found. Install Docker" in done.stderr


def test_without_a_docker_engine_it_fails_saying_what_to_do(tmp_path: Path) -> None:
    docker, log = _fake_docker(tmp_path, engine=False)
    done = _make(f"DOCKER={docker}")
    assert done.returncode != 0
    assert "no Docker engine is reachable here" in done.stderr
    assert "build" not in log.read_text()  # nothing was attempted


def test_builds_both_images_with_the_given_repo_and_tag(tmp_path: Path) -> None:
    docker, log = _fake_docker(tmp_path, engine=True)
    done = _make(f"DOCKER={docker}", "IMAGE_REPO=registry.example.com/team", "TAG=9.9.9")
    assert done.returncode == 0, done.stderr
    builds = [line for line in log.read_text().splitlines() if line.startswith("build")]
    assert builds == [
        "build -f images/operator.Dockerfile -t registry.example.com/team/moe-operator:9.9.9 .",
        "build -f images/serving.Dockerfile -t registry.example.com/team/moe-serving:9.9.9 .",
    ]
    assert "push registry.example.com/team/moe-operator:9.9.9" in done.stdout


def test_the_operator_image_installs_only_the_operator_extra() -> None:
    """No Ray, vLLM or torch, and no package nothing imports (certbuilder: the webhook's
    certificate is made with cryptography)."""
    text = (ROOT / "images" / "operator.Dockerfile").read_text()
    (install,) = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    assert install.split("pip install --no-cache-dir ")[1].split()[0] == '".[operator]"'
    assert "certbuilder" not in install
