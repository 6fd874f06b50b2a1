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


def eval_mode(module: torch.nn.Module) -> torch.nn.Module:
    """``module.eval()``, except for modules rebuilt by torch.export, which refuse train()/eval()
    (their graph was captured in one mode already)."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


def export(module: torch.nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True, dynamic_axes=None):
    """``torch.export`` ``module`` (in eval mode) with dim 0 of every input dynamic (the batch), or
    the dims ``dynamic_axes[i]`` of input ``i`` (dim 0 of every input shares the symbol ``batch``;
    the others are ``Dim.DYNAMIC``, their range and relations inferred from the model, e.g. a
    sequence length capped by a position-embedding table). A module rebuilt by torch.export
    (``ExportedProgram.module()``) has no eval() and is captured as it is."""
    eval_mode(module)
    dynamic_shapes = None
    if dynamic_axes is not None:
        syms = {}

        def sym(d):
            if d != 0:
                return torch.export.Dim.DYNAMIC
            if d not in syms:
                syms[d] = torch.export.Dim("batch")
            return syms[d]

        dynamic_shapes = tuple({d: sym(d) for d in axes} or None for axes in dynamic_axes)
    elif dynamic_batch:
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


def check_signature(ep, manifest, state: dict, constants: dict) -> str | None:
    """Compare the manifest (tensors, inputs, outputs) with what the rebuilt graph expects.

    Returns a description of the first mismatch, or None. Dimensions the graph keeps symbolic
    (the batch) must be -1 in the manifest; the others must match exactly.
    """
    from torch.export.graph_signature import InputKind

    from pyserve import dtypes

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    stored = {**state, **constants}
    expected_tensors, user_inputs = set(), []
    for spec in ep.graph_signature.input_specs:
        val = placeholders[spec.arg.name].meta.get("val") if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(val)
            continue
        if spec.target is None:
            continue
        expected_tensors.add(spec.target)
        tensor = stored.get(spec.target)
        if tensor is None:
            return f"tensor {spec.target!r} is missing"
        if isinstance(val, torch.Tensor) and (tuple(val.shape) != tuple(tensor.shape) or val.dtype != tensor.dtype):
            return (f"tensor {spec.target!r} is {tensor.dtype} {list(tensor.shape)}, "
                    f"the graph expects {val.dtype} {list(val.shape)}")
    extra = sorted(set(stored) - expected_tensors)
    if extra:
        return f"tensor {extra[0]!r} is not used by the graph"
    outputs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    out_vals = [o.meta.get("val") if hasattr(o, "meta") else None for o in outputs]
    for kind, specs, vals in (("input", manifest.inputs, user_inputs), ("output", manifest.outputs, out_vals)):
        if len(specs) != len(vals):
            return f"{len(specs)} {kind}s declared, the graph has {len(vals)}"
        for spec, val in zip(specs, vals):
            if not isinstance(val, torch.Tensor):
                continue
            if dtypes.from_torch(val.dtype).name != spec.datatype:
                return f"{kind} {spec.name!r} is declared {spec.datatype}, the graph has {dtypes.from_torch(val.dtype).name}"
            graph_shape = [d if isinstance(d, int) else -1 for d in val.shape]
            if list(spec.shape) != graph_shape:
                return f"{kind} {spec.name!r} is declared {list(spec.shape)}, the graph has {graph_shape}"
    return None
