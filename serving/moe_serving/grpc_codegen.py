"""Regenerates the gRPC modules in `moe_serving/proto/` from `inference.proto`.

Run `python -m moe_serving.grpc_codegen` after editing the proto. The generated modules are
committed. protoc runs from the directory above the package, with the proto named by its package
path (`moe_serving/proto/inference.proto`): the generated code then imports
`moe_serving.proto.inference_pb2` and its message classes report that module as theirs, which
matters because Ray Serve pickles request and response messages between processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding moe_serving/
PROTO = Path("moe_serving/proto/inference.proto")


def generate(root: Path = PACKAGE_ROOT) -> list[Path]:
    """Run grpc_tools' protoc on the proto; returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(root / PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    out_dir = root / PROTO.parent
    stem = PROTO.stem
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC modules (see `moe_serving.grpc_codegen`)."""\n')
    return [
        out_dir / f"{stem}_pb2.py",
        out_dir / f"{stem}_pb2.pyi",
        out_dir / f"{stem}_pb2_grpc.py",
    ]


def main() -> int:
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
