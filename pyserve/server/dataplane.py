"""The protocol-neutral data plane: health, metadata and inference on pyserve's own types.

The servicer decodes protobuf with the codec, calls this, and encodes the result; this module never
sees protobuf. It validates every request against the model's signature (input names, datatypes,
shapes, batch size, requested outputs) before a backend runs, raising
:class:`~pyserve.protocol.errors.InvalidArgument` messages that name what was expected and what came.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from pyserve import dtypes
from pyserve._version import __version__
from pyserve.backends import ModelSignature, TensorSpec
from pyserve.protocol.errors import Internal, InvalidArgument, NotFound, Unimplemented
from pyserve.protocol.types import (
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelIndexEntry,
    ModelMetadata,
    ModelStats,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from pyserve.server.repository import Model, ModelRepository

__all__ = ["DataPlane", "SERVER_NAME", "EXTENSIONS"]

log = logging.getLogger("pyserve.server.dataplane")

SERVER_NAME = "pyserve"

#: Protocol extensions pyserve implements, listed in ServerMetadata (Triton's names).
EXTENSIONS = ("model_configuration", "statistics", "model_repository")


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _where(spec: TensorSpec, model: Model) -> str:
    return f"input {spec.name!r} of model {model.name!r}"


def _fmt_spec(spec: TensorSpec) -> str:
    return f"'{spec.name}' ({spec.datatype} {_fmt_shape(spec.shape)})"


class _RequestScope:
    """One inference request's bookkeeping, shared by :meth:`DataPlane.infer_model` and
    :meth:`DataPlane.infer_model_sync`: holds the model version (``acquire``) for the request, and
    on exit records it in the version's statistics (success only when ``response`` was set; ``rows``
    inferences, 1 until validation has counted them; duration from ``arrival_ns``, default the
    scope's start) and lets the version go (``release``), whether the body returned or raised."""

    __slots__ = ("mv", "t0", "rows", "response", "held")

    def __init__(self, mv, arrival_ns: int | None, held: bool = False) -> None:
        self.mv = mv
        self.t0 = time.perf_counter_ns() if arrival_ns is None else arrival_ns
        self.rows = 1
        self.response = None
        self.held = held  # the caller acquired ``mv`` already; the scope releases it

    def __enter__(self) -> "_RequestScope":
        if not self.held:
            self.mv.acquire()  # the request finishes on this version, even across a reload
        return self

    def __exit__(self, *exc) -> None:
        mv = self.mv
        try:
            mv.stats.request_done(self.response is not None, time.perf_counter_ns() - self.t0, self.rows)
        finally:
            mv.release()


class _Validation:
    """A model version's signature prepared once for the per-request input check (built on the
    version's first request, kept on :attr:`ModelVersion.validation`).

    :meth:`inputs` accepts exactly what :meth:`DataPlane._check_inputs` accepts in the usual case
    (every input once, native-order numpy dtype of its datatype, rank and fixed sizes as declared, one
    batch size in 1..``max_batch_size``) and returns None for anything else, so that the full check
    builds the error message. ``outputs``: every output spec, what a request naming none gets.
    """

    __slots__ = ("signature", "max_batch", "outputs", "_specs", "_names", "_single")

    def __init__(self, signature: ModelSignature, max_batch: int) -> None:
        self.signature = signature
        self.max_batch = max_batch
        self.outputs = list(signature.outputs)
        # name -> (datatype, numpy dtype, rank, ((axis, size) fixed), batch axis 0 is -1)
        self._specs = {
            s.name: (s.datatype, dtypes.numpy_dtype(s.datatype), len(s.shape),
                     tuple((i, d) for i, d in enumerate(s.shape) if d != -1), bool(s.shape) and s.shape[0] == -1)
            for s in signature.inputs
        }
        self._names = tuple(s.name for s in signature.inputs)
        self._single = len(self._names) == 1

    def inputs(self, tensors: Sequence[Tensor]):
        """``({name: array} in signature order, rows)`` of valid inputs, or None."""
        if len(tensors) != len(self._names):
            return None
        specs, arrays, batch = self._specs, {}, -1
        for t in tensors:
            spec = specs.get(t.name)
            if spec is None:
                return None
            datatype, dtype, rank, fixed, batched = spec
            data = t.data
            shape = data.shape
            if t.datatype != datatype or data.dtype != dtype or len(shape) != rank:
                return None
            for axis, size in fixed:
                if shape[axis] != size:
                    return None
            if batched:
                if batch == -1:
                    batch = shape[0]
                elif shape[0] != batch:
                    return None
            arrays[t.name] = data
        if len(arrays) != len(self._names):  # a name twice
            return None
        if self.max_batch and (batch > self.max_batch or batch == 0):
            return None
        if not self._single:
            arrays = {name: arrays[name] for name in self._names}
        rows = 1
        if self.max_batch > 0 and arrays:
            rows = int(next(iter(arrays.values())).shape[0])
        return arrays, rows


class DataPlane:
    def __init__(self, repository: ModelRepository, *, extensions: Sequence[str] = EXTENSIONS) -> None:
        self.repository = repository
        self.extensions = tuple(extensions)
        self.stopping = False
        #: the traffic router (pyserve.server.traffic.TrafficRouter); requests on its routes go there
        self.router = None

    # --- health ---------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """True once the repository has loaded (refused models do not make the server unready)."""
        return self.repository.loaded and not self.stopping

    def _model_name(self, name: str, version: str) -> str:
        """A route name stands for the model of its first variant in metadata RPCs. A route with a
        version is refused (InvalidArgument), as an inference on it is: a route picks the version."""
        if self.router is not None and self.router.has_route(name):
            if version:
                target = self.router.resolve_model(name)
                raise InvalidArgument(
                    f"{name!r} is a traffic route: it picks the model version itself; send no model version "
                    f"(got {version!r}), or name a model with a version, e.g. model {target!r} version {version}"
                )
            return self.router.resolve_model(name)
        return name

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            name = self._model_name(name, version)
            return self.repository.get(name, version).is_ready(version)
        except (NotFound, InvalidArgument):
            return False

    # --- metadata -------------------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=self.extensions)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        model = self.repository.get_ready(self._model_name(name, version), version)
        mv = model.pick(version)
        sig = mv.backend.signature

        def meta(specs) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(s.name, s.datatype, tuple(s.shape)) for s in specs)

        return ModelMetadata(
            name=model.name,
            versions=tuple(model.served_versions),
            platform=mv.backend.platform,
            inputs=meta(sig.inputs),
            outputs=meta(sig.outputs),
        )

    # --- inference ------------------------------------------------------------------------------

    def model_config(self, name: str, version: str = "") -> ModelConfigInfo:
        """The ModelConfig extension: config.yaml plus the backend's signature (full shapes)."""
        model = self.repository.get_ready(self._model_name(name, version), version)
        mv = model.pick(version)
        sig, cfg = mv.backend.signature, mv.config

        def meta(specs) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(s.name, s.datatype, tuple(s.shape)) for s in specs)

        db = cfg.dynamic_batching
        return ModelConfigInfo(
            name=model.name,
            platform=mv.backend.platform,
            backend=cfg.backend,
            max_batch_size=cfg.max_batch_size,
            inputs=meta(sig.inputs),
            outputs=meta(sig.outputs),
            max_queue_delay_us=db.max_queue_delay_microseconds if db is not None else None,
            preferred_batch_sizes=db.preferred_batch_size if db is not None else (),
            instance_count=cfg.instance_count,
            instance_kind=cfg.instance_kind,
            default_model_filename=mv.path.name,
            version_policy=cfg.version_policy.as_info(),
        )

    # --- extensions: statistics and repository ----------------------------------------------------

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        return self.repository.statistics(name, version)

    def repository_index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        return self.repository.index(ready_only)

    async def load_model(self, name: str, parameters: dict | None = None) -> None:
        if parameters:
            raise InvalidArgument(
                f"load of model {name!r}: parameters {sorted(parameters)} are not supported "
                "(pyserve loads the model's files from the repository as they are)"
            )
        await self.repository.load(name)

    async def unload_model(self, name: str, parameters: dict | None = None) -> None:
        unknown = sorted(set(parameters or {}) - {"unload_dependents"})
        if unknown:
            raise InvalidArgument(f"unload of model {name!r}: parameters {unknown} are not supported")
        await self.repository.unload(name)

    # --- inference ------------------------------------------------------------------------------

    def is_route(self, name: str) -> bool:
        """Whether requests for ``name`` go through the traffic router."""
        return self.router is not None and self.router.has_route(name)

    async def infer(self, request: InferRequest, routing_key: str | None = None,
                    arrival_ns: int | None = None) -> InferResponse:
        """Serve one request: through the traffic router when ``model_name`` is a route (``routing_key``:
        the gRPC metadata ``x-routing-key``, if any), else on the model itself (:meth:`infer_model`).
        ``arrival_ns``: ``time.perf_counter_ns()`` when the request arrived (before decoding), the
        start of its duration in the statistics; default now."""
        if self.router is not None and self.router.has_route(request.model_name):
            return await self.router.infer(request, routing_key)
        return await self.infer_model(request, arrival_ns)

    async def infer_model(self, request: InferRequest, arrival_ns: int | None = None) -> InferResponse:
        model, mv = self._serving(request)
        with _RequestScope(mv, arrival_ns) as scope:
            inputs, wanted, scope.rows = self._prepare(model, mv, request)
            result = await mv.scheduler.submit(inputs, scope.rows)
            scope.response = self._response(model, mv, request, wanted, result)
        return scope.response

    def infer_model_sync(self, request: InferRequest, arrival_ns: int | None = None,
                         is_active=None) -> InferResponse | None:
        """:meth:`infer_model` on the calling thread, for the synchronous gRPC engine's handler
        threads: the model version's scheduler runs the execution here
        (:meth:`~pyserve.server.scheduler.Scheduler.submit_sync`). Returns ``NotImplemented`` when
        the version's scheduler cannot (a dynamic batcher, a backend without ``infer_sync``): the
        caller then runs :meth:`infer_model` on the event loop. None when ``is_active()`` turned false
        (client cancel, deadline) before the execution started; the request counts as failed.
        Raises the ServingErrors of :meth:`infer_model`."""
        model, mv = self._serving(request)
        # On the event loop the pick and the acquire happen with nothing in between; here the loop
        # may retire the picked version meanwhile (a reload: _retire finds it drained, closes its
        # scheduler, unloads its backend) and the request would fail on a version nobody serves.
        # Hold it first, then check it is still served: a retire after that check waits for it.
        mv.acquire()
        while model.versions.get(mv.version) is not mv:
            mv.release()
            model, mv = self._serving(request)
            mv.acquire()
        if not mv.scheduler.runs_sync:
            mv.release()
            return NotImplemented
        with _RequestScope(mv, arrival_ns, held=True) as scope:
            inputs, wanted, scope.rows = self._prepare(model, mv, request)
            result = mv.scheduler.submit_sync(inputs, scope.rows, is_active)
            if result is not None:
                scope.response = self._response(model, mv, request, wanted, result)
        return scope.response

    def _serving(self, request: InferRequest):
        """(model, served version) a request runs on; NotFound/Unavailable as :meth:`ModelRepository.get_ready`."""
        model = self.repository.get_ready(request.model_name, request.model_version)
        return model, model.pick(request.model_version)

    def _prepare(self, model: Model, mv, request: InferRequest):
        """(inputs by name in signature order, wanted output specs, rows) of a valid request;
        InvalidArgument/Unimplemented naming what was expected and what came."""
        plan = mv.validation
        if plan is None:
            plan = mv.validation = _Validation(mv.backend.signature, mv.config.max_batch_size)
        checked = plan.inputs(request.inputs)
        if checked is None:  # something is off: the full check names it (or, if not, accepts it)
            sig = plan.signature
            inputs = self._check_inputs(model, sig, request.inputs, plan.max_batch)
            rows = 1
            if plan.max_batch > 0:
                rows = int(next(iter(inputs.values())).shape[0]) if inputs else 1
        else:
            inputs, rows = checked
        wanted = plan.outputs if not request.outputs else self._check_outputs(model, plan.signature, request)
        return inputs, wanted, rows

    @staticmethod
    def _response(model: Model, mv, request: InferRequest, wanted, result) -> InferResponse:
        outputs = []
        for spec in wanted:
            data = result.get(spec.name)
            if data is None:
                raise Internal(f"model {model.name!r}: the backend returned no output {spec.name!r}")
            outputs.append(Tensor(spec.name, spec.datatype, np.asarray(data)))
        return InferResponse(
            model_name=mv.name,
            model_version=mv.version,
            id=request.id,
            outputs=tuple(outputs),
        )

    def _check_inputs(self, model: Model, sig: ModelSignature, tensors: Sequence[Tensor],
                      max_batch: int = 0) -> dict[str, np.ndarray]:
        """Inputs in signature order; InvalidArgument naming expected vs actual."""
        # the per-request path builds no message text: strings are formatted only on an error
        given = {t.name: t for t in tensors}
        if len(given) != len(tensors) or len(tensors) != len(sig.inputs):
            self._check_names(model, sig, tensors, given)
        batch_sizes = set()
        for spec in sig.inputs:
            t = given.get(spec.name)
            if t is None:
                self._check_names(model, sig, tensors, given)
            if t.datatype != spec.datatype:
                raise InvalidArgument(f"{_where(spec, model)}: expected datatype {spec.datatype}, got {t.datatype}")
            shape = t.shape
            if len(shape) != len(spec.shape) or any(e != -1 and e != a for e, a in zip(spec.shape, shape, strict=True)):
                raise InvalidArgument(
                    f"{_where(spec, model)}: expected shape {_fmt_shape(spec.shape)} (-1 = any), got {_fmt_shape(shape)}"
                )
            if spec.shape and spec.shape[0] == -1:
                batch_sizes.add(shape[0])
                if max_batch and shape[0] == 0:
                    raise InvalidArgument(
                        f"{_where(spec, model)}: empty batch: shape {_fmt_shape(shape)} has 0 rows; expected "
                        f"1..{max_batch} (the model's max_batch_size)"
                    )
                if max_batch and shape[0] > max_batch:
                    raise InvalidArgument(
                        f"{_where(spec, model)}: batch size {shape[0]} exceeds the model's max_batch_size {max_batch}"
                    )
            # the codec already guarantees dtype == numpy_dtype(datatype); keep the invariant explicit
            if spec.datatype != "BYTES" and t.data.dtype.newbyteorder("=") != dtypes.numpy_dtype(spec.datatype):
                raise InvalidArgument(f"{_where(spec, model)}: data is numpy {t.data.dtype}, datatype {spec.datatype}")
        if len(batch_sizes) > 1:
            raise InvalidArgument(
                f"model {model.name!r}: inputs disagree on the batch dimension: {sorted(batch_sizes)}"
            )
        return {spec.name: given[spec.name].data for spec in sig.inputs}

    @staticmethod
    def _check_names(model: Model, sig: ModelSignature, tensors: Sequence[Tensor], given: dict) -> None:
        """InvalidArgument for an input the model lacks or one the request lacks (the codec refuses
        duplicate names)."""
        specs = {s.name: s for s in sig.inputs}
        for t in tensors:
            if t.name not in specs:
                expected = ", ".join(_fmt_spec(s) for s in sig.inputs)
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
        names = [t.name for t in tensors]
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"model {model.name!r}: input(s) {dup} appear more than once")

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
