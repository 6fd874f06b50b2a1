"""``pyserve inspect ARTIFACT``: an artifact's signature and a per-tensor table.

For each stored tensor: role, encoding, shape, sparsity (share of zero weights), bits per stored
value (codebook index bits, 8 for int8, the datatype's width for raw), bytes, and bytes by part
(``gaps`` = relative indices, ``codes`` = codebook indices, ``codebook``, ``values``, ``scale``,
``data``). A summary line totals the bytes by part over the whole file, including the header,
manifest and graph. Nothing is decoded: the figures come from the manifest and its blob table.
"""

from __future__ import annotations

import argparse
import json
import math

# Blob keys of the encodings (docs/artifact.md) -> the part they hold, for the summary line.
_PARTS = {"gaps": "indices", "codes": "indices", "codebook": "codebooks", "values": "values",
          "scale": "scales", "data": "values"}


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what a .pyserve artifact holds", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help=".pyserve file")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=run)


def tensor_rows(manifest) -> list[dict]:
    """One dict per stored tensor: name, role, encoding, shape, sparsity, bits, bytes, parts.

    ``parts`` maps each blob key of the tensor's encoding to its size in bytes, read from the
    manifest's blob table. ``sparsity`` is ``None`` for encodings that do not record zeros.
    """
    blob_table = manifest.raw.get("blobs", {})
    rows = []
    for name, t in manifest.tensors.items():
        shape = [int(d) for d in t.get("shape", [])]
        numel = math.prod(shape)
        encoding = t.get("encoding", "")
        parts = {key: int(blob_table.get(blob, {}).get("size_bytes", 0)) for key, blob in t.get("blobs", {}).items()}
        sparsity = bits = None
        if encoding == "sparse":
            sparsity = 1.0 - t.get("nnz", 0) / numel if numel else 0.0
            bits = (max(1, math.ceil(math.log2(t["codebook_size"]))) if t.get("values") == "codebook"
                    and t.get("codebook_size") else 32)
        elif encoding == "int8":
            bits = 8
        elif encoding == "raw":
            from pyserve import dtypes

            try:
                bits = 8 * (dtypes.from_name(t.get("datatype", "")).byte_size or 0) or None
            except ValueError:
                bits = None
        rows.append({"name": name, "role": t.get("role", ""), "encoding": encoding, "shape": shape,
                     "sparsity": sparsity, "bits": bits, "bytes": sum(parts.values()), "parts": parts})
    return rows


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
    if m.text_input is not None:  # a stored tokenizer: sentences in, fed to the inputs above
        t = m.raw["text"]
        print(f"  {'text':<7}{m.text_input.name:<16}{'BYTES':<6}[-1]  tokenizer inside (max_length "
              f"{t.get('max_length')}; feeds {', '.join(t.get('feeds', {}))}; the server takes this input)")
    rows = tensor_rows(m)
    width = max([16] + [len(r["name"]) + 2 for r in rows])
    print(f"  {'tensor':<{width}}{'role':<11}{'encoding':<10}{'shape':>12}{'sparsity':>10}{'bits':>6}{'bytes':>10}"
          f"  bytes by part")
    totals: dict[str, int] = {}
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        sparsity = f"{100 * r['sparsity']:.1f}%" if r["sparsity"] is not None else "-"
        bits = str(r["bits"]) if r["bits"] is not None else "-"
        parts = " ".join(f"{k}={v}" for k, v in r["parts"].items())
        print(f"  {r['name']:<{width}}{r['role']:<11}{r['encoding']:<10}{shape:>12}{sparsity:>10}{bits:>6}"
              f"{r['bytes']:>10}  {parts}")
        for key, size in r["parts"].items():
            part = _PARTS.get(key, "other")
            totals[part] = totals.get(part, 0) + size
    graph_blob = m.raw.get("graph", {}).get("blob")
    totals["graph"] = int(m.raw.get("blobs", {}).get(graph_blob, {}).get("size_bytes", 0))
    blob_region = sum(int(b.get("size_bytes", 0)) for b in m.raw.get("blobs", {}).values())
    totals["header+manifest"] = m.size_bytes - blob_region
    other = blob_region - sum(v for k, v in totals.items() if k != "header+manifest")
    if other:
        totals["other"] = totals.get("other", 0) + other
    print("  bytes by part: " + ", ".join(f"{k} {v}" for k, v in totals.items() if v)
          + f" = {sum(totals.values())}")
    if "fp32_bytes" in m.stats:
        print(f"  fp32 {m.stats['fp32_bytes']} bytes -> {m.size_bytes} bytes = {m.stats['fp32_bytes'] / m.size_bytes:.1f}x")
    return 0
