"""The ``torch`` backend: a torch.export program (``model.pt2``) or a TorchScript module (``model.pt``).

- ``.pt2`` (backend ``torch``): ``torch.export.load`` then ``ExportedProgram.module()``. The
  signature is the one ``pyserve export`` embeds (extra file ``pyserve_signature.json``); a ``.pt2``
  without it gets ``input__0..``/``output__0..`` with dtypes and shapes from the graph (symbolic
  dimensions become -1).
- ``.pt`` (backends ``pytorch_libtorch``/``pytorch``, Triton's names): ``torch.jit.load``; TorchScript
  records no shapes, so the embedded signature is required.

Loading and inference run in the thread executor, never on the event loop; torch is imported on
:meth:`TorchBackend.load`. Inference runs on the CPU under ``torch.inference_mode()``, one forward
pass per request.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Sequence


from pyserve import dtypes
from pyserve.backends._common import SIGNATURE_KEY, run_torch_batch, signature_from_json, skip_export_input_checks
from pyserve.backends.base import InferInputs, InferResult, ModelSignature, TensorSpec

__all__ = ["TorchBackend", "load_torch_model"]


def _load_lock() -> threading.Lock:
    # torch.export's deserializer keeps process-global state; the pyserve backend serializes its
    # loads with a lock for that reason, and both backends must take the same one.
    from pyserve.backends import pyserve_backend

    return getattr(pyserve_backend, "_LOAD_LOCK", _FALLBACK_LOCK)


_FALLBACK_LOCK = threading.Lock()


class TorchBackend:
    """Backend for ``DIR/<model>/<version>/model.pt2`` (torch.export) or ``model.pt`` (TorchScript)."""

    platform = "pytorch_libtorch"

    def __init__(self, artifact_path: Path, *, executor: Executor | None = None) -> None:
        self._path = Path(artifact_path)
        self._executor = executor
        self._module = None
        self._signature: ModelSignature | None = None

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
        self._module, self._signature = await loop.run_in_executor(
            self._executor, functools.partial(load_torch_model, self._path))

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


def load_torch_model(path: str | Path):
    """Load ``path`` (``.pt2`` or ``.pt``); returns ``(callable module, ModelSignature)``.

    Raises ValueError for an unknown suffix, a file torch cannot read, or a TorchScript file
    without an embedded signature.
    """
    import torch

    path = Path(path)
    extra = {SIGNATURE_KEY: ""}
    if path.suffix == ".pt2":
        try:
            with _load_lock():
                ep = torch.export.load(str(path), extra_files=extra)
                module = skip_export_input_checks(ep.module())
        except Exception as exc:  # torch raises many types for a bad file
            raise ValueError(f"{path}: not a torch.export program torch can load: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
        sig = (signature_from_json(extra[SIGNATURE_KEY], str(path)) if extra[SIGNATURE_KEY]
               else _signature_from_program(ep))
        return module, sig
    if path.suffix == ".pt":
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise ValueError(f"{path}: not a TorchScript module torch can load: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
        if not extra[SIGNATURE_KEY]:
            raise ValueError(f"{path}: TorchScript records no input/output shapes and this file has no "
                             f"embedded {SIGNATURE_KEY}; write it with `pyserve export --to torch`")
        return module.eval(), signature_from_json(extra[SIGNATURE_KEY], str(path))
    raise ValueError(f"{path}: the torch backend loads .pt2 (torch.export) or .pt (TorchScript) files")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _signature_from_program(ep) -> ModelSignature:
    """Signature of an ExportedProgram from its fake-tensor metadata (symbolic dims -> -1)."""
    import torch
    from torch.export.graph_signature import InputKind

    nodes = {n.name: n for n in ep.graph.nodes}

    def spec(name: str, val) -> TensorSpec:
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"{name}: not a tensor ({type(val).__name__}); the torch backend serves tensors only")
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
        return TensorSpec(name, dtypes.from_torch(val.dtype).name, shape)

    inputs = [nodes[s.arg.name].meta.get("val") for s in ep.graph_signature.input_specs
              if s.kind == InputKind.USER_INPUT]
    output_node = [n for n in ep.graph.nodes if n.op == "output"][0]
    outs = output_node.args[0]
    user_outputs = {s.arg.name for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"}
    outputs = [o.meta.get("val") for o in outs if getattr(o, "name", None) in user_outputs]
    return ModelSignature(inputs=tuple(spec(f"input__{i}", v) for i, v in enumerate(inputs)),
                          outputs=tuple(spec(f"output__{i}", v) for i, v in enumerate(outputs)))
