"""native_module(fuse=True): Linear layers that share their input (Q, K, V) merged into one,
checked against the per-layer NumPy int8 reference and against the unfused module."""

import numpy as np
import pytest
import torch
from torch import nn

from pyserve import artifact
from pyserve.artifact.kernels import native_module
from pyserve.ops import quantize_per_channel
from pyserve.ops.reference import int8_linear_reference


class QKV(nn.Module):
    """Three projections of one input (as in attention), a fourth Linear on another input."""

    def __init__(self, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16, bias=bias), nn.Linear(32, 16, bias=bias), nn.Linear(32, 8, bias=bias)
        self.o = nn.Linear(16, 32)

    def forward(self, x):
        q = self.q(x).view(*x.shape[:-1], 4, 4)   # a view of the fused output's slice
        att = torch.softmax(q @ self.k(x).view(*x.shape[:-1], 4, 4).transpose(-1, -2), -1)
        return self.o(att.flatten(-2)) + self.v(x).sum(-1, keepdim=True)


def _int8_encode(net, names):
    """Quantize ``net``'s Linear layers ``names`` per output channel in place (weights become their
    dequantized int8 values) and return the artifact encodings for them."""
    enc = {}
    with torch.no_grad():
        for name in names:
            lin = getattr(net, name)
            q, s = quantize_per_channel(lin.weight.numpy())
            lin.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
            enc[f"{name}.weight"] = artifact.encode_int8(q, s)
    return enc


def _save(tmp_path, bias=True, int8=True):
    torch.manual_seed(0)
    net = QKV(bias).eval()
    enc = _int8_encode(net, ("q", "k", "v")) if int8 else {}
    path = tmp_path / "qkv.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 32),), model_name="qkv", encodings=enc, dynamic_axes=((0, 1),))
    return path, net


def _linear_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and ("linear" in str(n.target) or "int8" in str(n.target))]


@pytest.mark.parametrize("bias", [True, False])
def test_fused_int8_equals_three_int8_layers(tmp_path, bias):
    path, net = _save(tmp_path, bias)
    fused, choices = native_module(artifact.load_artifact(path), kernels="int8")
    apart, choices_apart = native_module(artifact.load_artifact(path), kernels="int8", fuse=False)
    assert choices == choices_apart == {"q.weight": "int8", "k.weight": "int8", "v.weight": "int8", "o.weight": "dense"}
    assert len(_linear_calls(fused)) == 2 and len(_linear_calls(apart)) == 4
    # the fused weight replaced the three: they are not held twice
    assert not hasattr(fused, "q") or not hasattr(fused.q, "weight")
    x = torch.randn(3, 7, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(fused(x).numpy(), apart(x).numpy(), rtol=0, atol=1e-6)


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 12, bias=True), nn.Linear(32, 8)

    def forward(self, x):
        return self.q(x), self.k(x) * 2.0, self.v(x)


def test_each_slice_of_the_fused_layer_is_its_layers_int8_linear(tmp_path):
    torch.manual_seed(1)
    net = Three().eval()
    enc = _int8_encode(net, ("q", "k", "v"))
    path = tmp_path / "three.pyserve"
    artifact.save(path, net, (torch.randn(2, 32),), model_name="three", encodings=enc)
    art = artifact.load_artifact(path)
    fused, _ = native_module(art, kernels="int8")
    assert len(_linear_calls(fused)) == 1
    x = torch.randn(5, 32)
    with torch.inference_mode():
        outs = [o.numpy() for o in fused(x)]
    for out, name, factor in zip(outs, ("q", "k", "v"), (1.0, 2.0, 1.0)):
        p = art.int8[f"{name}.weight"]
        ref = int8_linear_reference(x.numpy(), p.values, p.scale, getattr(net, name).bias.detach().numpy())
        np.testing.assert_allclose(out, factor * ref, rtol=1e-5, atol=1e-5)


def test_fused_fp32_equals_the_graph(tmp_path):
    path, net = _save(tmp_path, int8=False)
    fused, choices = native_module(artifact.load_artifact(path), kernels="dense")
    assert set(choices.values()) == {"dense"} and len(_linear_calls(fused)) == 2
    x = torch.randn(2, 9, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)


def test_mixed_encodings_are_not_fused(tmp_path):
    torch.manual_seed(0)
    net = QKV().eval()
    with torch.no_grad():
        q, s = quantize_per_channel(net.q.weight.numpy())
        net.q.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
    path = tmp_path / "m.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 32),), model_name="m", encodings={"q.weight": artifact.encode_int8(q, s)},
                  dynamic_axes=((0, 1),))
    module, choices = native_module(artifact.load_artifact(path), kernels="int8")
    assert choices["q.weight"] == "int8" and choices["k.weight"] == "dense"
    assert len(_linear_calls(module)) == 4
    x = torch.randn(2, 3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), net(x), atol=2e-2, rtol=0)


class Attention(nn.Module):
    """Eager attention as Hugging Face's BERT writes it: [B, S, 32] -> [B, S, 32], 4 heads of 8."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, -1, 8).transpose(1, 2) for lin in (self.q, self.k, self.v))
        add = torch.where(mask[:, None, None, :].bool(), 0.0, torch.finfo(torch.float32).min)
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 8 ** -0.5 + add, dim=-1)
        return torch.matmul(self.drop(w), v).transpose(1, 2).reshape(b, s, -1)


def test_eager_attention_becomes_one_sdpa_call(tmp_path):
    torch.manual_seed(0)
    net = Attention().eval()
    x, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    path = tmp_path / "att.pyserve"
    artifact.save(path, net, (x, mask), model_name="att", dynamic_axes=((0, 1), (0, 1)))
    fused, _ = native_module(artifact.load_artifact(path), kernels="dense")
    targets = [str(n.target) for n in fused.graph.nodes if n.op == "call_function"]
    assert sum("_sdpa" in t for t in targets) == 1 and not any("softmax" in t for t in targets)
    apart, _ = native_module(artifact.load_artifact(path), kernels="dense", fuse=False)
    assert any("softmax" in str(n.target) for n in apart.graph.nodes)
    x2, mask2 = torch.randn(3, 9, 32), (torch.arange(9)[None] < torch.tensor([[9], [4], [1]])).long()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x2, mask2), net(x2, mask2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(apart(x2, mask2), net(x2, mask2), atol=1e-5, rtol=1e-5)


class Block(nn.Module):
    """A feed-forward sublayer as BERT writes it: Linear, GELU, Linear, dropout, residual, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(x + self.drop(self.b(torch.nn.functional.gelu(self.a(x)))))


def _block_artifact(tmp_path, affine_norm: bool = False):
    """(path, module): a :class:`Block` (seed 0) saved with a and b int8, dims 0 and 1 dynamic;
    ``affine_norm``: its LayerNorm's weight and bias drawn away from 1 and 0."""
    torch.manual_seed(0)
    net = Block().eval()
    if affine_norm:
        with torch.no_grad():
            net.norm.weight.uniform_(0.5, 1.5)
            net.norm.bias.uniform_(-0.5, 0.5)
    enc = _int8_encode(net, ("a", "b"))
    path = tmp_path / "block.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 32),), model_name="block", encodings=enc, dynamic_axes=((0, 1),))
    return path, net


def test_inactive_dropout_dropped_and_int8_layers_bound_at_load(tmp_path, monkeypatch):
    from pyserve.artifact import kernels

    path, net = _block_artifact(tmp_path)

    def dropouts(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.dropout.default]

    bound, choices = native_module(artifact.load_artifact(path), kernels="int8", fold_norm=False)
    assert choices == {"a.weight": "int8", "b.weight": "int8"}
    assert not dropouts(bound)
    assert dropouts(native_module(artifact.load_artifact(path), kernels="int8", fuse=False)[0])
    calls = _linear_calls(bound)
    # bound at load: the activation is the only argument; the weights stay buffers of the module
    assert len(calls) == 2 and all(len(n.args) == 1 and not n.kwargs for n in calls)
    assert sum(1 for b in bound.buffers() if b.dtype == torch.int8) == 2
    monkeypatch.setattr(kernels, "_cached_pack_of", lambda values: None)
    plain, _ = native_module(artifact.load_artifact(path), kernels="int8", fold_norm=False)
    assert [n.target for n in _linear_calls(plain)] == [kernels._int8_fn] * 2
    x = torch.randn(3, 7, 32)
    assert [n.target.__name__ for n in calls] == ["int8_linear_packed_gelu", "int8_linear_packed"]
    with torch.inference_mode():
        got = bound(x)
        # the same kernel on the same operands, but a's GELU folded into its native call (a rational
        # erf, within 2e-6 of torch's gelu): close, not bit for bit
        torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
    # against the NumPy int8 reference, layer by layer
    pa, pb = (artifact.load_artifact(path).int8[f"{n}.weight"] for n in ("a", "b"))
    h = int8_linear_reference(x.reshape(-1, 32).numpy(), pa.values, pa.scale, net.a.bias.detach().numpy())
    h = torch.nn.functional.gelu(torch.from_numpy(np.asarray(h, np.float32))).numpy()
    h = int8_linear_reference(h, pb.values, pb.scale, net.b.bias.detach().numpy())
    with torch.no_grad():
        expected = net.norm(x + torch.from_numpy(np.asarray(h, np.float32)).reshape(3, 7, 32)).numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


class HeadsAttention(nn.Module):
    """BERT's self-attention as transformers writes it (separate Q, K, V Linear layers, heads of 16),
    with its output projection."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.o = nn.Linear(64, 64)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, -1, 16).transpose(1, 2) for lin in (self.q, self.k, self.v))
        add = torch.where(mask[:, None, None, :].bool(), 0.0, torch.finfo(torch.float32).min)
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 16 ** -0.5 + add, dim=-1)
        return self.o(torch.matmul(w, v).transpose(1, 2).contiguous().reshape(b, s, -1))


@pytest.mark.parametrize("int8", [True, False])
def test_fused_qkv_attention_is_one_native_call(tmp_path, int8):
    from pyserve import ops
    from pyserve.artifact import kernels

    if not ops.attention_qkv_fast(16):
        pytest.skip("no AVX2 attention kernel on this CPU: the graph keeps torch's SDPA")
    torch.manual_seed(0)
    net = HeadsAttention().eval()
    enc = _int8_encode(net, ("q", "k", "v", "o")) if int8 else {}
    x, mask = torch.randn(2, 6, 64), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    path = tmp_path / "heads.pyserve"
    artifact.save(path, net, (x, mask), model_name="heads", encodings=enc, dynamic_axes=((0, 1), (0, 1)))
    mode = "int8" if int8 else "dense"
    native, _ = native_module(artifact.load_artifact(path), kernels=mode)
    sdpa, _ = native_module(artifact.load_artifact(path), kernels=mode, attention=False)

    def targets(gm):
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    assert targets(native).count(kernels._attention_qkv) == 1 and kernels._sdpa not in targets(native)
    assert targets(sdpa).count(kernels._sdpa) == 1 and kernels._attention_qkv not in targets(sdpa)
    # no head views, transposes or copies left around the native call
    assert not any(t in (torch.ops.aten.transpose.int, torch.ops.aten.contiguous.default) for t in targets(native))
    x2, mask2 = torch.randn(3, 9, 64), (torch.arange(9)[None] < torch.tensor([[9], [4], [1]])).long()
    with torch.inference_mode():
        got, ref = native(x2, mask2), sdpa(x2, mask2)
        # the same int8 (or fp32) projections; attention within float rounding of torch's SDPA
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if not int8:
            torch.testing.assert_close(got, net(x2, mask2), rtol=1e-5, atol=1e-5)


def test_bf16_attention_node(tmp_path):
    """native_module(attention="bf16"): the same graph, its attention node asking for bfloat16
    products: within bfloat16's precision of the fp32 node, and (where the CPU runs the bfloat16
    kernel) not equal to it; a bad ``attention`` value is refused before any work."""
    from pyserve import ops
    from pyserve.artifact import kernels

    if not ops.attention_qkv_fast(16):
        pytest.skip("no AVX2 attention kernel on this CPU: the graph keeps torch's SDPA")
    torch.manual_seed(0)
    net = HeadsAttention().eval()
    x, mask = torch.randn(2, 6, 64), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    path = tmp_path / "heads.pyserve"
    artifact.save(path, net, (x, mask), model_name="heads", dynamic_axes=((0, 1), (0, 1)))
    bf16, _ = native_module(artifact.load_artifact(path), kernels="dense", attention="bf16")
    fp32, _ = native_module(artifact.load_artifact(path), kernels="dense", attention="fp32")
    node = [n for n in bf16.graph.nodes if n.target is kernels._attention_qkv]
    assert len(node) == 1 and node[0].args[5] == "bf16"
    assert [n.args[5] for n in fp32.graph.nodes if n.target is kernels._attention_qkv] == ["fp32"]
    x2, mask2 = torch.randn(3, 33, 64), (torch.arange(33)[None] < torch.tensor([[33], [4], [1]])).long()
    with torch.inference_mode():
        got, ref = bf16(x2, mask2), fp32(x2, mask2)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    assert torch.equal(got, ref) is not ops.attention_qkv_bf16(16)
    for bad in ("fp16", 1, None):
        with pytest.raises(ValueError, match="native_module: argument 'attention'"):
            native_module(artifact.load_artifact(path), attention=bad)


def test_attention_node_falls_back_to_torch_for_what_the_kernel_does_not_take():
    from pyserve.artifact import kernels

    torch.manual_seed(0)
    B, S, H, D = 2, 5, 2, 16
    qkv = torch.randn(B, S, 3 * H * D)
    q, k, v = (qkv[..., i * H * D:(i + 1) * H * D].reshape(B, S, H, D).transpose(1, 2) for i in range(3))
    mask = torch.randn(B, H, S, S)  # one mask per head: not the kernel's layout
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = kernels._attention_qkv(qkv, mask, H, D, 0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(B, S, H * D), rtol=0, atol=0)
    bool_mask = torch.ones(B, 1, S, S, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=0.3)
    torch.testing.assert_close(kernels._attention_qkv(qkv, bool_mask, H, D, 0.3),
                               expected.transpose(1, 2).reshape(B, S, H * D), rtol=0, atol=0)


def test_auto_times_each_kernel_as_it_would_run_with_its_epilogue(tmp_path, monkeypatch):
    """kernels="auto" times int8 through the bound packed call with the GELU / add & LayerNorm it
    would fold, and dense followed by torch's ops: a per-layer timing without the epilogue kept
    MiniLM's layers dense on a CPU where that made the whole model 10% slower."""
    from pyserve.artifact import kernels

    path, net = _block_artifact(tmp_path, affine_norm=True)
    measured = []
    real = kernels._best_times

    def spy(fns, repeats):
        measured.append(fns)
        return real(fns, repeats)

    monkeypatch.setattr(kernels, "_best_times", spy)
    module, choices = native_module(artifact.load_artifact(path), kernels="auto", sample_rows=(3, 9), repeats=1)
    assert [sorted(f) for f in measured] == [["dense", "int8"]] * 4  # layers a and b, two row counts each
    assert set(module.pyserve_kernel_timings) == {"a.weight", "b.weight"}
    assert all(t > 0 for v in module.pyserve_kernel_timings.values() for t in v.values())
    F = torch.nn.functional
    pa, pb = (artifact.load_artifact(path).int8[f"{n}.weight"] for n in ("a", "b"))

    def int8_ref(x, parts, bias):
        return torch.from_numpy(np.asarray(int8_linear_reference(x.numpy(), parts.values, parts.scale,
                                                                  bias.detach().numpy()), np.float32))

    with torch.inference_mode():
        for fns in measured[:2]:  # a: GELU follows
            x, r = fns["dense"].args
            assert r is None
            torch.testing.assert_close(fns["dense"](), F.gelu(F.linear(x, net.a.weight, net.a.bias)))
            torch.testing.assert_close(fns["int8"](), F.gelu(int8_ref(x, pa, net.a.bias)), rtol=1e-5, atol=1e-5)
        for fns in measured[2:]:  # b: add & LayerNorm follow (the residual is part of the timed call)
            x, r = fns["dense"].args
            assert r.shape == (x.shape[0], 32)
            ln = net.norm
            torch.testing.assert_close(fns["dense"](), F.layer_norm(F.linear(x, net.b.weight, net.b.bias) + r, [32],
                                                                    ln.weight, ln.bias, ln.eps))
            torch.testing.assert_close(fns["int8"](), F.layer_norm(int8_ref(x, pb, net.b.bias) + r, [32], ln.weight,
                                                                   ln.bias, ln.eps), rtol=1e-4, atol=1e-4)
        x = torch.randn(3, 7, 32)
        torch.testing.assert_close(module(x), net(x), rtol=0.05, atol=0.05)
    assert set(choices.values()) <= {"dense", "int8"}


@pytest.mark.parametrize(("dense_s", "int8_s", "expected"), [
    (1.00, 1.05, "int8"),   # dense 5% faster: a near tie, int8 stays
    (1.00, 1.10, "int8"),   # at the margin
    (1.00, 1.25, "dense"),  # dense clearly faster
    (1.00, 0.80, "int8"),
])
def test_auto_keeps_int8_unless_another_kernel_is_clearly_faster(tmp_path, monkeypatch, dense_s, int8_s, expected):
    from pyserve.artifact import kernels

    path, net = _block_artifact(tmp_path)
    monkeypatch.setattr(kernels, "_best_times", lambda fns, repeats: {"dense": dense_s, "int8": int8_s})
    module, choices = native_module(artifact.load_artifact(path), kernels="auto", sample_rows=(3,), repeats=1)
    assert choices == {"a.weight": expected, "b.weight": expected}
    assert module.pyserve_kernel_timings["a.weight"] == {"dense": dense_s, "int8": int8_s}
    assert kernels._choose({"dense": 1.0, "csr": 0.5}) == "csr"  # no int8 candidate: the fastest


def test_add_and_layer_norm_folded_into_the_int8_layer(tmp_path):
    """BERT's add & norm after an int8 layer: one native call with the epilogue, within float
    rounding of the layer followed by torch's add and layer_norm (same int8 GEMM)."""
    path, net = _block_artifact(tmp_path, affine_norm=True)
    folded, _ = native_module(artifact.load_artifact(path), kernels="int8")
    apart, _ = native_module(artifact.load_artifact(path), kernels="int8", fold_norm=False)

    def targets(gm):
        return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]

    assert targets(folded) == ["int8_linear_packed_gelu", "int8_linear_packed_add_norm"]
    assert "layer_norm.default" in targets(apart) and "add.Tensor" in targets(apart)
    x = torch.randn(3, 7, 32) * 3
    with torch.inference_mode():
        got, ref = folded(x), apart(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # against a float64 LayerNorm of the layer-by-layer NumPy int8 reference
    pa, pb = (artifact.load_artifact(path).int8[f"{n}.weight"] for n in ("a", "b"))
    hid = int8_linear_reference(x.reshape(-1, 32).numpy(), pa.values, pa.scale, net.a.bias.detach().numpy())
    hid = torch.nn.functional.gelu(torch.from_numpy(np.asarray(hid, np.float32))).numpy()
    pre = np.asarray(int8_linear_reference(hid, pb.values, pb.scale, net.b.bias.detach().numpy()), np.float64)
    pre = pre + x.reshape(-1, 32).numpy().astype(np.float64)
    mean, var = pre.mean(1, keepdims=True), pre.var(1, keepdims=True)
    expected = (pre - mean) / np.sqrt(var + net.norm.eps) * net.norm.weight.detach().numpy() + net.norm.bias.detach().numpy()
    np.testing.assert_allclose(got.reshape(-1, 32).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_add_norm_layer_falls_back_for_a_broadcast_residual():
    from pyserve.artifact import kernels
    from pyserve.ops.quant import _pin_packed

    torch.manual_seed(0)
    q, s = quantize_per_channel(torch.randn(16, 8).numpy())
    values = torch.from_numpy(q)
    _pin_packed(values)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    fn = kernels._int8_packed_layer(values, torch.from_numpy(s), None, norm=(w, b, 1e-6))
    plain = kernels._int8_packed_layer(values, torch.from_numpy(s), None)
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 16)
    expected = torch.nn.functional.layer_norm(plain(x) + r, [16], w, b, 1e-6)
    torch.testing.assert_close(fn(x, r), expected, rtol=1e-5, atol=1e-5)
    r1 = torch.randn(16)  # broadcast over rows: torch's add and layer_norm, exactly
    torch.testing.assert_close(fn(x, r1), torch.nn.functional.layer_norm(plain(x) + r1, [16], w, b, 1e-6),
                               rtol=0, atol=0)


class ResidualLater(nn.Module):
    """add & LayerNorm whose residual is traced after the layer (2 x), is the layer itself (h + h),
    or is another layer's output (a projection shortcut: b's output comes after a's)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.norm = nn.Linear(32, 32), nn.Linear(32, 32), nn.LayerNorm(32)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "later":
            return self.norm(h + x * 2.0)
        if self.kind == "same":
            return self.norm(h + h)
        return self.norm(h + self.b(x * 0.5))


@pytest.mark.parametrize(("kind", "folded"), [("later", 0), ("same", 0), ("shortcut", 1)])
def test_add_and_layer_norm_fold_only_reads_a_residual_computed_before_the_layer(tmp_path, kind, folded):
    """The folded layer takes the residual as an argument, so the fold needs the residual computed
    before the layer: otherwise the rewritten graph read it unassigned (UnboundLocalError on every
    call). A shortcut layer computed after the other folds into the later one."""
    torch.manual_seed(0)
    net = ResidualLater(kind).eval()
    enc = _int8_encode(net, ("a", "b"))
    path = tmp_path / "m.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 32),), model_name="m", encodings=enc, dynamic_axes=((0, 1),))
    module, _ = native_module(artifact.load_artifact(path), kernels="int8")
    apart, _ = native_module(artifact.load_artifact(path), kernels="int8", fold_norm=False)
    module.graph.lint()
    names = [getattr(n.target, "__name__", "") for n in module.graph.nodes if n.op == "call_function"]
    assert names.count("int8_linear_packed_add_norm") == folded
    x = torch.randn(3, 7, 32)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), apart(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(x), net(x), rtol=0.05, atol=0.05)
        auto, _ = native_module(artifact.load_artifact(path), kernels="auto", sample_rows=(3,), repeats=1)
        torch.testing.assert_close(auto(x), net(x), rtol=0.05, atol=0.05)


class Pool(nn.Module):
    """sentence-transformers' mean pooling and normalisation after one Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, mask):
        h = self.lin(x)
        m = mask.unsqueeze(-1).to(torch.float32)
        d = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(d, p=2, dim=1)


def test_mean_pooling_and_normalisation_become_one_node(tmp_path):
    from pyserve.artifact import kernels

    torch.manual_seed(0)
    net = Pool().eval()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    path = tmp_path / "pool.pyserve"
    artifact.save(path, net, (x, mask), model_name="pool", dynamic_axes=((0, 1), (0, 1)))
    gm, _ = native_module(artifact.load_artifact(path), kernels="dense")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(kernels._mean_pool_normalize) == 1 and torch.ops.aten.mul.Tensor not in targets
    x2, mask2 = torch.randn(3, 7, 16), (torch.arange(7)[None] < torch.tensor([[7], [3], [1]])).long()
    with torch.inference_mode():
        torch.testing.assert_close(gm(x2, mask2), net(x2, mask2), rtol=1e-6, atol=1e-6)
    # the torch fallback (gradients) computes the graph's ops
    h = torch.randn(3, 7, 16, requires_grad=True)
    f = mask2.unsqueeze(-1).float()
    d = (h * f).sum(1) / f.sum(1).clamp_min(1e-9)
    torch.testing.assert_close(kernels._mean_pool_normalize(h, mask2, 1e-9, 1e-12),
                               torch.nn.functional.normalize(d, p=2, dim=1), rtol=0, atol=0)


class MaskedAttention(nn.Module):
    """Eager attention under transformers' additive key mask, ``where(m[:, None, None, :], 0, min)``."""

    def __init__(self, fill=None):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.fill = fill

    def forward(self, x, mask):
        B, S = mask.shape  # as transformers does: the mask's sizes, so the mask ops read one input
        q, k, v = (t.reshape(B, S, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        m = mask.to(torch.bool)[:, None, None, :].expand(B, 1, S, S)
        fill = torch.finfo(torch.float32).min if self.fill is None else self.fill
        add = torch.where(m, torch.zeros(()), fill)
        a = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + add, -1) @ v
        return a.transpose(1, 2).reshape(B, S, 16)


def test_additive_mask_becomes_one_node_only_where_it_matches(tmp_path):
    from pyserve.artifact import kernels

    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    x2, mask2 = torch.randn(8, 7, 16), (torch.arange(7)[None] < torch.arange(1, 9)[:, None]).long()
    for fill, folded in ((None, True), (-1e4, True), (float("nan"), False)):
        net = MaskedAttention(fill).eval()
        path = tmp_path / f"mask{fill}.pyserve"
        artifact.save(path, net, (x, mask), model_name="mask", dynamic_axes=((0, 1), (0, 1)))
        gm, _ = native_module(artifact.load_artifact(path), kernels="dense")
        plain, _ = native_module(artifact.load_artifact(path), kernels="dense", mask=False)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert (kernels._additive_key_mask in targets) is folded
        with torch.inference_mode():
            if folded:
                torch.testing.assert_close(gm(x2, mask2), net(x2, mask2), rtol=1e-5, atol=1e-5)
                assert torch.equal(gm(x2, mask2), plain(x2, mask2))
    m = mask2.clone()
    got = kernels._additive_key_mask(m, -5.0)
    assert got.shape == (8, 1, 7, 7) and got.dtype == torch.float32
    assert torch.equal(got, torch.where(m.bool(), 0.0, -5.0)[:, None, None, :].expand(8, 1, 7, 7))
