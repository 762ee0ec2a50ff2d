"""Generate the gRPC stubs in ``novelcrafter/v1`` from ``proto/`` (``make proto``).

The stubs are committed so that images and installs need no code generator;
``tests/test_proto.py`` regenerates them into a temporary folder and fails if
the committed ones differ, so they can never drift from the ``.proto`` files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "novelcrafter" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc for every .proto file; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    generated = sorted((out_dir / "novelcrafter" / "v1").glob("*.py*"))
    return generated


def main() -> int:
    written = generate(ROOT)
    init = ROOT / "novelcrafter" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs for novelcrafter.v1 (make proto)."""\n')
    for path in written:
        print(f"generated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
