"""ONNX exports of the LeNet-300-100 artifacts run in onnxruntime and compared with the source:
fp32 within 1e-5, fp16 within 1e-2, int8 by MNIST accuracy and against a NumPy reference of the
Q/DQ arithmetic; the int8 graph carries the artifact's own int8 values and scales."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from export_helpers import accuracy, ort_run  # noqa: E402

from pyserve.export import ExportRequest, check_request, load_source, run_export  # noqa: E402

torch = pytest.importorskip("torch")


def _export(tmp_path, source, precision="fp32", dynamic=True, opset=None, name=None):
    out = tmp_path / (name or f"{precision}.onnx")
    req = ExportRequest(source=source, to="onnx", output=out, precision=precision, dynamic_batch=dynamic, opset=opset)
    check_request(req)
    return run_export(req)


def _torch_logits(module, images):
    with torch.no_grad():
        return module(torch.from_numpy(images)).numpy()


def test_fp32_matches_source_within_1e5_at_several_batch_sizes(lenet, tmp_path):
    res = _export(tmp_path, lenet.fp32)
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and not dim0.HasField("dim_value")
    for n in (1, 3, 17):
        x = lenet.test_images[:n]
        (got,) = ort_run(res.path, {"images": x})
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, _torch_logits(lenet.module, x), atol=1e-5, rtol=1e-5)


def test_fp32_embeds_the_signature(lenet, tmp_path):
    res = _export(tmp_path, lenet.fp32)
    meta = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
    sig = json.loads(meta["pyserve_signature.json"])
    assert sig == {"inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}],
                   "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}


def test_static_batch_is_fixed_to_one(lenet, tmp_path):
    res = _export(tmp_path, lenet.fp32, dynamic=False)
    dims = onnx.load(str(res.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 784]
    (got,) = ort_run(res.path, {"images": lenet.test_images[:1]})
    np.testing.assert_allclose(got, _torch_logits(lenet.module, lenet.test_images[:1]), atol=1e-5)


def test_fp16_graph_within_1e2_and_same_accuracy(lenet, tmp_path):
    res = _export(tmp_path, lenet.fp32, "fp16")
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    float_inits = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert float_inits and all(i.data_type == onnx.TensorProto.FLOAT16 for i in float_inits)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
    x = lenet.test_images[:256]
    (got,) = ort_run(res.path, {"images": x})
    ref = _torch_logits(lenet.module, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-2 * max(1.0, np.abs(ref).max()), rtol=1e-2)
    (full,) = ort_run(res.path, {"images": lenet.test_images})
    assert abs(accuracy(full, lenet.test_labels) - accuracy(_torch_logits(lenet.module, lenet.test_images),
                                                            lenet.test_labels)) <= 0.002


def _dq_nodes(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [(n, inits) for n in model.graph.node if n.op_type == "DequantizeLinear"], inits


def test_int8_graph_carries_the_artifacts_int8_values_and_scales(lenet, tmp_path):
    res = _export(tmp_path, lenet.int8, "int8")
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3 and not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    found = {}
    for node in dqs:
        q_init, s_init = inits[node.input[0]], inits[node.input[1]]
        assert q_init.data_type == onnx.TensorProto.INT8
        q, s = numpy_helper.to_array(q_init), numpy_helper.to_array(s_init)
        axis = next(a.i for a in node.attribute if a.name == "axis")
        for name, (ref_q, ref_s) in lenet.quant.items():
            ref_q_oriented = ref_q if axis == 0 else ref_q.T
            if q.shape == ref_q_oriented.shape and np.array_equal(q, ref_q_oriented):
                np.testing.assert_array_equal(s, ref_s)  # bit-exact scales
                assert not np.any(numpy_helper.to_array(inits[node.input[2]]))  # symmetric: zero point 0
                found[name] = axis
    assert set(found) == {"fc1", "fc2", "fc3"}
    # no fp32 copy of a quantized weight is left in the file
    fp32_big = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and
                np.prod(i.dims) >= 100 * 10]
    assert fp32_big == []
    assert res.path.stat().st_size < 0.35 * (784 * 300 + 300 * 100 + 100 * 10) * 4


def test_int8_weight_only_matches_the_dequantized_model(lenet, tmp_path):
    res = _export(tmp_path, lenet.int8, "int8")
    x = lenet.test_images[:64]
    (got,) = ort_run(res.path, {"images": x})
    np.testing.assert_allclose(got, _torch_logits(lenet.int8_module, x), atol=1e-4, rtol=1e-4)
    (full,) = ort_run(res.path, {"images": lenet.test_images})
    fp32_acc = accuracy(_torch_logits(lenet.module, lenet.test_images), lenet.test_labels)
    assert fp32_acc > 0.92
    assert accuracy(full, lenet.test_labels) >= fp32_acc - 0.005


def _numpy_qdq_reference(lenet, x):
    """LeNet-300-100 with int8 weights and activations fake-quantized per tensor (round half to even,
    saturate to [-128, 127], zero point 0) at each Linear's input: ONNX QuantizeLinear's definition."""
    h = x.astype(np.float32)
    for i, name in enumerate(["fc1", "fc2", "fc3"]):
        q, s = lenet.quant[name]
        a = lenet.input_scales[name]
        h = np.clip(np.rint(h / np.float32(a)), -128, 127).astype(np.float32) * np.float32(a)
        w = q.astype(np.float32) * s[:, None]
        b = lenet.int8_module.get_submodule(name).bias.numpy()
        h = h @ w.T + b
        if i < 2:
            h = np.maximum(h, 0)
    return h


def test_int8_static_activation_qdq_matches_numpy_reference_and_keeps_accuracy(lenet, tmp_path):
    res = _export(tmp_path, lenet.int8_static, "int8")
    model = onnx.load(str(res.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert any("activation q/dq" in n or "3 with static activation" in n for n in res.notes)
    x = lenet.test_images[:500]
    (got,) = ort_run(res.path, {"images": x})
    ref = _numpy_qdq_reference(lenet, x)
    # onnxruntime fuses Q/DQ + MatMul into integer kernels; an activation that lands on a rounding
    # boundary of the next layer's quantizer may move by one step, so a few elements differ a little
    diff = np.abs(got - ref)
    assert np.mean(diff <= 2e-3) >= 0.98 and diff.max() <= 0.1 and diff.mean() <= 1e-3, (diff.max(), diff.mean())
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.995
    (full,) = ort_run(res.path, {"images": lenet.test_images})
    fp32_acc = accuracy(_torch_logits(lenet.module, lenet.test_images), lenet.test_labels)
    assert accuracy(full, lenet.test_labels) >= fp32_acc - 0.01


def test_int8_at_opset_17_runs(lenet, tmp_path):
    res = _export(tmp_path, lenet.int8, "int8", opset=17)
    model = onnx.load(str(res.path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (got,) = ort_run(res.path, {"images": lenet.test_images[:8]})
    np.testing.assert_allclose(got, _torch_logits(lenet.int8_module, lenet.test_images[:8]), atol=1e-4)


def test_opset_the_graph_cannot_be_converted_to_is_a_clear_error(lenet, tmp_path):
    from pyserve.export import ExportError

    # onnx.version_converter has no Relu 14 -> 13 adapter, and torch.export graphs cannot be traced
    with pytest.raises(ExportError, match="torch.onnx.export failed at opset 13 .*opset 18 or newer"):
        _export(tmp_path, lenet.int8, "int8", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_source_loaded_once_can_be_reused(lenet, tmp_path):
    src = load_source(lenet.fp32)
    assert src.kind == "artifact" and src.name == "lenet" and not src.int8
    for p in ("fp32", "fp16"):
        req = ExportRequest(source=lenet.fp32, to="onnx", output=tmp_path / f"{p}.onnx", precision=p,
                            dynamic_batch=True)
        assert run_export(req, source=src).path.is_file()
    assert load_source(lenet.int8).int8.keys() == {"fc1.weight", "fc2.weight", "fc3.weight"}


def test_pt2_source_round_trip(lenet, tmp_path):
    """artifact -> torch .pt2 -> ONNX: the .pt2 is itself a SOURCE, and keeps the protocol names."""
    pt2 = run_export(ExportRequest(source=lenet.fp32, to="torch", output=tmp_path / "m.pt2", dynamic_batch=True)).path
    src = load_source(pt2)
    assert src.kind == "pt2" and [s.name for s in src.signature.inputs] == ["images"]
    res = _export(tmp_path, pt2, name="from_pt2.onnx")
    (got,) = ort_run(res.path, {"images": lenet.test_images[:9]})
    np.testing.assert_allclose(got, _torch_logits(lenet.module, lenet.test_images[:9]), atol=1e-5)
