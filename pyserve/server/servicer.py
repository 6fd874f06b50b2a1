"""``inference.GRPCInferenceService``: decode with the codec, call the data plane, encode.

No validation or model logic lives here; errors propagate as :class:`ServingError` to the
interceptor. ModelStreamInfer answers every request in order; a failed request gets a response
with ``error_message`` set and the stream carries on (as Triton does).
"""

from __future__ import annotations

import logging
import time
import uuid

from pyserve.protocol import codec
from pyserve.protocol.errors import ServingError
from pyserve.server.dataplane import DataPlane

__all__ = ["InferenceServicer"]

log = logging.getLogger("pyserve.server")


class InferenceServicer:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    def add_to_server(self, server) -> None:
        codec.add_inference_servicer(self, server)

    async def ServerLive(self, request, context):
        return codec.encode_server_live(self._dp.live())

    async def ServerReady(self, request, context):
        return codec.encode_server_ready(self._dp.ready())

    async def ModelReady(self, request, context):
        return codec.encode_model_ready(self._dp.model_ready(*codec.decode_model_ref(request)))

    async def ServerMetadata(self, request, context):
        return codec.encode_server_metadata(self._dp.server_metadata())

    async def ModelMetadata(self, request, context):
        return codec.encode_model_metadata(self._dp.model_metadata(*codec.decode_model_ref(request)))

    async def ModelConfig(self, request, context):
        return codec.encode_model_config(self._dp.model_config(*codec.decode_model_ref(request)))

    async def ModelStatistics(self, request, context):
        return codec.encode_model_statistics(self._dp.model_statistics(*codec.decode_model_ref(request)))

    async def RepositoryIndex(self, request, context):
        return codec.encode_repository_index(self._dp.repository_index(request.ready))

    async def RepositoryModelLoad(self, request, context):
        _, name, params = codec.decode_repository_request(request)
        await self._dp.load_model(name, params)
        return codec.encode_repository_load_response()

    async def RepositoryModelUnload(self, request, context):
        _, name, params = codec.decode_repository_request(request)
        await self._dp.unload_model(name, params)
        return codec.encode_repository_unload_response()

    async def ModelInfer(self, request, context):
        arrival_ns = time.perf_counter_ns()  # the request's server time starts before decoding
        req = codec.decode_infer_request(request)
        dp = self._dp
        if dp.is_route(req.model_name):
            response = await dp.infer(req, _routing_key(context), arrival_ns)
        else:  # a model: straight to it (DataPlane.infer would ask the router again)
            response = await dp.infer_model(req, arrival_ns)
        return codec.encode_infer_response(response)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            try:
                arrival_ns = time.perf_counter_ns()
                req = codec.decode_infer_request(request)
                key = _routing_key(context) if self._dp.is_route(req.model_name) else None
                response = await self._dp.infer(req, key, arrival_ns)
                yield codec.encode_stream_response(response)
            except ServingError as exc:
                yield codec.encode_stream_error(f"{exc.code}: {exc}", request.id)
            except Exception:
                ref = uuid.uuid4().hex[:12]
                log.exception("internal error in ModelStreamInfer (ref %s)", ref)
                yield codec.encode_stream_error(f"INTERNAL: internal error (ref {ref}); see the server log", request.id)


def _routing_key(context) -> str | None:
    """The ``x-routing-key`` gRPC metadata of a call (sticky traffic routing), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-routing-key":
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None
