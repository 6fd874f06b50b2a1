"""``pyserve inspect ARTIFACT``: print an artifact's signature, per-tensor encoding and sizes."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what a .pyserve artifact holds", description=__doc__)
    p.add_argument("artifact", help=".pyserve file")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pyserve.artifact import ArtifactError, read_manifest
    from pyserve.cli import UsageError

    try:
        m = read_manifest(args.artifact)
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(m.raw, indent=2))
        return 0
    print(f"{args.artifact}: model {m.model_name!r}, format version {m.format_version}, {m.size_bytes} bytes, "
          f"checksums OK")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            print(f"  {kind:<7}{s.name:<16}{s.datatype:<6}{list(s.shape)}")
    print(f"  {'tensor':<16}{'role':<11}{'encoding':<10}{'shape':>12}{'bytes':>10}  details")
    for name, t in m.tensors.items():
        details = ""
        if t.get("encoding") == "sparse":
            details = (f"nnz={t.get('nnz')} entries={t.get('entries')} index_bits={t.get('index_bits')} "
                       f"values={t.get('values')} entropy={t.get('entropy')}")
        shape = "x".join(map(str, t.get("shape", [])))
        print(f"  {name:<16}{t.get('role', ''):<11}{t.get('encoding', ''):<10}{shape:>12}{t.get('size_bytes', 0):>10}  {details}")
    if "fp32_bytes" in m.stats:
        print(f"  fp32 {m.stats['fp32_bytes']} bytes -> {m.size_bytes} bytes = {m.stats['fp32_bytes'] / m.size_bytes:.1f}x")
    return 0
