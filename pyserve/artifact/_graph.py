"""Model graph capture and rebuild with torch.export (no per-architecture code, no pickle).

The graph is stored as torch.export's own JSON serialization of the ExportedProgram (the
``exported_program`` part of ``torch._export.serde.serialize``), zlib-compressed; the weights are
stored separately by pyserve's encodings and handed back as tensors at load, so the only thing ever
parsed from the file is JSON and pyserve's own blobs.
"""

from __future__ import annotations

import zlib

import torch

GRAPH_FORMAT = "torch.export"


def export(module: torch.nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True):
    """``torch.export`` ``module`` (in eval mode) with dim 0 of every input dynamic (the batch)."""
    module = module.eval()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)
    ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    # Source stack traces would put the writer's file paths and source lines into the artifact
    # (and make it differ between checkouts); the graph does not need them.
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    return ep


def serialize(ep) -> tuple[bytes, dict, list[str], list[str]]:
    """Returns (zlib-compressed graph JSON, meta, parameter names, constant names)."""
    from torch._export.serde import serialize as serde

    art = serde.serialize(ep)
    sig = ep.graph_signature
    params = sorted(set(sig.parameters))
    meta = {"format": GRAPH_FORMAT, "compression": "zlib", "torch_version": torch.__version__.split("+")[0]}
    return zlib.compress(art.exported_program, 9), meta, params, sorted(ep.constants)


def deserialize(blob: bytes, state_dict: dict, constants: dict, parameter_names: set[str]):
    """Rebuild the ExportedProgram from the stored graph and decoded tensors."""
    from torch._export.serde import serialize as serde

    graph_json = zlib.decompress(blob)
    state = {k: (torch.nn.Parameter(v, requires_grad=False) if k in parameter_names else v)
             for k, v in state_dict.items()}
    return serde.deserialize(serde.SerializedArtifact(graph_json, state, constants, b""))
