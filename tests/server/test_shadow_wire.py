"""The shadow worker's wire format (pyserve.server._shadow_process): a job's tensors travel as their
bytes (no pickled numpy, no re-encode) and decode to views of the received message; results come
back in batches, are handled only when the owner asks (process_results), and a deadline leaves the
rest for later. References: the arrays and values put in, compared element by element."""

import asyncio
import pickle
import struct

import numpy as np
import pytest

from pyserve.protocol.types import InferRequest, RequestedOutput, Tensor
from pyserve.server._shadow_process import (
    ShadowProcess,
    ShadowResult,
    decode_job,
    encode_job,
)
from pyserve.traffic.shadow import Divergence


def _request():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    ids = np.arange(12, dtype=np.int64).reshape(4, 3).T  # not C-contiguous
    bf16 = np.array([[0x3F80, 0x4000]], dtype=np.uint16)  # BF16 travels as uint16 bits
    text = np.array([b"a", b"bc\x00d"], dtype=object)
    empty = np.zeros((0, 5), dtype=np.float16)
    inputs = (Tensor("x", "FP32", x), Tensor("ids", "INT64", ids, {"p": 1}), Tensor("b", "BF16", bf16),
              Tensor("t", "BYTES", text), Tensor("e", "FP16", empty))
    return InferRequest(model_name="m", inputs=inputs, model_version="3", id="req-7",
                        outputs=(RequestedOutput("logits", {"classification": 2}),),
                        parameters={"routing_key": "u1", "flag": True, "n": 5, "f": 0.5})


def _body(frame: bytes) -> memoryview:
    (n,) = struct.unpack_from(">I", frame)
    assert n == len(frame) - 4
    return memoryview(frame)[4:]


def test_a_job_round_trips_with_its_bytes_as_sent():
    req = _request()
    primary = {"logits": np.array([[0.1, 0.9, -2.0]], dtype=np.float32), "ids": np.array([[3, 1]], dtype=np.int32)}
    token = ("fingerprint", {"backend": "pyserve"})
    frame = encode_job(41, "m", "3", token, req, primary)
    got = decode_job(_body(frame))
    assert (got["job"], got["model"], got["version"], got["token"]) == (41, "m", "3", token)
    r = got["request"]
    assert (r.model_name, r.model_version, r.id) == ("m", "3", "req-7")
    assert r.parameters == req.parameters
    assert r.outputs == req.outputs
    for a, b in zip(req.inputs, r.inputs, strict=True):
        assert (a.name, a.datatype, a.parameters) == (b.name, b.datatype, b.parameters)
        assert b.data.dtype == a.data.dtype and b.data.shape == a.data.shape
        if a.datatype == "BYTES":
            assert list(b.data) == list(a.data)
        else:
            np.testing.assert_array_equal(b.data, a.data)
            if a.data.size:
                assert isinstance(b.data.base, (memoryview, bytes, np.ndarray))  # a view of the message
    assert set(got["primary"]) == set(primary)
    for k, v in primary.items():
        np.testing.assert_array_equal(got["primary"][k], v)
        assert got["primary"][k].dtype == v.dtype


def test_no_numpy_or_pyserve_objects_are_pickled_for_numeric_tensors():
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    req = InferRequest(model_name="m", inputs=(Tensor("images", "FP32", x),))
    frame = encode_job(1, "m", "1", None, req, {"logits": np.zeros((1, 10), np.float32)})
    body = _body(frame)
    (m,) = struct.unpack_from(">I", body)
    meta = bytes(body[4: 4 + m])
    assert b"numpy" not in meta and b"pyserve" not in meta  # plain values only
    assert bytes(body[4 + m: 4 + m + x.nbytes]) == x.tobytes()  # the input's bytes, as they are
    assert len(frame) == 4 + 4 + m + x.nbytes + 40
    assert decode_job(body)["token"] is None


def _results_frame(results) -> bytes:
    data = pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack(">I", len(data)) + data


def test_batched_results_are_handled_when_asked_and_split_reads_are_reassembled():
    proc = ShadowProcess("/nonexistent", on_data=lambda: None)
    got = []
    pipes = object()
    proc._pipes = pipes  # a stand-in for a running worker (no process is started in this test)
    for job in (1, 2, 3):
        proc._pending[job] = got.append
    frame = _results_frame([(1, True, 0.004, (2, 0.5, 0.25, 0.99, True), ""),
                            (2, False, 0.001, None, "UNAVAILABLE: injected"),
                            (99, True, 0.1, None, "")])  # an unknown job (already failed) is skipped
    frame += _results_frame([(3, True, 0.002, (1, None, 0.0, 1.0, True), "")])
    for i in range(0, len(frame), 7):  # the pipe delivers arbitrary pieces
        proc._received(pipes, frame[i: i + 7])
    assert got == [] and proc.has_results  # on_data given: nothing handled until asked
    assert proc.process_results() == 4
    assert got == [ShadowResult(True, 0.004, Divergence(2, 0.5, 0.25, 0.99, True), ""),
                   ShadowResult(False, 0.001, None, "UNAVAILABLE: injected"),
                   ShadowResult(True, 0.002, Divergence(1, None, 0.0, 1.0, True), "")]
    assert proc.batches == 2 and proc.in_flight == 0 and not proc.has_results


def test_a_deadline_leaves_results_for_the_next_call():
    proc = ShadowProcess("/nonexistent", on_data=lambda: None)
    got = []
    pipes = object()
    proc._pipes = pipes
    for job in range(1, 11):
        proc._pending[job] = got.append
    proc._received(pipes, _results_frame([(j, True, 0.001, None, "") for j in range(1, 11)]))
    assert proc.process_results(deadline=0.0) == 1  # past deadline: one result, the rest wait
    assert len(got) == 1 and proc.has_results and proc.in_flight == 9
    assert proc.process_results() == 9 and len(got) == 10


def test_jobs_fail_at_once_while_the_worker_is_backing_off():
    async def go():
        proc = ShadowProcess("/nonexistent", on_data=lambda: None)
        proc._down_until = float("inf")
        proc._down_reason = "it exited (code 9)"
        got = []
        req = InferRequest(model_name="m", inputs=(Tensor("x", "FP32", np.zeros((1, 2), np.float32)),))
        proc.submit("m", "1", ("fp", None), req, {}, got.append)
        return proc, got

    proc, got = asyncio.run(go())
    assert len(got) == 1 and not got[0].ok and "it exited (code 9)" in got[0].error
    assert proc.in_flight == 0 and proc.starts == 0


def test_priority_is_checked():
    with pytest.raises(ValueError, match="priority must be one of idle, nice, normal, got 'low'"):
        ShadowProcess("/x", priority="low")
