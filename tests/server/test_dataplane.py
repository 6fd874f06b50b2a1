"""The data plane's per-request path: the cached input check against the full one, the shared
request bookkeeping of the async and sync paths, the direct scheduler's statistics shortcut, and the
empty-batch refusal (torch-free, the test-echo backend)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from pyserve.backends import ModelSignature, TensorSpec
from pyserve.protocol.errors import InvalidArgument, ServingError
from pyserve.protocol.types import InferRequest, Tensor
from pyserve.server.dataplane import DataPlane, _Validation
from pyserve.server.repository import Model, ModelRepository
from pyserve.server.stats import ExecutionTiming, StatsRecorder

SIG = ModelSignature(
    inputs=(TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "INT64", (-1, 2, -1)), TensorSpec("c", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1, 3)),),
)


def _cases():
    """Requests of every shape of wrongness next to valid ones (names, order, datatypes, dtypes,
    ranks, fixed sizes, batch sizes 0..9, big-endian data, duplicates, missing and extra inputs)."""
    def t(name, datatype, data):
        return Tensor(name, datatype, data)

    def full(rows_a=2, rows_b=2, rows_c=2, last=5):
        return [t("a", "FP32", np.zeros((rows_a, 3), np.float32)),
                t("b", "INT64", np.zeros((rows_b, 2, last), np.int64)),
                t("c", "BYTES", np.array([b"x"] * rows_c, dtype=object))]

    cases = []
    for ra, rb, rc in itertools.product([0, 1, 2, 8, 9], [1, 2, 9], [2, 0]):
        cases.append(full(ra, rb, rc))
    for rows in [0, 1, 2, 8, 9]:
        cases.append(full(rows, rows, rows, last=rows + 1))
    ok = full()
    cases += [ok, ok[::-1], [ok[1], ok[0], ok[2]], ok[:2], ok + [ok[0]], ok + [t("d", "FP32", np.zeros((2, 3), np.float32))],
              [t("z", "FP32", np.zeros((2, 3), np.float32))] + ok[1:], []]
    cases.append([t("a", "FP64", np.zeros((2, 3), np.float64))] + ok[1:])
    cases.append([t("a", "FP32", np.zeros((2, 3), ">f4"))] + ok[1:])  # other byte order: accepted
    cases.append([t("a", "FP32", np.zeros((2, 4), np.float32))] + ok[1:])
    cases.append([t("a", "FP32", np.zeros((2, 3, 1), np.float32))] + ok[1:])
    cases.append([t("a", "FP32", np.zeros((3,), np.float32))] + ok[1:])
    cases.append([ok[0], t("b", "INT64", np.zeros((2, 3, 5), np.int64)), ok[2]])
    cases.append([ok[0], t("b", "INT32", np.zeros((2, 2, 5), np.int32)), ok[2]])
    cases.append([ok[0], ok[1], t("c", "BYTES", np.array([[b"x"], [b"y"]], dtype=object))])
    return cases


def _slow(dp, model, sig, tensors, max_batch):
    """The full check (the reference): (inputs, rows) or the error message."""
    try:
        inputs = dp._check_inputs(model, sig, tensors, max_batch)
    except ServingError as exc:
        return type(exc), str(exc)
    rows = int(next(iter(inputs.values())).shape[0]) if max_batch > 0 and inputs else 1
    return inputs, rows


@pytest.mark.parametrize("max_batch", [0, 8])
def test_cached_check_agrees_with_the_full_check(tmp_path, max_batch):
    dp = DataPlane(ModelRepository(tmp_path))
    model = Model("m", tmp_path)
    plan = _Validation(SIG, max_batch)
    accepted = refused = 0
    for tensors in _cases():
        fast = plan.inputs(tensors)
        slow = _slow(dp, model, SIG, tensors, max_batch)
        if fast is None:  # the data plane then runs the full check, which must name the problem ...
            refused += 1
            if not isinstance(slow[1], str):  # ... or accept what the fast check left to it
                assert tensors and tensors[0].data.dtype.byteorder == ">", tensors
            continue
        accepted += 1
        inputs, rows = fast
        assert not isinstance(slow[1], str), slow
        assert list(inputs) == [s.name for s in SIG.inputs]  # signature order
        assert all(inputs[k] is slow[0][k] for k in inputs) and rows == slow[1]
    assert accepted >= 6 and refused >= 20


def test_empty_batch_is_refused_with_expected_and_actual(tmp_path):
    dp = DataPlane(ModelRepository(tmp_path))
    plan = _Validation(SIG, 8)
    tensors = [Tensor("a", "FP32", np.zeros((0, 3), np.float32)), Tensor("b", "INT64", np.zeros((0, 2, 5), np.int64)),
               Tensor("c", "BYTES", np.zeros((0,), dtype=object))]
    assert plan.inputs(tensors) is None
    with pytest.raises(InvalidArgument, match=r"input 'a' of model 'm': empty batch: shape \[0, 3\] has 0 rows; "
                                              r"expected 1\.\.8 \(the model's max_batch_size\)"):
        dp._check_inputs(Model("m", tmp_path), SIG, tensors, 8)
    # without batching (max_batch_size 0) a 0-sized first dimension is just a size
    assert _Validation(SIG, 0).inputs(tensors) is not None


def test_execution_one_records_what_execution_records():
    a, b = StatsRecorder("m", "1"), StatsRecorder("m", "1")
    for rows, q, infer in [(1, 1000, 50_000), (4, 0, 7), (1, 5, 9), (64, 123_456, 1)]:
        a.execution_one(rows, q, infer)
        b.execution(ExecutionTiming(rows, [q], 0, infer, 0))
    assert a.snapshot() == b.snapshot()


def _echo_repo(tmp_path, write_model, mode="echo", config="backend: test-echo\nmax_batch_size: 8\n"):
    write_model(tmp_path, "m", 1, echo_mode=mode, config=config)
    repo = ModelRepository(tmp_path)
    return repo


@pytest.mark.parametrize("path", ["async", "sync"])
def test_request_bookkeeping_is_the_same_on_both_paths(tmp_path, write_model, path):
    """Success and failure (validation error, backend error) are counted with their rows, and the
    version is released, whether infer_model or infer_model_sync served the request."""
    repo = _echo_repo(tmp_path, write_model)

    async def run():
        await repo.load_all()
        dp = DataPlane(repo)
        mv = repo.get("m").current
        if path == "sync":  # the echo backend has no infer_sync: give it one (the same answers)
            backend = mv.backend

            def infer_sync(batch):
                return [{"y": np.asarray(inputs["x"]) * 2} if not (np.asarray(inputs["x"]) == -999).any()
                        else InvalidArgument("poisoned request: x holds -999") for inputs in batch]

            backend.infer_sync = infer_sync
            mv.scheduler.runner.backend_sync = infer_sync
            mv.scheduler.runs_sync = True

        async def infer(x):
            req = InferRequest("m", (Tensor("x", "FP32", x),))
            return dp.infer_model_sync(req) if path == "sync" else await dp.infer_model(req)

        ok = await infer(np.ones((3, 2), np.float32))
        assert np.array_equal(ok.outputs[0].data, np.full((3, 2), 2, np.float32))
        with pytest.raises(InvalidArgument, match="poisoned"):
            await infer(np.full((2, 2), -999, np.float32))
        with pytest.raises(InvalidArgument, match="exceeds the model's max_batch_size 8"):
            await infer(np.ones((9, 2), np.float32))
        snap = mv.stats.snapshot()
        assert (snap.success.count, snap.fail.count, snap.inference_count) == (1, 2, 3)
        assert snap.execution_count == 2  # the too-big batch never reached the backend
        assert mv.inflight == 0
        await repo.unload_all()

    asyncio.run(run())
