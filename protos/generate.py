"""Regenerate the checked-in Python code of every `.proto`, or check it is current.

`python -m protos.generate` rewrites the generated modules; `--check` regenerates into
a scratch folder and exits 1 if any checked-in file differs (CI runs that).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

# Proto imports are written relative to the repository root ("protos/recfunnel/v1/…"),
# so the generated `from protos.recfunnel.v1 import …` lines resolve without rewriting.
REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/recfunnel/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every `.proto`, writing the generated files under `out_root`."""
    protos = sorted(str(p) for p in (REPO_ROOT / PROTO_DIR).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted((out_root / PROTO_DIR).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        stale = []
        for path in fresh:
            checked_in = REPO_ROOT / PROTO_DIR / path.name
            if check:
                if not checked_in.exists() or not filecmp.cmp(path, checked_in, shallow=False):
                    stale.append(checked_in.name)
            else:
                shutil.copyfile(path, checked_in)
        known = {p.name for p in fresh}
        orphans = [
            p.name
            for p in (REPO_ROOT / PROTO_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES) and p.name not in known
        ]
    if check and (stale or orphans):
        print(f"generated proto code is stale: {sorted(stale + orphans)}; "
              "run `python -m protos.generate`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
