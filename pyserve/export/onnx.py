"""ONNX export: fp32, fp16 and int8 (explicit QuantizeLinear/DequantizeLinear) graphs.

Steps: ``torch.onnx.export`` of the source module (the dynamo exporter when ``onnxscript`` is
installed: it writes opset 18+, and older opsets come from ``onnx.version_converter``, which lacks
down-converters for some ops (e.g. Relu 14 -> 13, LayerNormalization below 17); when that fails, the
TorchScript-based exporter, which cannot trace torch.export graphs (artifacts, .pt2) but handles
recipe models), then a graph pass for the
precision, then the protocol signature in ``metadata_props`` (key ``pyserve_signature.json``, read
by the ``onnxruntime`` backend), then ``onnx.checker.check_model(full_check=True)``.

fp16 (:func:`to_fp16`)
    Every fp32 initializer and value becomes fp16 (onnxruntime's own ``float16`` converter,
    ``keep_io_types=True``): inputs and outputs stay fp32 with Casts at the edges, so clients and
    configs do not change. The graph is strongly typed: TensorRT reads fp16 from it.

int8 (:func:`to_int8_qdq`)
    For every int8-encoded tensor of a pyserve artifact (``pyserve.artifact.encode_int8``: int8
    values ``q`` [N, ...] and per-output-channel fp32 scales ``s`` [N]) the graph's fp32 initializer
    holding ``q * s`` is replaced by an INT8 initializer ``q`` and a ``DequantizeLinear(q, s,
    zero_point=0, axis=0)`` node (axis 1 where the exporter stored the weight transposed), so the
    compressor's int8 values and scales reach the runtime unchanged (symmetric, zero point 0, as in
    the QDQ format of TensorRT's explicit quantization and onnxruntime's QDQ models). Activations:
    when the artifact carries a static ``input_scale`` (from calibration), the activation input of
    each MatMul/Gemm/Conv that consumes the weight gets ``QuantizeLinear -> DequantizeLinear`` with
    that scale (per tensor, zero point 0), so the consumer runs int8 x int8; without it activations
    are left fp32 (weight-only int8). DynamicQuantizeLinear is not used: it produces uint8 with a
    zero point, which TensorRT's explicit quantization does not accept. Per-channel
    DequantizeLinear needs opset >= 13.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from pyserve.backends._common import SIGNATURE_KEY, signature_to_json
from pyserve.backends.base import ModelSignature, TensorSpec

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "export_onnx_model", "to_fp16", "to_int8_qdq", "finalize"]

#: opset written when none is asked for
DEFAULT_OPSET = 18
#: lowest opset per precision: per-channel (axis) DequantizeLinear arrived in opset 13
MIN_OPSET = {"fp32": 11, "fp16": 11, "int8": 13}


def _dynamo_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx_model(module, example_inputs: tuple, sig: ModelSignature, *, opset: int = DEFAULT_OPSET,
                      dynamic_batch: bool = True):
    """``torch.onnx.export`` of ``module`` into an ``onnx.ModelProto`` with the signature's names.

    Dimension 0 of inputs and outputs declared -1 is named ``batch`` (dynamic) when
    ``dynamic_batch``; every other dimension is fixed to the example's size.

    Raises ValueError when the exporter fails (its message's first line kept).
    """
    import io

    import onnx
    import torch

    in_names = [s.name for s in sig.inputs]
    out_names = [s.name for s in sig.outputs]
    batched_in = [s.name for s in sig.inputs if s.shape and s.shape[0] == -1]
    batched_out = [s.name for s in sig.outputs if s.shape and s.shape[0] == -1]
    errors = []
    model = None
    if _dynamo_available():
        try:
            dyn = None
            if dynamic_batch and batched_in:
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                dyn = tuple({0: batch} if n in batched_in else None for n in in_names)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # placeholder names, renamed below: the exporter may give an inner value the name of an
                # output (MiniLM's aten.embedding node is "embedding"), which breaks SSA
                tmp_in = [f"pyserve_input_{i}" for i in range(len(in_names))]
                tmp_out = [f"pyserve_output_{i}" for i in range(len(out_names))]
                prog = torch.onnx.export(module, tuple(example_inputs), dynamo=True, input_names=tmp_in,
                                         output_names=tmp_out, opset_version=max(opset, 18),
                                         dynamic_shapes=dyn, optimize=True, verbose=False)
            model = _rename_values(prog.model_proto, dict(zip(tmp_in + tmp_out, in_names + out_names)))
            model = _name_batch_dims(model, batched_in + batched_out if dynamic_batch else [])
            if opset < 18:  # the dynamo exporter writes 18+: convert down
                from onnx import version_converter

                model = version_converter.convert_version(model, opset)
        except Exception as exc:  # fall back to the TorchScript-based exporter below
            errors.append(f"dynamo exporter: {type(exc).__name__}: {_first_line(exc)}")
            model = None
    if model is None:
        try:
            buf = io.BytesIO()
            axes = {n: {0: "batch"} for n in batched_in + batched_out} if dynamic_batch else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_NoTrain(module), tuple(example_inputs), buf, dynamo=False, input_names=in_names,
                                  output_names=out_names, opset_version=opset, dynamic_axes=axes,
                                  do_constant_folding=True)
            model = onnx.load_from_string(buf.getvalue())
        except Exception as exc:
            errors.append(f"TorchScript exporter: {type(exc).__name__}: {_first_line(exc)}")
            hint = " (opset 18 or newer avoids the down-conversion)" if opset < 18 else ""
            raise ValueError(f"torch.onnx.export failed at opset {opset}{hint}: " + "; ".join(errors)) from None
    written = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if written != [opset]:
        raise ValueError(f"asked for opset {opset}, the exporter wrote {written}")
    return model


def _no_train_wrapper():
    import torch

    class NoTrain(torch.nn.Module):
        """Forwards to ``module``; ``train()`` does nothing (the TorchScript exporter calls it, and the
        module of a torch.export program refuses it)."""

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

        def train(self, mode: bool = True):
            return self

    return NoTrain


def _NoTrain(module):
    return _no_train_wrapper()(module)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _rename_values(model, renames: dict[str, str]):
    """Rename graph values (``old -> new``); an inner value already called ``new`` is renamed first."""
    g = model.graph
    taken = set(renames.values())
    existing = ({i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
                | {o for n in g.node for o in n.output})
    mapping = {}
    for name in taken & existing:
        if name not in renames:
            k = 0
            while f"{name}_inner{k}" in existing:
                k += 1
            mapping[name] = f"{name}_inner{k}"
    mapping.update(renames)

    def sub(x: str) -> str:
        return mapping.get(x, x)

    for n in g.node:
        n.input[:] = [sub(x) for x in n.input]
        n.output[:] = [sub(x) for x in n.output]
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = sub(v.name)
    for init in g.initializer:
        init.name = sub(init.name)
    return model


def _name_batch_dims(model, names: list[str]):
    """Give dim 0 of the named graph inputs/outputs the symbolic name ``batch`` (dynamo names it s0...)."""
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in names and v.type.tensor_type.shape.dim:
            d = v.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = "batch"
    return model


def to_fp16(model):
    """fp16 weights and compute with fp32 inputs/outputs (Casts at the edges); see the module docstring."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    # the converter appends the edge Casts after their consumers; ONNX needs producers first
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(_toposort(nodes, model.graph))
    return model


def _weight_index(model):
    """initializer name -> (index, fp32 array) for every fp32 initializer."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for i, init in enumerate(model.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            out[init.name] = (i, numpy_helper.to_array(init))
    return out


def _digest(a: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes() + str(a.shape).encode()).digest()


def to_int8_qdq(model, int8: dict, *, opset: int):
    """Replace the fp32 weights of ``int8`` (state-dict name -> ``Int8Parts``) by INT8 initializers
    plus per-channel DequantizeLinear nodes, and add activation Q/DQ where a static input scale
    exists (see the module docstring).

    Initializers are matched to the artifact's tensors by name, else by value (``q * s`` exactly,
    or its transpose for 2-D weights the exporter pre-transposed).

    Returns ``(model, report)`` where report maps each int8 tensor to ``"axis 0"``/``"axis 1"``
    (+ ``", activation q/dq"``).

    A tensor found nowhere in the graph (the exporter removed it as unused, or folded it into another
    constant) is reported as ``"not in the exported graph"``.

    Raises ValueError when ``int8`` is empty, ``opset`` < 13, or no int8 tensor is found at all.
    """
    from onnx import helper, numpy_helper

    if not int8:
        raise ValueError("int8 export needs int8 weights")
    if opset < MIN_OPSET["int8"]:
        raise ValueError(f"int8 needs opset >= {MIN_OPSET['int8']} (per-channel DequantizeLinear), got {opset}")
    g = model.graph
    weights = _weight_index(model)
    by_digest = {}
    for name, (_, arr) in weights.items():
        by_digest.setdefault(_digest(arr), name)
        if arr.ndim == 2:
            by_digest.setdefault(_digest(arr.T), "T:" + name)
    consumers: dict[str, list] = {}
    for node in g.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    new_nodes, drop, report = [], set(), {}
    act_q: dict[int, tuple] = {}  # id(consumer node) -> (node, weight value name, static input scale)
    for tname in sorted(int8):
        parts = int8[tname]
        q, s = parts.values, parts.scale.astype(np.float32)
        deq = (q.astype(np.float32) * s.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)
        match, axis, values = None, 0, q
        if tname in weights and weights[tname][1].shape == q.shape and np.allclose(weights[tname][1], deq, rtol=1e-6,
                                                                                      atol=0):
            match = tname
        else:
            hit = by_digest.get(_digest(deq))
            if hit is not None and not hit.startswith("T:"):
                match = hit
            elif q.ndim == 2:
                hit = by_digest.get(_digest(deq.T))
                if hit is not None and not hit.startswith("T:"):
                    match, axis, values = hit, 1, np.ascontiguousarray(q.T)
        if match is None:  # dead code the exporter removed (e.g. an unused pooler), or folded into a constant
            report[tname] = "not in the exported graph"
            continue
        if match in drop:
            continue
        drop.add(match)
        base = match.replace("/", "_").replace(":", "_")
        q_name, s_name, z_name = f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"
        g.initializer.extend([numpy_helper.from_array(values.astype(np.int8), q_name),
                              numpy_helper.from_array(s, s_name),
                              numpy_helper.from_array(np.zeros(s.shape, np.int8), z_name)])
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [match], axis=axis,
                                          name=f"{base}_DequantizeLinear"))
        report[tname] = f"axis {axis}"
        if parts.input_scale is not None:
            for consumer in _matmul_consumers(match, consumers):
                act_q[id(consumer)] = (consumer, match, parts.input_scale)
                report[tname] += ", activation q/dq"
    if not drop:
        raise ValueError(f"none of the {len(int8)} int8 tensors is an initializer of the exported graph")
    keep = [init for init in g.initializer if init.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    for node, weight_name, scale in act_q.values():
        _insert_activation_qdq(g, node, weight_name, scale, consumers, new_nodes)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(_toposort(nodes, g))
    # the fp32 value_info of a replaced weight stays valid (DequantizeLinear outputs fp32)
    return model, report


def _matmul_consumers(weight: str, consumers: dict) -> list:
    """MatMul/Gemm/Conv nodes that take ``weight``, directly or through a Transpose/Reshape."""
    out, frontier, seen = [], [weight], set()
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("MatMul", "Gemm", "Conv"):
                out.append(node)
            elif node.op_type in ("Transpose", "Reshape", "Cast"):
                frontier.extend(node.output)
    return out


def _insert_activation_qdq(g, node, weight_name: str, scale: float, consumers: dict, new_nodes: list) -> None:
    """Put QuantizeLinear -> DequantizeLinear (per tensor, zero point 0) on ``node``'s activation input."""
    from onnx import helper, numpy_helper

    idx = 0 if node.op_type in ("Gemm", "Conv") else None
    if idx is None:  # MatMul: the input that does not come from the weight
        from_weight = _reaches(weight_name, consumers)
        idx = 1 if node.input[0] not in from_weight else 0
        if node.input[idx] in from_weight:
            return
    act = node.input[idx]
    base = f"{(node.name or node.output[0]).replace('/', '_')}_input{idx}"
    s_name, z_name = f"{base}_scale", f"{base}_zero_point"
    g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                          numpy_helper.from_array(np.array(0, np.int8), z_name)])
    new_nodes.append(helper.make_node("QuantizeLinear", [act, s_name, z_name], [f"{base}_q"], name=f"{base}_Quantize"))
    new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", s_name, z_name], [f"{base}_dq"],
                                      name=f"{base}_Dequantize"))
    node.input[idx] = f"{base}_dq"


def _reaches(weight: str, consumers: dict) -> set:
    names, frontier = {weight}, [weight]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Transpose", "Reshape", "Cast"):
                for o in node.output:
                    if o not in names:
                        names.add(o)
                        frontier.append(o)
    return names


def _toposort(nodes: list, g) -> list:
    """Nodes ordered so every input is produced before use (ONNX requires it)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    producers = {}
    for n in nodes:
        for o in n.output:
            producers[o] = n
    order, done = [], set()

    def visit(n):
        if id(n) in done:
            return
        for inp in n.input:
            if inp not in available and inp in producers and id(producers[inp]) not in done:
                visit(producers[inp])
        done.add(id(n))
        order.append(n)

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(nodes) + 1000))
    try:
        for n in nodes:
            visit(n)
    finally:
        sys.setrecursionlimit(limit)
    return order


def finalize(model, sig: ModelSignature):
    """Embed the signature and check the model (``onnx.checker`` full check); returns the model.

    Raises ValueError with the checker's message when the graph is invalid.
    """
    import onnx

    for prop in list(model.metadata_props):
        if prop.key == SIGNATURE_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = SIGNATURE_KEY, signature_to_json(sig)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValueError(f"the exported ONNX graph fails onnx.checker: {_first_line(exc)}") from None
    return model


def signature_with_batch(sig: ModelSignature, dynamic_batch: bool) -> ModelSignature:
    """``sig`` as exported: without ``dynamic_batch`` the -1 batch becomes the example batch size."""
    if dynamic_batch:
        return sig

    def fix(specs):
        return tuple(TensorSpec(s.name, s.datatype, tuple(1 if (i == 0 and d == -1) else d
                                                          for i, d in enumerate(s.shape))) for s in specs)

    return ModelSignature(fix(sig.inputs), fix(sig.outputs))


def write_model(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path))
