"""The ``tensorrt`` backend: a serialized TensorRT engine (``model.plan``) on a CUDA GPU.

Load: ``Runtime.deserialize_cuda_engine``; the signature comes from the engine's I/O tensors
(``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``; -1 where a dimension is dynamic) and the
batch ranges of its optimization profiles (``get_tensor_profile_shape``). Inference: one execution
context per concurrently running instance (a pool grown on demand, so a model with
``instance_group count: N`` gets N contexts), the optimization profile chosen by the request's
batch size (:func:`choose_profile`), then ``set_optimization_profile_async``, ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream of that context. Device memory
and streams come from torch's CUDA allocator.

Works with the full ``tensorrt`` package or the lean runtime (``tensorrt_lean``/``tensorrt_lean_bindings``). A TensorRT
``Runtime`` is never created without a GPU (it wraps a bad pointer and crashes later): :meth:`load`
checks for a device first and refuses with a clear error.

NOT exercised in CI: TensorRT cannot be installed on the CI machines. What needs no library
(profile choice, shape checks, dtype mapping) is pure code tested without it; the runtime API names
used (:data:`RUNTIME_API`) are checked against the lean bindings' real API in the tests.
"""

from __future__ import annotations

import asyncio
import functools
import queue
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pyserve.backends._common import check_output, run_each
from pyserve.backends.base import InferInputs, InferOutputs, InferResult, ModelSignature, TensorSpec

__all__ = ["TensorRTBackend", "EngineIO", "ProfileRange", "RUNTIME_API", "TRT_DTYPES", "choose_profile",
           "check_input_shape", "signature_of", "import_tensorrt"]

#: Every TensorRT runtime attribute this backend uses (checked against the lean bindings in tests).
RUNTIME_API = (
    "Logger", "Logger.WARNING", "Runtime", "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.num_optimization_profiles", "ICudaEngine.create_execution_context",
    "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT",
    "DataType.FLOAT", "DataType.HALF", "DataType.INT8", "DataType.INT32", "DataType.INT64", "DataType.BOOL",
    "DataType.UINT8", "DataType.BF16",
)

#: TensorRT DataType member name -> protocol datatype.
TRT_DTYPES = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
              "BOOL": "BOOL", "UINT8": "UINT8"}


def import_tensorrt():
    """The ``tensorrt`` module, else the lean runtime (``tensorrt_lean``, or ``tensorrt_lean_bindings`` as
    the ``tensorrt-lean-cu12-bindings`` wheel names it); ImportError when none is there."""
    import importlib

    for name in ("tensorrt", "tensorrt_lean", "tensorrt_lean_bindings"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("the tensorrt backend needs TensorRT: install `tensorrt` (full) or the lean runtime "
                      "`tensorrt-lean-cu12-bindings` + `tensorrt-lean-cu12-libs`")


@dataclass(frozen=True)
class ProfileRange:
    """One optimization profile of an input: min/opt/max shapes (full shapes, batch first)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class EngineIO:
    """An engine's I/O as plain data: ``inputs``/``outputs`` are (name, protocol datatype, shape with
    -1 for dynamic dims); ``profiles[p][input name]`` is that input's range in profile ``p``."""

    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    profiles: tuple[dict[str, ProfileRange], ...]


def signature_of(io: EngineIO) -> ModelSignature:
    return ModelSignature(inputs=tuple(TensorSpec(*t) for t in io.inputs),
                          outputs=tuple(TensorSpec(*t) for t in io.outputs))


def choose_profile(io: EngineIO, shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the optimization profile to run ``shapes`` (input name -> full shape) with.

    Among the profiles whose [min, max] ranges hold every input shape, the one with the smallest
    max batch (its kernels were tuned closest to the request). An engine without profiles (static
    shapes) uses profile 0.

    Raises ValueError naming the input and the batch ranges when no profile holds the request.
    """
    if not io.profiles:
        return 0
    fitting = []
    for p, ranges in enumerate(io.profiles):
        if all(check_input_shape(ranges[n], s) is None for n, s in shapes.items() if n in ranges):
            fitting.append((max(r.max[0] if r.max else 0 for r in ranges.values()), p))
    if not fitting:
        batches = ", ".join(f"profile {p}: batch {min(r.min[0] for r in rs.values())}..{max(r.max[0] for r in rs.values())}"
                            for p, rs in enumerate(io.profiles) if rs)
        problems = "; ".join(f"{n}: {check_input_shape(io.profiles[0][n], s)}"
                             for n, s in shapes.items() if n in io.profiles[0])
        raise ValueError(f"no optimization profile of the engine takes input shapes {dict(shapes)} "
                         f"({batches}){'; ' + problems if problems else ''}")
    return min(fitting)[1]


def check_input_shape(rng: ProfileRange, shape: Sequence[int]) -> str | None:
    """None when ``shape`` lies within ``rng`` (dimension by dimension), else what is wrong."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(rng.min):
        return f"rank {len(shape)}, the engine expects rank {len(rng.min)}"
    for i, (d, lo, hi) in enumerate(zip(shape, rng.min, rng.max)):
        if not lo <= d <= hi:
            return f"dimension {i} is {d}, the profile allows {lo}..{hi}"
    return None


def _dtype_name(dt) -> str:
    name = getattr(dt, "name", str(dt).rsplit(".", 1)[-1])
    if name not in TRT_DTYPES:
        raise ValueError(f"TensorRT datatype {name} has no protocol datatype")
    return TRT_DTYPES[name]


def read_engine_io(trt, engine) -> EngineIO:
    """Describe ``engine``'s I/O tensors and optimization profiles (TensorRT 10+ tensor API)."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = (name, _dtype_name(engine.get_tensor_dtype(name)), tuple(int(d) for d in engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    profiles = []
    for p in range(engine.num_optimization_profiles):
        ranges = {}
        for name, _, shape in inputs:
            if -1 in shape:
                lo, opt, hi = engine.get_tensor_profile_shape(name, p)
                ranges[name] = ProfileRange(tuple(lo), tuple(opt), tuple(hi))
        profiles.append(ranges)
    return EngineIO(tuple(inputs), tuple(outputs), tuple(profiles))


class TensorRTBackend:
    """Backend for ``DIR/<model>/<version>/model.plan`` (a serialized TensorRT engine)."""

    platform = "tensorrt_plan"

    def __init__(self, artifact_path: Path, *, executor: Executor | None = None) -> None:
        self._path = Path(artifact_path)
        self._executor = executor
        self._engine = None
        self._io: EngineIO | None = None
        self._contexts: queue.SimpleQueue = queue.SimpleQueue()
        self._trt = None
        self._runtime = None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def signature(self) -> ModelSignature:
        if self._io is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return signature_of(self._io)

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import torch

        if not torch.cuda.is_available():  # never create a Runtime without a GPU (see module docstring)
            raise ValueError(f"{self._path}: the tensorrt backend needs a CUDA GPU and a CUDA build of torch; "
                             "none found")
        trt = import_tensorrt()
        data = self._path.read_bytes()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ValueError(f"{self._path}: TensorRT cannot deserialize this engine (built by another TensorRT "
                             "version or for another GPU?)")
        self._trt, self._runtime, self._io, self._engine = trt, runtime, read_engine_io(trt, engine), engine

    async def infer(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        if self._engine is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._run_batch, list(batch)))

    def _run_batch(self, batch: list[InferInputs]) -> list[InferResult]:
        import torch

        try:
            slot = self._contexts.get_nowait()
        except queue.Empty:  # one more instance runs at once: give it its own context and stream
            slot = (self._engine.create_execution_context(), torch.cuda.Stream())
        try:
            return run_each(functools.partial(self._run_one, *slot), batch)
        finally:
            self._contexts.put(slot)

    def _run_one(self, context, stream, inputs: InferInputs) -> InferOutputs:
        import torch

        from pyserve import dtypes

        io = self._io
        shapes = {name: tuple(np.shape(inputs[name])) for name, _, _ in io.inputs}
        profile = choose_profile(io, shapes)
        keep = []
        with torch.cuda.stream(stream):
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            for name, datatype, _ in io.inputs:
                host = np.ascontiguousarray(inputs[name])
                dev = torch.from_numpy(host).to("cuda", non_blocking=False)
                keep.append(dev)
                context.set_input_shape(name, tuple(host.shape))
                context.set_tensor_address(name, dev.data_ptr())
            outs = {}
            for name, datatype, _ in io.outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                dev = torch.empty(shape, dtype=dtypes.torch_dtype(datatype), device="cuda")
                outs[name] = dev
                context.set_tensor_address(name, dev.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self._path}: TensorRT execute_async_v3 failed")
            stream.synchronize()
        spec = {s.name: s for s in signature_of(io).outputs}
        return {name: check_output(t.cpu().numpy(), spec[name]) for name, t in outs.items()}

    async def unload(self) -> None:
        self._engine = None
        self._contexts = queue.SimpleQueue()
        self._runtime = None
