"""The ``pyserve`` backend: hosts one ``.pyserve`` artifact (see :mod:`pyserve.artifact`).

Loading reads, verifies (checksums) and decodes the artifact in a thread executor, then puts each
Linear layer on the fastest of the native kernels its stored form allows — torch's dense fp32,
``int8_linear`` (int8 weights), ``csr_linear`` (pruned weights), ``codebook_linear`` (pruned and
weight-shared) — measured at load (:func:`pyserve.artifact.kernels.native_module`); the choice per
layer is in :attr:`PyserveBackend.kernel_choices`. ``kernels`` (or the ``PYSERVE_KERNELS``
environment variable) forces ``dense`` or one kernel instead of ``auto``. Inference runs the module
under ``torch.inference_mode()`` in the same executor, never on the event loop. torch and the
artifact reader are imported on :meth:`PyserveBackend.load`, not at import.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Sequence

from pyserve.backends._common import run_torch_batch, skip_export_input_checks
from pyserve.backends.base import InferInputs, InferResult, ModelSignature, TensorSpec

__all__ = ["PyserveBackend"]


class PyserveBackend:
    """Backend for ``DIR/<model>/<version>/model.pyserve``."""

    platform = "pyserve"

    def __init__(self, artifact_path: Path, *, executor: Executor | None = None, kernels: str | None = None) -> None:
        self._path = Path(artifact_path)
        self._executor = executor
        self._kernels = kernels or os.environ.get("PYSERVE_KERNELS", "auto")
        self._module = None
        self._signature: ModelSignature | None = None
        #: weight tensor name -> kernel ("dense", "int8", "csr", "codebook"), set by load()
        self.kernel_choices: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self._module is not None

    @property
    def signature(self) -> ModelSignature:
        if self._signature is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return self._signature

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        module, signature, choices = await loop.run_in_executor(
            self._executor, functools.partial(_load, self._path, self._kernels))
        self._module, self._signature, self.kernel_choices = module, signature, choices

    async def infer(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.infer_sync, list(batch))

    def infer_sync(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        """:meth:`infer` on the calling thread (the server runs measured-tiny executions inline)."""
        module, signature = self._module, self._signature
        if module is None or signature is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return run_torch_batch(module, signature, batch)

    async def unload(self) -> None:
        self._module = None


#: torch.export's deserializer keeps process-global state (``_CURRENT_DESERIALIZER``), so two
#: artifacts rebuilt at once in the thread pool fail with "AssertionError: _CURRENT_DESERIALIZER is
#: already set"; loads are serialized (inference is not).
_LOAD_LOCK = threading.Lock()


def _load(path: Path, kernels: str = "auto"):
    from pyserve.artifact import load_artifact
    from pyserve.artifact.kernels import native_module

    with _LOAD_LOCK:
        art = load_artifact(path)
    module, choices = native_module(art, kernels=kernels)
    skip_export_input_checks(module)  # the data plane checked names, datatypes and shapes already
    m = art.manifest

    def specs(items) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.name, s.datatype, tuple(int(d) for d in s.shape)) for s in items)

    return module, ModelSignature(inputs=specs(m.inputs), outputs=specs(m.outputs)), choices
