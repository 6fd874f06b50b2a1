"""Pieces the torch, onnxruntime and tensorrt backends share: the embedded signature format, the
per-request loop (one bad request never fails the batch) and output checks.

The exporter (:mod:`pyserve.export`) embeds the protocol signature in what it writes (an extra file
of a ``.pt2``/TorchScript file, ``metadata_props`` of an ONNX model; a TensorRT engine carries its
own I/O names, types and shapes) under :data:`SIGNATURE_KEY`, as ``{"inputs": [{name, datatype, shape}], "outputs": [...]}``
with -1 for the batch dimension.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from pyserve import dtypes
from pyserve.backends.base import InferInputs, InferOutputs, InferResult, ModelSignature, TensorSpec

__all__ = ["SIGNATURE_KEY", "signature_to_json", "signature_from_json", "run_each", "check_output", "run_torch_batch",
           "skip_export_input_checks"]

#: Key of the embedded signature (extra file name of .pt2/.pt, ONNX metadata_props key).
SIGNATURE_KEY = "pyserve_signature.json"


def signature_to_json(sig: ModelSignature) -> str:
    def specs(items):
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in items]

    return json.dumps({"inputs": specs(sig.inputs), "outputs": specs(sig.outputs)}, sort_keys=True)


def signature_from_json(text: str | bytes, what: str) -> ModelSignature:
    """Parse an embedded signature; ValueError naming ``what`` when it is malformed."""
    try:
        raw = json.loads(text)

        def specs(items) -> tuple[TensorSpec, ...]:
            out = []
            for s in items:
                name, dt, shape = s["name"], s["datatype"], s["shape"]
                if not isinstance(name, str) or not name:
                    raise ValueError(f"bad tensor name {name!r}")
                dtypes.from_name(dt)
                if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < -1
                                                      for d in shape):
                    raise ValueError(f"bad shape {shape!r} of {name!r}")
                out.append(TensorSpec(name, dt, tuple(shape)))
            return tuple(out)

        sig = ModelSignature(inputs=specs(raw["inputs"]), outputs=specs(raw["outputs"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: malformed embedded signature {SIGNATURE_KEY}: {exc}") from None
    if not sig.inputs or not sig.outputs:
        raise ValueError(f"{what}: embedded signature {SIGNATURE_KEY} has no inputs or no outputs")
    return sig


def check_output(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """``array`` as the declared datatype; RuntimeError when the model produced another one. A BF16
    output is held as its uint16 bit patterns (numpy has no bfloat16), so uint16 is what BF16 takes."""
    if spec.datatype == "BF16" and array.dtype == np.uint16:
        return np.ascontiguousarray(array)
    actual = dtypes.from_numpy(array.dtype).name
    if actual != spec.datatype:
        raise RuntimeError(f"output {spec.name!r}: the model returned {actual}, its signature declares {spec.datatype}")
    return np.ascontiguousarray(array)


def run_each(fn: Callable[[InferInputs], InferOutputs], batch: Sequence[InferInputs]) -> list[InferResult]:
    """``fn`` on every request; an exception becomes that request's result only."""
    results: list[InferResult] = []
    for inputs in batch:
        try:
            results.append(fn(inputs))
        except Exception as exc:  # the error belongs to this request only
            results.append(exc)
    return results


def _to_torch(array: np.ndarray, datatype: str):
    import torch

    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, order="C", copy=True)
    if datatype == "BF16":  # held as uint16 bits; reinterpret, never convert
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(tensor, spec: TensorSpec) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise RuntimeError(f"output {spec.name!r}: the model returned {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return check_output(tensor.view(torch.int16).numpy().view(np.uint16), spec) if spec.datatype == "BF16" \
            else check_output(tensor.float().numpy(), spec)
    return check_output(tensor.numpy(), spec)


def skip_export_input_checks(module):
    """Turn off the input check torch.export puts on the module it rebuilds (``ExportedProgram.module()``:
    a forward pre-hook that flattens the inputs and checks them against the range constraints with
    sympy, about 100 µs per call, more than the arithmetic of a small model), through the
    switch torch provides for that (``validate_inputs``). The server's data plane has already checked
    every input's name, datatype and shape against the model's signature before a backend runs. A
    module without the switch is returned unchanged."""
    if hasattr(module, "validate_inputs"):
        module.validate_inputs = False
    return module


def run_torch_batch(module, signature: ModelSignature, batch: Sequence[InferInputs]) -> list[InferResult]:
    """Run a torch ``module`` (called with one tensor per ``signature.inputs``, returning a tensor or
    a tuple in ``signature.outputs`` order) on each request of ``batch`` under inference mode.

    Inputs are taken without copying where numpy allows (BF16 arrives as uint16 bits and is
    reinterpreted); an output of another datatype or count than the signature declares, or any
    exception, becomes that request's result only.
    """
    import torch

    def one(inputs: InferInputs) -> InferOutputs:
        args = [_to_torch(inputs[spec.name], spec.datatype) for spec in signature.inputs]
        out = module(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if len(outs) != len(signature.outputs):
            raise RuntimeError(f"the model returned {len(outs)} output(s); its signature declares "
                               f"{len(signature.outputs)}")
        return {spec.name: _to_numpy(t, spec) for spec, t in zip(signature.outputs, outs, strict=True)}

    with torch.inference_mode():
        return run_each(one, batch)
