"""Regenerate the gRPC stubs committed next to seamline.proto (``make protos``).

The proto is compiled under the virtual path ``seamline/protos/seamline.proto`` so that the
generated modules import each other as ``seamline.protos.seamline_pb2``: no post-processing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("seamline_pb2.py", "seamline_pb2_grpc.py", "seamline_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Compile seamline.proto into out_dir; return the generated files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-Iseamline/protos={HERE}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", "seamline/protos/seamline.proto"]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on seamline.proto; see the message above")
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for name in GENERATED:
            dst = out_dir / name
            shutil.copyfile(Path(tmp, "seamline", "protos", name), dst)
            files.append(dst)
        return files


if __name__ == "__main__":
    for f in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {f}")
