"""TensorRT engines from an exported ONNX graph: ``model.plan`` for the ``tensorrt`` backend.

The build (:func:`build_engine`) parses the ONNX graph into a **strongly typed** network
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precision comes from the graph itself — fp16
weights and Casts of an fp16 export, the explicit QuantizeLinear/DequantizeLinear nodes of an int8
export — not from builder flags (TensorRT 11 removed ``BuilderFlag.FP16``/``INT8`` and the int8
calibrators; TensorRT 10 has the same flag). One optimization profile covers batch sizes
``min..max`` tuned at ``opt``; the builder's workspace pool is capped; a timing cache file is read
when present and written back after the build, so rebuilding on the same GPU is fast.

Everything that needs no TensorRT — profile shapes (:func:`profile_shapes`), argument checks
(:class:`TensorRTOptions`), the config — is plain code tested without the library. The builder API
names used are listed in :data:`BUILDER_API` (the tests check them against NVIDIA's documented
API; the lean runtime the tests can install has no builder). **The build itself is not exercised in
CI**: TensorRT cannot be installed on the CI machines (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pyserve.backends.base import ModelSignature
from pyserve.backends.tensorrt_backend import ProfileRange

__all__ = ["BUILDER_API", "TensorRTOptions", "profile_shapes", "build_engine"]

#: Every TensorRT builder-side name :func:`build_engine` uses (TensorRT 10/11 Python API).
BUILDER_API = (
    "Logger", "Logger.WARNING", "Builder", "Builder.create_network", "Builder.create_builder_config",
    "Builder.create_optimization_profile", "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "OnnxParser", "OnnxParser.parse_from_file",
    "OnnxParser.num_errors", "OnnxParser.get_error", "IBuilderConfig.set_memory_pool_limit",
    "MemoryPoolType.WORKSPACE", "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache", "ITimingCache.serialize",
    "IOptimizationProfile.set_shape", "INetworkDefinition.num_inputs", "INetworkDefinition.get_input",
    "ITensor.name", "ITensor.shape",
)


@dataclass(frozen=True)
class TensorRTOptions:
    """Engine build settings; checked on construction (ValueError naming the argument).

    min_batch, opt_batch, max_batch : batch sizes of the optimization profile, 1 <= min <= opt <= max.
    workspace_bytes : cap of the builder's scratch memory pool (``MemoryPoolType.WORKSPACE``), > 0.
    timing_cache : file read before and written after the build (None: no cache).
    """

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_bytes: int = 1 << 30
    timing_cache: Path | None = None

    def __post_init__(self):
        for name in ("min_batch", "opt_batch", "max_batch", "workspace_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch sizes must satisfy min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")


def profile_shapes(sig: ModelSignature, opts: TensorRTOptions, *, dynamic_batch: bool = True
                   ) -> dict[str, ProfileRange]:
    """min/opt/max shapes of every input for one optimization profile.

    Dimension 0 of an input with -1 there is the batch: ``opts.min_batch/opt_batch/max_batch``.
    Every other dimension must be fixed (a TensorRT profile needs concrete bounds, and pyserve's
    exports fix every dimension but the batch).

    Raises ValueError naming the input for another dynamic dimension, a batch dimension without
    ``dynamic_batch``, or a 0-d input.
    """
    out = {}
    for s in sig.inputs:
        shape = list(s.shape)
        if not shape:
            raise ValueError(f"input {s.name!r} is a scalar; TensorRT profiles need a batch dimension")
        if any(d == -1 for d in shape[1:]):
            raise ValueError(f"input {s.name!r} has shape {shape}: only dimension 0 (the batch) may be dynamic "
                             f"for a TensorRT profile")
        if shape[0] == -1:
            if not dynamic_batch:
                raise ValueError(f"input {s.name!r} has a dynamic batch dimension; export with --dynamic-batch")
            rest = tuple(shape[1:])
            out[s.name] = ProfileRange((opts.min_batch, *rest), (opts.opt_batch, *rest), (opts.max_batch, *rest))
        else:
            fixed = tuple(shape)
            out[s.name] = ProfileRange(fixed, fixed, fixed)
    return out


def _import_builder():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError("building a TensorRT engine needs the full TensorRT library (`import tensorrt` with a "
                          "Builder), which is not installed here; export --to onnx and build the engine on a "
                          "machine with TensorRT (docs/export.md)") from None
    if not hasattr(trt, "Builder"):
        raise ImportError("this `tensorrt` module has no Builder (the lean runtime?); building needs the full "
                          "TensorRT library")
    return trt


def build_engine(onnx_path: Path, plan_path: Path, profiles: dict[str, ProfileRange], opts: TensorRTOptions) -> int:
    """Build a serialized engine from ``onnx_path`` into ``plan_path``; returns its size in bytes.

    Needs the full TensorRT library and a GPU. Raises ImportError without TensorRT, ValueError when
    the parser rejects the graph (its errors listed) or the network's inputs differ from
    ``profiles``, RuntimeError when the build fails.
    """
    trt = _import_builder()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profiles):
        raise ValueError(f"the network's inputs {names} differ from the profile's {sorted(profiles)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, rng in profiles.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)
    cache_bytes = opts.timing_cache.read_bytes() if opts.timing_cache and opts.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT's builder failed (see its log above)")
    data = bytes(plan)
    Path(plan_path).write_bytes(data)
    if opts.timing_cache:
        Path(opts.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return len(data)


def check_profile_names(sig: ModelSignature, names: Sequence[str]) -> None:
    """ValueError unless ``names`` are exactly the signature's inputs."""
    if sorted(names) != sorted(s.name for s in sig.inputs):
        raise ValueError(f"profile inputs {sorted(names)} differ from the model's {sorted(s.name for s in sig.inputs)}")
