"""Writing an export into a model repository: ``DIR/<model>/<version>/model.*`` plus a Triton-style
``DIR/<model>/config.pbtxt`` that :class:`pyserve.server.repository.ModelConfig` loads.

Files are written to a temporary name in the destination directory and renamed into place, so an
interrupted export never leaves a partial model file or config.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pyserve import dtypes
from pyserve._fileio import atomic_output
from pyserve.backends.base import ModelSignature

__all__ = ["FORMAT_FILES", "PLATFORMS", "model_config_text", "atomic_output", "check_writable_dir"]

#: export format -> file name in a version directory (the registry's artifact_filename)
FORMAT_FILES = {"onnx": "model.onnx", "torch": "model.pt2", "torchscript": "model.pt", "tensorrt": "model.plan"}
#: export format -> (config key, value): Triton's platform names where Triton has one
PLATFORMS = {"onnx": ("platform", "onnxruntime_onnx"), "torch": ("backend", "torch"),
             "torchscript": ("platform", "pytorch_libtorch"), "tensorrt": ("platform", "tensorrt_plan")}


def model_config_text(name: str, fmt: str, sig: ModelSignature, *, max_batch_size: int = 0,
                      instance_count: int = 1) -> str:
    """A ``config.pbtxt`` for ``fmt`` (a key of :data:`PLATFORMS`).

    With ``max_batch_size`` > 0 every input and output must have -1 as its first dimension, and the
    dims are written without it (Triton's convention).

    Raises ValueError naming the tensor when a batched config meets a tensor without a batch dim.
    """
    if fmt not in PLATFORMS:
        raise ValueError(f"fmt must be one of {', '.join(PLATFORMS)}, got {fmt!r}")
    if max_batch_size < 0 or instance_count < 1:
        raise ValueError(f"max_batch_size must be >= 0 and instance_count >= 1, got {max_batch_size}, {instance_count}")
    key, value = PLATFORMS[fmt]
    lines = [f'name: "{name}"', f'{key}: "{value}"', f"max_batch_size: {max_batch_size}"]
    for kind, specs in (("input", sig.inputs), ("output", sig.outputs)):
        entries = []
        for s in specs:
            dims = list(s.shape)
            if max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise ValueError(f"{kind} {s.name!r} has shape {dims}: max_batch_size > 0 needs a variable "
                                     f"first dimension (export with --dynamic-batch)")
                dims = dims[1:]
            entries.append(f'  {{ name: "{s.name}" data_type: {dtypes.from_name(s.datatype).triton_config} '
                           f'dims: [ {", ".join(str(d) for d in dims)} ] }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    lines.append(f"instance_group [ {{ count: {instance_count} kind: KIND_CPU }} ]")
    return "\n".join(lines) + "\n"


def check_writable_dir(path: Path, what: str) -> None:
    """ValueError unless ``path`` (or its nearest existing ancestor, where it will be created) is a
    writable directory."""
    p = Path(path).absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(p)!r} is not a directory")
    # a real probe: os.access says yes to root and knows nothing of read-only file systems
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r}: directory {str(p)!r} is not writable ({exc.strerror})") from None

