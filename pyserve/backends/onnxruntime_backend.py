"""The ``onnxruntime`` backend: an ONNX model (``model.onnx``) run by an onnxruntime InferenceSession.

Execution providers, in this order when the installed onnxruntime has them: TensorRT, CUDA, CPU
(``PYSERVE_ORT_PROVIDERS=CPUExecutionProvider,...`` overrides). onnxruntime's CPU wheel *lists*
TensorrtExecutionProvider in ``get_all_providers()`` but falls back to the CPU with only a warning,
so the providers in use are read back from ``session.get_providers()`` and logged; only
``get_available_providers()`` is asked for.

The signature is the one ``pyserve export`` embeds (``metadata_props`` key
``pyserve_signature.json``); without it, the session's inputs and outputs (symbolic or missing
dimensions become -1). ``session.run`` is thread-safe, so instances share one session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Sequence

import numpy as np

from pyserve.backends._common import SIGNATURE_KEY, check_output, run_each, signature_from_json
from pyserve.backends.base import InferInputs, InferOutputs, InferResult, ModelSignature, TensorSpec

__all__ = ["OnnxRuntimeBackend", "ONNX_TYPES", "choose_providers", "load_session"]

log = logging.getLogger("pyserve.backends.onnxruntime")

#: onnxruntime's type strings -> protocol datatypes.
ONNX_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: Preferred providers, fastest first.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: Sequence[str], override: str | None = None) -> list[str]:
    """The providers to ask for: ``override`` (comma-separated) or the preferred ones available.

    Raises ValueError when the override names a provider that is not available.
    """
    if override:
        wanted = [p.strip() for p in override.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"PYSERVE_ORT_PROVIDERS names {missing}, not available in this onnxruntime "
                             f"(available: {list(available)})")
        return wanted
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Backend for ``DIR/<model>/<version>/model.onnx``."""

    platform = "onnxruntime_onnx"

    def __init__(self, artifact_path: Path, *, executor: Executor | None = None) -> None:
        self._path = Path(artifact_path)
        self._executor = executor
        self._session = None
        self._signature: ModelSignature | None = None
        #: providers the session really uses (``session.get_providers()``), once loaded
        self.providers: list[str] = []

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def signature(self) -> ModelSignature:
        if self._signature is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return self._signature

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        session, sig = await loop.run_in_executor(self._executor, functools.partial(load_session, self._path))
        self.providers = list(session.get_providers())
        log.info("%s: onnxruntime providers in use: %s", self._path, ", ".join(self.providers))
        self._session, self._signature = session, sig

    async def infer(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.infer_sync, list(batch))

    def infer_sync(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        """:meth:`infer` on the calling thread (the server runs measured-tiny executions inline)."""
        session, sig = self._session, self._signature
        if session is None or sig is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return _run_batch(session, sig, list(batch))

    async def unload(self) -> None:
        self._session = None


def load_session(path: str | Path, providers: Sequence[str] | None = None):
    """Create an InferenceSession for ``path``; returns ``(session, ModelSignature)``.

    Raises ValueError for a file onnxruntime cannot load (its message's first line kept).
    """
    import onnxruntime as ort

    path = Path(path)
    if providers is None:
        providers = choose_providers(ort.get_available_providers(), os.environ.get("PYSERVE_ORT_PROVIDERS"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the fallback warnings are reported by get_providers()
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        text = str(exc).strip()
        raise ValueError(f"{path}: onnxruntime cannot load this model: {type(exc).__name__}: "
                         f"{text.splitlines()[0][:300] if text else ''}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if SIGNATURE_KEY in meta:
        sig = signature_from_json(meta[SIGNATURE_KEY], str(path))
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if [s.name for s in sig.inputs] != names_in or not {s.name for s in sig.outputs} <= set(names_out):
            raise ValueError(f"{path}: embedded {SIGNATURE_KEY} names inputs {[s.name for s in sig.inputs]} and "
                             f"outputs {[s.name for s in sig.outputs]}; the graph has {names_in} and {names_out}")
        return session, sig
    return session, signature_from_session(session, str(path))


def signature_from_session(session, what: str) -> ModelSignature:
    """The session's inputs and outputs as a signature; symbolic/unknown dimensions become -1."""

    def specs(args) -> tuple[TensorSpec, ...]:
        out = []
        for a in args:
            if a.type not in ONNX_TYPES:
                raise ValueError(f"{what}: tensor {a.name!r} has type {a.type}, which the protocol cannot carry")
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (a.shape or ()))
            out.append(TensorSpec(a.name, ONNX_TYPES[a.type], shape))
        return tuple(out)

    return ModelSignature(inputs=specs(session.get_inputs()), outputs=specs(session.get_outputs()))


def _run_batch(session, sig: ModelSignature, batch: list[InferInputs]) -> list[InferResult]:
    names = [s.name for s in sig.outputs]

    def one(inputs: InferInputs) -> InferOutputs:
        feed = {s.name: np.ascontiguousarray(inputs[s.name]) for s in sig.inputs}
        outs = session.run(names, feed)
        return {spec.name: check_output(np.asarray(o), spec) for spec, o in zip(sig.outputs, outs, strict=True)}

    return run_each(one, batch)
