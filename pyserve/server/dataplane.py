"""The protocol-neutral data plane: health, metadata and inference on pyserve's own types.

The servicer decodes protobuf with the codec, calls this, and encodes the result; this module never
sees protobuf. It validates every request against the model's signature (input names, datatypes,
shapes, batch size, requested outputs) before a backend runs, raising
:class:`~pyserve.protocol.errors.InvalidArgument` messages that name what was expected and what came.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pyserve import dtypes
from pyserve._version import __version__
from pyserve.backends import ModelSignature, TensorSpec
from pyserve.protocol.errors import Internal, InvalidArgument, NotFound, ServingError, Unimplemented
from pyserve.protocol.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from pyserve.server.repository import Model, ModelRepository

__all__ = ["DataPlane", "SERVER_NAME"]

log = logging.getLogger("pyserve.server.dataplane")

SERVER_NAME = "pyserve"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fmt_spec(spec: TensorSpec) -> str:
    return f"'{spec.name}' ({spec.datatype} {_fmt_shape(spec.shape)})"


class DataPlane:
    def __init__(self, repository: ModelRepository, *, extensions: Sequence[str] = ()) -> None:
        self.repository = repository
        self.extensions = tuple(extensions)
        self.stopping = False

    # --- health ---------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """True once the repository has loaded (refused models do not make the server unready)."""
        return self.repository.loaded and not self.stopping

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.repository.get(name, version).ready
        except NotFound:
            return False

    # --- metadata -------------------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=self.extensions)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        model = self.repository.get_ready(name, version)
        sig = model.backend.signature

        def meta(specs) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(s.name, s.datatype, tuple(s.shape)) for s in specs)

        return ModelMetadata(
            name=model.name,
            versions=(model.version,),
            platform=model.backend.platform,
            inputs=meta(sig.inputs),
            outputs=meta(sig.outputs),
        )

    # --- inference ------------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        model = self.repository.get_ready(request.model_name, request.model_version)
        sig = model.backend.signature
        inputs = self._check_inputs(model, sig, request.inputs)
        wanted = self._check_outputs(model, sig, request)
        (result,) = await model.backend.infer([inputs])
        if isinstance(result, ServingError):
            raise result
        if isinstance(result, BaseException):
            raise result  # the interceptor logs it and answers INTERNAL
        outputs = []
        for spec in wanted:
            data = result.get(spec.name)
            if data is None:
                raise Internal(f"model {model.name!r}: the backend returned no output {spec.name!r}")
            outputs.append(Tensor(spec.name, spec.datatype, np.asarray(data)))
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=tuple(outputs),
        )

    def _check_inputs(self, model: Model, sig: ModelSignature, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in sig.inputs}
        expected = ", ".join(_fmt_spec(s) for s in sig.inputs)
        given = {t.name: t for t in tensors}
        for t in tensors:
            if t.name not in specs:
                raise InvalidArgument(
                    f"model {model.name!r} has no input {t.name!r}; expected inputs: {expected}"
                )
        for spec in sig.inputs:
            if spec.name not in given:
                got = ", ".join(repr(n) for n in given) or "none"
                raise InvalidArgument(
                    f"model {model.name!r} expects input {_fmt_spec(spec)}, which the request lacks "
                    f"(request inputs: {got})"
                )
        max_batch = model.config.max_batch_size if model.config else 0
        batch_sizes = set()
        for spec in sig.inputs:
            t = given[spec.name]
            where = f"input {spec.name!r} of model {model.name!r}"
            if t.datatype != spec.datatype:
                raise InvalidArgument(f"{where}: expected datatype {spec.datatype}, got {t.datatype}")
            shape = t.shape
            if len(shape) != len(spec.shape) or any(e != -1 and e != a for e, a in zip(spec.shape, shape, strict=True)):
                raise InvalidArgument(
                    f"{where}: expected shape {_fmt_shape(spec.shape)} (-1 = any), got {_fmt_shape(shape)}"
                )
            if spec.shape and spec.shape[0] == -1:
                batch_sizes.add(shape[0])
                if max_batch and shape[0] > max_batch:
                    raise InvalidArgument(
                        f"{where}: batch size {shape[0]} exceeds the model's max_batch_size {max_batch}"
                    )
            # the codec already guarantees dtype == numpy_dtype(datatype); keep the invariant explicit
            if t.data.dtype.newbyteorder("=") != dtypes.numpy_dtype(spec.datatype) and spec.datatype != "BYTES":
                raise InvalidArgument(f"{where}: data is numpy {t.data.dtype}, datatype {spec.datatype}")
        if len(batch_sizes) > 1:
            raise InvalidArgument(
                f"model {model.name!r}: inputs disagree on the batch dimension: {sorted(batch_sizes)}"
            )
        return {spec.name: given[spec.name].data for spec in sig.inputs}

    def _check_outputs(self, model: Model, sig: ModelSignature, request: InferRequest) -> list[TensorSpec]:
        if not request.outputs:
            return list(sig.outputs)
        specs = {s.name: s for s in sig.outputs}
        wanted = []
        for out in request.outputs:
            if out.name not in specs:
                names = ", ".join(repr(s.name) for s in sig.outputs)
                raise InvalidArgument(
                    f"model {model.name!r} has no output {out.name!r}; expected one of: {names}"
                )
            if "classification" in out.parameters:
                raise Unimplemented(f"output {out.name!r}: the classification extension is not supported")
            wanted.append(specs[out.name])
        return wanted
