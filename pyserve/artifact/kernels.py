"""Run a loaded artifact's Linear layers with pyserve's native kernels, chosen per layer.

:func:`native_module` rewrites the FX graph of :attr:`LoadedArtifact.module`: every
``aten.linear`` whose weight is a stored tensor gets the candidates its stored form allows —

* ``dense``: torch's fp32 ``linear`` (always; the weight as decoded),
* ``int8``: :func:`pyserve.ops.int8_linear` on the stored int8 values and per-channel scales,
  activations quantized per row at each call (``int8`` encoding),
* ``csr``: :func:`pyserve.ops.csr_linear` on the nonzeros (``sparse`` encoding), packed once at
  load (:func:`pyserve.ops.pack_csr_weight`: validated, 16-bit column indices, SELL-8 slices),
* ``codebook``: :func:`pyserve.ops.codebook_linear` on packed codebook indices (``sparse``
  encoding with a codebook: the pruned zeros are codebook entry 0) —

and keeps the fastest, measured at load on random activations of ``sample_rows`` rows (the best
of ``repeats`` interleaved runs each — the least disturbed by other load — summed over the row
counts; an int8 layer stays int8 unless another kernel is more than :data:`INT8_MARGIN` faster,
:func:`_choose`). Each kernel is timed as it will run (:func:`_measure_candidates`): int8 through its bound
packed call, and with the GELU or add & LayerNorm that ``fuse`` folds into an int8 layer (torch's
ops after the other kernels); the times are kept in the module's ``pyserve_kernel_timings``
(``{weight name: {kernel: seconds}}``). Leading dims of the activation (``[B, S, K]`` in a
transformer) are flattened to rows and restored. ``kernels="dense"`` keeps torch's fp32 layers;
naming one kernel (``"int8"``) uses it wherever the layer's encoding allows.

The int8 path computes what the ``int8`` method's dequantized fp32 weights compute, up to the
activation rounding (Jacob et al. 2018, section 2): each activation row is within half a step
(``max|row| / 254``) of its input.

``fuse=True`` (default) first merges Linear layers that read the same activation — the query, key
and value projections of a transformer block — into one layer whose weight stacks theirs
(``[sum N_i, K]``, int8 values and per-channel scales stacked likewise, biases concatenated), whose
output is then sliced back along the last dim. One GEMM of ``N = 3 * 384`` replaces three of 384,
and ``int8_linear`` quantizes the shared activation once instead of three times. Per-channel
quantization makes the fused int8 layer compute exactly what the three did (each output channel
keeps its own scale; the activation's per-row scale is the same for all three). Layers are merged
only when their stored forms allow the same kernels (all ``int8`` with no static ``input_scale``
difference, or all plain fp32) and all or none have a bias.

``fuse=True`` also replaces eager attention — ``softmax(q @ k^T * scale + mask) @ v`` as
``matmul``, ``transpose``, ``mul``, ``add``, ``softmax`` (and an inactive ``dropout``) nodes — by one
``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`` call
(torch's fused CPU kernel: no ``[B, H, S, S]`` score tensor written and read back between five ops;
Vaswani et al. 2017, section 3.2.1, is the function both compute), and removes the
``dropout(x, p, train=False)`` nodes of an eval-mode export (the identity).

An ``int8`` layer whose weights are packed at load (always, for a loaded artifact's) is called
through a function bound to its packed weights, scale and bias (:func:`_int8_packed_layer`): only
the activation is converted per call. The weights stay buffers of the module.

``fuse=True`` also folds ``gelu(h)`` (the exact erf form) into the int8 layer computing ``h`` when
nothing else reads ``h`` (:func:`_fold_gelu`; BERT's FFN input layer): GELU is applied inside the
native call, within ~2e-6 of torch's ``gelu`` (not bit-identical: the erf is a rational
approximation, ``csrc/quant/int8_kernel.h``).

``fuse=True`` then (``attention=True``, the default, where the CPU has the AVX2 kernel) runs the
attention of each fused Q|K|V projection as one native :func:`pyserve.ops.attention_qkv` call
(:func:`_fuse_qkv_attention`): the three ``slice -> view -> transpose`` chains, the SDPA call and
the ``transpose -> contiguous -> reshape`` of its output (13 nodes per layer) become one node that
reads the projection's ``[B, S, 3 E]`` output in place and writes ``[B, S, E]``; within float
rounding of torch's SDPA (MiniLM at sequence 128: 424 -> 410 us per layer for the kernel, against
SDPA's ~530 us plus ~60 us of the removed nodes, one thread); ``attention="bf16"`` asks for the
call's bfloat16 products (``precision="bf16"``: 341 -> ~200-230 us per MiniLM layer on a Zen 4
CPU; on an fp32 graph the embeddings move by 1 - cosine ~1.3e-6, on an int8 one by up to ~3e-3, the
spread the int8 layers' activation rounding gives any change of that size). And (``fold_norm=True``) it folds
``layer_norm(h + residual)`` after an int8 layer computing ``h`` into that layer's native call
(:func:`_fold_add_layer_norm`; BERT's two "add & norm" per block), within float rounding of torch's
``add`` and ``layer_norm``; every other LayerNorm with stored parameters (a BERT's embeddings
LayerNorm; all of a dense graph's) runs on the same native kernel alone (:func:`_native_layer_norm`,
``pyserve._C.layer_norm``). A sentence-transformers mean pooling + L2 normalisation at the graph's
end (12 nodes) becomes one native node (:func:`_fuse_mean_pool`, ``pyserve._C.mean_pool_normalize``;
within float rounding), and
(``mask=True``) transformers' construction of the additive attention mask from the key mask input
(~20 nodes: aranges, unsqueezes, an index, ``and``s, metadata asserts, ``where``) one NumPy
``where`` whose ``[B, 1, S, S]`` result is a stride-0 view over the query rows
(:func:`_fuse_additive_mask`; the same values, checked against the exported ops at load;
MiniLM 3 layers at sequence 128: ~0.35 ms a call, one thread).

Per-call Python cost outside the nodes, cut at load (the same outputs): the ``get_attr`` nodes the
rewrites left without users (the replaced fp32 weights, fetched and dropped at every call) are
erased, and torch.export's input check (a forward pre-hook that matches every input dimension
against the export's symbolic ranges with sympy: ~0.6 ms per call, 4-5% of a 3-layer MiniLM call
at sequence 128) is memoized by the inputs' shapes, dtypes and types (:func:`_memoize_input_check`):
a shape seen before is not checked again; a new one is checked, with torch's own errors.
"""

from __future__ import annotations

import functools
import time

import numpy as np

__all__ = ["KERNELS", "embedding_vocab", "input_checker", "native_module"]

KERNELS = ("auto", "dense", "int8", "csr", "codebook")


def _flat(x):
    return x.reshape(-1, x.shape[-1]).contiguous()


def _int8_fn(x, w_int8, w_scale, bias):
    from pyserve.ops import int8_linear

    y = int8_linear(_flat(x).float(), w_int8, w_scale, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _int8_packed_layer(values, w_scale, bias, activation: str = "none", norm=None):
    """``fn(x)``: :func:`pyserve.ops.int8_linear` of one int8 layer, bound to its weights at load.

    ``values`` (int8 ``[N, K]`` torch tensor, pinned: packed once by ``_pin_packed``), ``w_scale``
    (float32 ``[N]``) and ``bias`` (float32 ``[N]`` or None) are turned into what the native op takes
    once, here — the packed weights and numpy views of the scale and bias — so a call converts only
    ``x`` (``[..., K]`` float32 -> ``[rows, K]`` numpy view, no copy when contiguous) and its output
    (``torch.from_numpy``, no copy): about 25 us less per call than :func:`_int8_fn`'s checks and
    conversions of all four arguments (README, "BERT on CPUs"). Same result bit for bit.
    ``activation="gelu"``: the layer's output goes through GELU inside the native call
    (``pyserve._C.int8_linear_packed(..., activation="gelu")``; within ~2e-6 of torch's exact-erf
    ``gelu``, not bit-identical); :func:`_fold_gelu` makes such layers.
    ``norm=(weight, bias, eps)`` (float32 ``[N]`` tensors and a float): ``fn(x, residual)`` returns
    ``layer_norm(linear(x) + residual, [N], weight, bias, eps)`` from the same native call (the add &
    LayerNorm epilogue, within float rounding of torch's; :func:`_fold_add_layer_norm` makes such
    layers); a residual of another shape or kind takes torch's add and layer_norm instead."""
    import torch

    from pyserve import _C
    from pyserve.ops import int8_linear
    from pyserve.ops.quant import _cached_pack

    packed = _cached_pack(values)
    scale_np = w_scale.detach().contiguous().numpy()
    bias_np = None if bias is None else bias.detach().contiguous().numpy()

    # int8_linear's own argument handling (isinstance checks, numpy views of all four arguments)
    # cost 1-4 us a call; the weights, scale and bias are fixed here, so a call hands the activation
    # straight to the native op, which still checks every shape and dtype.
    native = _C.int8_linear_packed

    def int8_linear_packed(x):
        if x.is_cuda:  # the packed weights are CPU-only: int8_linear raises its own error
            return int8_linear(x, packed, scale_np, bias_np)
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or rows.requires_grad or not rows.is_contiguous():
            rows = rows.detach().float().contiguous()
        y = torch.from_numpy(native(rows.numpy(), packed, scale_np, bias_np, activation))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    fn = int8_linear_packed
    suffix = "" if activation == "none" else f"_{activation}"
    if norm is not None:
        n_weight, n_bias, eps = norm
        g_np = n_weight.detach().float().contiguous().numpy()
        b_np = n_bias.detach().float().contiguous().numpy()
        eps = float(eps)
        N = int(values.shape[0])

        def int8_linear_packed_add_norm(x, residual):
            if (x.is_cuda or not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32
                    or residual.is_cuda or residual.requires_grad or tuple(residual.shape) != (*x.shape[:-1], N)):
                y = int8_linear_packed(x) + residual
                return torch.nn.functional.layer_norm(y, [N], n_weight, n_bias, eps)
            rows = x.reshape(-1, x.shape[-1])
            if rows.dtype != torch.float32 or rows.requires_grad or not rows.is_contiguous():
                rows = rows.detach().float().contiguous()
            res = residual.reshape(-1, N).contiguous()
            y = torch.from_numpy(native(rows.numpy(), packed, scale_np, bias_np, activation, res.numpy(), g_np, b_np,
                                        eps))
            return y.reshape(*x.shape[:-1], N)

        fn = int8_linear_packed_add_norm
        suffix += "_add_norm"
    fn.__module__ = __name__
    fn.__name__ = fn.__qualname__ = f"int8_linear_packed{suffix}"
    fn._pyserve_int8 = (values, w_scale, bias, activation, norm)  # what it is bound to
    return fn


def _csr_fn(x, indptr, indices, values, bias):
    from pyserve.ops import csr_linear

    y = csr_linear(_flat(x).float(), indptr, indices, values, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _codebook_fn(bits):
    def fn(x, packed, codebook, bias):
        from pyserve.ops import codebook_linear

        y = codebook_linear(_flat(x).float(), packed, codebook, bits, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    fn.__name__ = f"codebook{bits}_linear"
    return fn


def _candidates(name: str, weight, meta: dict, int8_parts) -> dict:
    """kernel -> (function, extra tensors) for one 2-D weight."""
    import torch

    out = {}
    if int8_parts is not None and int8_parts.values.ndim == 2:
        from pyserve.ops.quant import _pin_packed

        values = torch.from_numpy(int8_parts.values)
        _pin_packed(values)  # owned by this module, never written: int8_linear takes the packed kernel
        out["int8"] = (_int8_fn, [values, torch.from_numpy(int8_parts.scale)])
    if meta.get("encoding") == "sparse":
        w = weight.detach().numpy()
        nz = w != 0
        indptr = np.concatenate([[0], np.cumsum(nz.sum(1))]).astype(np.int64)
        indices = np.nonzero(nz)[1].astype(np.int64)
        from pyserve.ops.sparse import _pin_csr

        csr = [torch.from_numpy(indptr), torch.from_numpy(indices),
               torch.from_numpy(np.ascontiguousarray(w[nz], dtype=np.float32))]
        _pin_csr(*csr, w.shape[1])  # owned by this module, never written: csr_linear takes the packed kernel
        out["csr"] = (_csr_fn, csr)
        if meta.get("values") == "codebook":
            from pyserve.ops import pack_indices

            values = np.unique(np.concatenate([[0.0], w.ravel()]).astype(np.float32))
            values = np.concatenate([[0.0], values[values != 0]]).astype(np.float32)  # entry 0 is 0.0
            bits = max(2, int(np.ceil(np.log2(max(values.size, 2)))))
            if bits <= 8:
                codebook = np.zeros(1 << bits, np.float32)
                codebook[:values.size] = values
                order = np.argsort(values)
                idx = order[np.searchsorted(values[order], w)].astype(np.uint8)
                if np.array_equal(codebook[idx], w):
                    out["codebook"] = (_codebook_fn(bits), [torch.from_numpy(pack_indices(idx, bits)),
                                                            torch.from_numpy(codebook)])
    return out


def _best_times(fns: dict, repeats: int) -> dict:
    """Per name, the fastest of ``repeats`` timed calls of ``fns[name]()``; the candidates run
    interleaved (one call of each per round) so a burst of load elsewhere hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _before(graph, a, b) -> bool:
    """True when node ``a`` comes before node ``b`` in ``graph`` (False for ``a is b``)."""
    for n in graph.nodes:
        if n is b:
            return False
        if n is a:
            return True
    return False


def _epilogue_of(gm, node, N: int, fold_norm: bool, fold_gelu: bool):
    """What :func:`_fold_gelu` or :func:`_fold_add_layer_norm` folds into an int8 layer at ``node``
    (with ``N`` outputs; an ``aten.linear`` while the kernels are measured, the bound layer when
    folding): ``("gelu",)`` when an exact GELU is its only reader, ``("norm", weight, bias, eps)``
    when its only reader is an add whose only reader is a LayerNorm over ``[N]`` with module tensors
    as weight and bias and whose other operand is computed before ``node`` (the folded layer reads
    it), else None. The folds and the load-time measurement both decide by it."""
    import torch

    aten = torch.ops.aten
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function":
        return None
    if fold_gelu and user.target is aten.gelu.default and len(user.args) == 1 \
            and user.kwargs.get("approximate", "none") == "none":
        return ("gelu",)
    if not fold_norm or user.target is not aten.add.Tensor or user.kwargs or len(user.args) != 2 \
            or len(user.users) != 1:
        return None
    residual = user.args[1] if user.args[0] is node else user.args[0]
    ln = next(iter(user.users))
    if not isinstance(residual, torch.fx.Node) or not _before(gm.graph, residual, node) or ln.op != "call_function" \
            or ln.target is not aten.layer_norm.default or ln.kwargs or len(ln.args) < 4 or ln.args[0] is not user:
        return None
    shape, w_node, b_node = ln.args[1:4]
    eps = ln.args[4] if len(ln.args) > 4 else 1e-5
    if list(shape) != [N] or not isinstance(eps, float) or getattr(w_node, "op", None) != "get_attr" \
            or getattr(b_node, "op", None) != "get_attr":
        return None
    weight, nbias = getattr_path(gm, w_node.target).detach(), getattr_path(gm, b_node.target).detach()
    if tuple(weight.shape) != (N,) or tuple(nbias.shape) != (N,):
        return None
    return ("norm", weight, nbias, eps)


def _measure_candidates(gm, node, weight, bias, cands: dict, sample_rows, repeats: int, gen, fold_norm: bool,
                        fold_gelu: bool) -> dict:
    """Seconds per kernel (``dense`` and each of ``cands``) for the layer at ``node``: the best of
    ``repeats`` interleaved calls, summed over ``sample_rows``. Each kernel is timed as it would run:
    an int8 layer through its bound packed call (:func:`_int8_packed_layer`, not :func:`_int8_fn`'s
    per-call argument handling, ~25-50 us more), and together with the GELU or add & LayerNorm that
    follows the layer — folded into the native call for int8 (:func:`_epilogue_of`), torch's ops
    after the others. Measured per layer alone, a CPU whose int8 GEMMs are no faster than its fp32
    ones (Zen 1: one integer-multiply pipe) kept 21 of MiniLM's 36 layers dense, and the whole model
    ran 10% slower than with all int8 (README, "BERT on CPUs")."""
    import torch

    F = torch.nn.functional
    N, K = weight.shape
    epi = _epilogue_of(gm, node, N, fold_norm, fold_gelu)

    def then(fn):  # fn(x) -> [rows, N]; the epilogue in torch
        if epi is None:
            return lambda x, r: fn(x)
        if epi[0] == "gelu":
            return lambda x, r: F.gelu(fn(x))
        _, nw, nb, eps = epi
        return lambda x, r: F.layer_norm(fn(x) + r, [N], nw, nb, eps)

    def without_residual(layer):
        return lambda x, r: layer(x)

    def stored(fn, extra):
        return lambda x: fn(x, *extra, bias)

    runners = {"dense": then(lambda x: F.linear(x, weight, bias))}
    for k, (fn, extra) in cands.items():
        if k == "int8" and _cached_pack_of(extra[0]) is not None:
            gelu = epi is not None and epi[0] == "gelu"
            norm = epi[1:] if epi is not None and epi[0] == "norm" else None
            layer = _int8_packed_layer(extra[0], extra[1], bias, activation="gelu" if gelu else "none", norm=norm)
            runners[k] = layer if norm is not None else without_residual(layer)
        else:
            runners[k] = then(stored(fn, extra))
    timings = {k: 0.0 for k in runners}
    with torch.inference_mode():
        for rows in sample_rows:
            x = torch.randn(rows, K, generator=gen)
            r = torch.randn(rows, N, generator=gen) if epi is not None and epi[0] == "norm" else None
            fns = {k: functools.partial(run, x, r) for k, run in runners.items()}
            for k, t in _best_times(fns, repeats).items():
                timings[k] += t
    return timings


#: How much slower int8 may measure than the fastest other kernel and still be chosen (a fraction).
INT8_MARGIN = 0.10


def _choose(timings: dict) -> str:
    """The kernel to run from ``{kernel: seconds}``: the fastest, except that an int8 layer stays int8
    unless another kernel is more than :data:`INT8_MARGIN` faster. int8 is the only candidate whose
    results differ from the stored weights' beyond float rounding (activations quantized per row),
    so a near tie decided by timing noise would give replicas of one artifact different outputs
    from load to load; and int8 is what the user compressed to."""
    best = min(timings, key=timings.get)
    if best != "int8" and "int8" in timings and timings["int8"] <= timings[best] * (1 + INT8_MARGIN):
        return "int8"
    return best


def _fuse_shared_input(gm, art, extra_int8: dict, extra_meta: dict) -> dict[str, list[str]]:
    """Merge ``aten.linear`` nodes that share their input (module docstring, ``fuse``); returns
    ``{fused weight name: [original weight names]}``."""
    import torch

    from pyserve.artifact.encoding import Int8Parts

    graph = gm.graph
    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default or node.kwargs:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x_node, w_node, b_node = args[:3]
        if getattr(w_node, "op", None) != "get_attr" or (b_node is not None and getattr(b_node, "op", None) != "get_attr"):
            continue
        groups.setdefault(x_node, []).append(node)
    fused: dict[str, list[str]] = {}
    for x_node, nodes in groups.items():
        if len(nodes) < 2:
            continue
        wnames = [n.args[1].target for n in nodes]
        weights = [getattr_path(gm, w).detach() for w in wnames]
        if any(w.dim() != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
            continue
        encs = [art.manifest.tensors.get(w, {}).get("encoding", "raw") for w in wnames]
        parts = [art.int8.get(w) for w in wnames]
        if set(encs) == {"int8"} and all(p is not None and p.values.ndim == 2 for p in parts):
            kind = "int8"
        elif set(encs) == {"raw"}:
            kind = "raw"
        else:
            continue
        has_bias = [len(n.args) > 2 and n.args[2] is not None for n in nodes]
        if len(set(has_bias)) != 1:
            continue
        name = f"_pyserve_fused{len(fused)}"
        gm.register_buffer(f"{name}_w", torch.cat(weights, 0).contiguous())
        bias_name = None
        if has_bias[0]:
            bias_name = f"{name}_b"
            gm.register_buffer(bias_name, torch.cat([getattr_path(gm, n.args[2].target).detach() for n in nodes], 0))
        if kind == "int8":
            scales = [p.input_scale for p in parts]
            extra_int8[f"{name}_w"] = Int8Parts(np.concatenate([p.values for p in parts], 0),
                                                np.concatenate([p.scale for p in parts], 0),
                                                scales[0] if len(set(scales)) == 1 else None)
        extra_meta[f"{name}_w"] = {"encoding": kind}
        first = min(nodes, key=lambda n: list(graph.nodes).index(n))
        with graph.inserting_before(first):
            w_get = graph.get_attr(f"{name}_w")
            b_get = graph.get_attr(bias_name) if bias_name else None
            fused_node = graph.call_function(torch.ops.aten.linear.default, (x_node, w_get, b_get))
            start = 0
            for n, w in zip(nodes, weights):
                end = start + w.shape[0]
                part = graph.call_function(torch.ops.aten.slice.Tensor, (fused_node, -1, start, end))
                n.replace_all_uses_with(part)
                start = end
        for n in nodes:
            graph.erase_node(n)
        fused[f"{name}_w"] = wnames
    if fused:
        graph.eliminate_dead_code()
        _drop_unused_attrs(gm, [w for ws in fused.values() for w in ws])
        gm.recompile()
    return fused


def _drop_unused_attrs(gm, names) -> None:
    """Delete the tensors ``names`` from ``gm`` when no ``get_attr`` node reads them any more (the
    weights a fused layer replaced), so they are not held twice."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names:
        if name in used:
            continue
        parent, _, attr = name.rpartition(".")
        try:
            owner = gm.get_submodule(parent) if parent else gm
            delattr(owner, attr)
        except AttributeError:
            pass


def _sdpa(q, k, v, mask, scale):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _only_user(node) -> bool:
    """True when ``node``'s value is used by exactly one node (so a rewrite may consume it)."""
    return len(node.users) == 1


def _fuse_attention(gm) -> int:
    """Replace ``matmul(softmax(matmul(q, k^T) * scale + mask, -1) [-> dropout(p, False)], v)`` by
    :func:`_sdpa`; returns how many were replaced. Patterns that differ in any node are left alone."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph
    count = 0

    for sm in list(graph.nodes):
        if sm.op != "call_function" or sm.target is not aten.softmax.int or len(sm.args) < 2 or sm.args[1] not in (-1, 3):
            continue
        if (len(sm.args) > 2 and sm.args[2]) or sm.kwargs:
            continue  # half_to_float
        add = sm.args[0]
        if getattr(add, "target", None) is not aten.add.Tensor or not _only_user(add) or len(add.args) != 2:
            continue
        mul, mask = add.args
        if getattr(mul, "target", None) is not aten.mul.Tensor or not _only_user(mul):
            continue
        scores, scale = mul.args
        if not isinstance(scale, float) or getattr(scores, "target", None) is not aten.matmul.default \
                or not _only_user(scores):
            continue
        q, kt = scores.args
        if getattr(kt, "target", None) is not aten.transpose.int or not _only_user(kt) \
                or sorted(d % 4 for d in kt.args[1:3]) != [2, 3]:
            continue
        k = kt.args[0]
        out = next(iter(sm.users)) if _only_user(sm) else None
        drop = None
        if getattr(out, "target", None) is aten.dropout.default:
            if len(out.args) < 3 or out.args[2] is not False or not _only_user(out):
                continue
            drop, out = out, next(iter(out.users))
        if getattr(out, "target", None) is not aten.matmul.default or out.args[0] is not (drop or sm):
            continue
        v = out.args[1]
        if not isinstance(mask, torch.fx.Node):
            continue
        with graph.inserting_before(out):
            new = graph.call_function(_sdpa, (q, k, v, mask, scale))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in (out, drop, sm, add, mul, scores, kt):
            if n is not None and not n.users:
                graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _attention_qkv(qkv, mask, heads: int, head_size: int, scale: float, precision: str = "fp32"):
    """``[B, S, E]`` attention of the fused projection ``qkv`` (``[B, S, 3 E]``: Q, K, V side by side)
    under the additive ``mask`` (``[B, 1, S or 1, S]``): :func:`pyserve.ops.attention_qkv`'s native
    kernel, called with the least conversion (checks of attributes only; the mask sliced as a numpy
    view: ~5 us a call instead of ~20 through torch indexing); anything it does not take (a CUDA or
    non-float32 tensor, gradients, another mask shape, a width other than ``3 * heads * head_size``)
    runs the graph's original ops instead (views, :func:`_sdpa`, transpose, reshape)."""
    import torch

    E = heads * head_size
    if (type(mask) is torch.Tensor and qkv.dtype == torch.float32 and mask.dtype == torch.float32
            and not qkv.is_cuda and not mask.is_cuda and not qkv.requires_grad and not mask.requires_grad):
        out = _attention_qkv_np(qkv.numpy(), mask.numpy(), heads, E, scale, precision)
        if out is not None:
            return torch.from_numpy(out)
    B, S = qkv.shape[0], qkv.shape[1]
    q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(B, S, heads, head_size).transpose(1, 2) for i in range(3))
    return _sdpa(q, k, v, mask, scale).transpose(1, 2).reshape(B, S, E)


def _attention_qkv_np(qkv: np.ndarray, mask: np.ndarray, heads: int, E: int, scale: float, precision: str):
    """The native kernel on NumPy arrays (float32 ``qkv`` ``[B, S, 3 E]``, ``mask`` ``[B or 1, 1, S or 1,
    S]``; the mask sliced as a view, one row of an expanded key mask), or None when they do not have
    those shapes and dtypes. :func:`_attention_qkv` and the plan's attention step both call it."""
    shape, ms = qkv.shape, mask.shape
    if not (len(shape) == 3 and shape[2] == 3 * E and qkv.dtype == np.float32 and mask.dtype == np.float32
            and len(ms) == 4 and ms[1] == 1 and ms[0] in (1, shape[0]) and ms[2] in (1, shape[1])
            and ms[3] == shape[1]):
        return None
    m = mask[:, 0]
    if m.shape[1] > 1 and m.strides[1] == 0:  # an expanded key mask: one row, not S copies
        m = m[:, :1]
    if not m.flags.c_contiguous:
        m = np.ascontiguousarray(m)
    return _native_attention()(np.ascontiguousarray(qkv), heads, m, scale, precision)


@functools.lru_cache(maxsize=None)
def _native_attention():
    from pyserve import _C

    return _C.attention_qkv


def _fuse_qkv_attention(gm, precision: str = "fp32") -> int:
    """Replace ``slice -> view -> transpose`` of Q, K and V from one fused projection, :func:`_sdpa` on
    them and ``transpose -> contiguous -> reshape`` of its output (13 nodes per layer) by one
    :func:`_attention_qkv` node; returns how many were replaced. Only the exact pattern is rewritten
    (Q, K, V the consecutive thirds ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)`` of the last dim of one node
    that nothing else reads, heads split as ``[B, S, H or -1, D]``, transposed (1, 2))."""
    import torch

    from pyserve import _C

    aten = torch.ops.aten
    graph = gm.graph

    def head_view(t):
        """(slice node, view node, D) of ``transpose(view(slice(src), [b, s, h, D]), 1, 2)`` or None."""
        if getattr(t, "target", None) is not aten.transpose.int or not _only_user(t) \
                or sorted(d % 4 for d in t.args[1:3]) != [1, 2]:
            return None
        view = t.args[0]
        if getattr(view, "target", None) not in (aten.view.default, aten.reshape.default) or not _only_user(view):
            return None
        shape = view.args[1]
        if not isinstance(shape, (list, tuple)) or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] < 1:
            return None
        sl = view.args[0]
        if getattr(sl, "target", None) is not aten.slice.Tensor or not _only_user(sl) or len(sl.args) != 4 \
                or sl.args[1] not in (-1, 2) or sl.kwargs:
            return None
        return sl, view, shape[3], shape[2]

    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _sdpa or len(node.args) != 5:
            continue
        q, k, v, mask, scale = node.args
        parts = [head_view(t) for t in (q, k, v)]
        if any(p is None for p in parts) or not isinstance(scale, float):
            continue
        src = parts[0][0].args[0]
        D = parts[0][2]
        bounds = [(p[0].args[2], p[0].args[3]) for p in parts]
        E = bounds[0][1] - bounds[0][0] if all(isinstance(b, int) for bb in bounds for b in bb) else None
        if (E is None or E <= 0 or E % D or bounds != [(0, E), (E, 2 * E), (2 * E, 3 * E)]
                or any(p[0].args[0] is not src for p in parts) or any(p[2] != D for p in parts)
                or any(p[3] not in (-1, E // D) for p in parts) or set(src.users) != {p[0] for p in parts}
                or not _C.attention_qkv_fast(D)):  # the scalar fallback is slower than torch's SDPA
            continue
        post = next(iter(node.users)) if _only_user(node) else None
        if getattr(post, "target", None) is not aten.transpose.int or not _only_user(post) \
                or sorted(d % 4 for d in post.args[1:3]) != [1, 2]:
            continue
        cont = next(iter(post.users))
        if getattr(cont, "target", None) is not aten.contiguous.default or not _only_user(cont):
            continue
        out = next(iter(cont.users))
        shape = out.args[1] if len(out.args) > 1 else None
        if getattr(out, "target", None) not in (aten.view.default, aten.reshape.default) \
                or not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[2] not in (-1, E):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(_attention_qkv, (src, mask, E // D, D, scale, precision))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in (out, cont, post, node):
            graph.erase_node(n)
        for t, p in zip((q, k, v), parts):
            for n in (t, p[1], p[0]):
                graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _mean_pool_normalize(h, mask, eps_count: float, eps_norm: float):
    """sentence-transformers' mean pooling and L2 normalisation in one node: ``d = sum_s(h * m) /
    max(sum_s(m), eps_count)``, ``d / max(||d||_2, eps_norm)`` with ``m = mask.float()`` (``h``
    ``[B, S, E]`` float32, ``mask`` ``[B, S]``) -> ``[B, E]``. CPU float32 without gradients: the
    native kernel (``pyserve._C.mean_pool_normalize``: fp32 sums in token order; within float rounding
    of the graph's ops; a token whose mask is 0 is skipped, so a NaN there does not reach the
    embedding, where the graph's ``h * m`` would carry it); anything else: the graph's own torch ops."""
    import torch

    if (type(h) is torch.Tensor and type(mask) is torch.Tensor and h.dtype == torch.float32 and h.dim() == 3
            and mask.dim() == 2 and not h.is_cuda and not mask.is_cuda and not h.requires_grad
            and tuple(mask.shape) == tuple(h.shape[:2])):
        return torch.from_numpy(_mean_pool_normalize_np(h.numpy(), mask.numpy(), eps_count, eps_norm))
    f = mask.unsqueeze(-1).to(h.dtype)
    d = (h * f).sum(1) / f.sum(1).clamp_min(eps_count)
    return d / torch.linalg.vector_norm(d, 2.0, [1], True).clamp_min(eps_norm).expand_as(d)


def _mean_pool_normalize_np(h: np.ndarray, mask: np.ndarray, eps_count: float, eps_norm: float) -> np.ndarray:
    """:func:`_mean_pool_normalize`'s native path on NumPy arrays: ``h`` float32 ``[B, S, E]``, ``mask``
    ``[B, S]`` (int64 or float32 as they are, other dtypes as float32)."""
    from pyserve import _C

    if mask.dtype != np.int64 and mask.dtype != np.float32:
        mask = mask.astype(np.float32)
    return _C.mean_pool_normalize(np.ascontiguousarray(h), np.ascontiguousarray(mask), eps_count, eps_norm)


def _fuse_mean_pool(gm) -> int:
    """Replace the exported mean pooling + L2 normalisation of a sentence-transformers model
    (``unsqueeze(mask, -1)`` [-> ``_assert_tensor_metadata``] -> ``to(float32)`` -> ``mul(h, .)`` ->
    ``sum([1])`` / ``clamp_min(sum([1]), eps)`` -> ``div``, then ``div(d, expand_as(clamp_min(
    linalg_vector_norm(d, 2, [1], True), eps), d))``: 12 nodes, ~0.19 ms on one thread at sequence 128)
    by one :func:`_mean_pool_normalize` node. Only that exact pattern; returns how many."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph

    def is_(node, target):
        return getattr(node, "op", None) == "call_function" and node.target is target

    count = 0
    for out in list(graph.nodes):
        if not is_(out, aten.div.Tensor) or len(out.args) != 2:
            continue
        d, ex = out.args
        if not is_(ex, aten.expand_as.default) or ex.args[1] is not d or len(ex.users) != 1:
            continue
        cm2 = ex.args[0]
        if not is_(cm2, aten.clamp_min.default) or len(cm2.users) != 1 or not isinstance(cm2.args[1], float):
            continue
        vn = cm2.args[0]
        if not is_(vn, aten.linalg_vector_norm.default) or len(vn.users) != 1 or vn.args[0] is not d \
                or tuple(vn.args[1:4]) != (2.0, [1], True) or vn.kwargs:
            continue
        if not is_(d, aten.div.Tensor) or set(d.users) != {out, ex, vn}:
            continue
        s1, cm1 = d.args
        if not is_(cm1, aten.clamp_min.default) or len(cm1.users) != 1 or not isinstance(cm1.args[1], float):
            continue
        s2 = cm1.args[0]
        if not is_(s1, aten.sum.dim_IntList) or not is_(s2, aten.sum.dim_IntList) or list(s1.args[1]) != [1] \
                or list(s2.args[1]) != [1] or len(s1.args) != 2 or len(s2.args) != 2 or s1.kwargs or s2.kwargs \
                or len(s1.users) != 1 or len(s2.users) != 1:
            continue
        mul = s1.args[0]
        if not is_(mul, aten.mul.Tensor) or len(mul.users) != 1:
            continue
        f = s2.args[0]
        h = mul.args[0] if mul.args[1] is f else (mul.args[1] if mul.args[0] is f else None)
        if h is None or not is_(f, aten.to.dtype) or f.args[1:] != (torch.float32,) or f.kwargs \
                or set(f.users) != {mul, s2}:
            continue
        un = f.args[0]
        if not is_(un, aten.unsqueeze.default) or un.args[1] not in (-1, 2):
            continue
        asserts = [u for u in un.users if u is not f]
        if any(not is_(u, aten._assert_tensor_metadata.default) or u.users for u in asserts):
            continue
        mask = un.args[0]
        with graph.inserting_before(out):
            new = graph.call_function(_mean_pool_normalize, (h, mask, cm1.args[1], cm2.args[1]))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in (out, ex, cm2, vn, d, cm1, s1, s2, mul, f, *asserts, un):
            graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _additive_key_mask(mask, fill: float):
    """The additive attention mask of a ``[B, S]`` key mask: ``0`` where ``mask != 0``, ``fill``
    (float32's lowest, transformers' ``finfo.min``) elsewhere, as a float32 ``[B, 1, S, S]`` view
    expanded over the query rows (stride 0; :func:`_attention_qkv` reads one row per batch).
    CPU: one NumPy ``where``; otherwise one torch ``where``."""
    import torch

    B, S = mask.shape
    if type(mask) is torch.Tensor and not mask.is_cuda and not mask.requires_grad:
        add = torch.from_numpy(np.where(mask.numpy() != 0, np.float32(0.0), np.float32(fill)))
    else:
        add = torch.where(mask != 0, torch.zeros((), dtype=torch.float32, device=mask.device),
                          torch.tensor(fill, dtype=torch.float32, device=mask.device))
    return add[:, None, None, :].expand(B, 1, S, S)


_MASK_OPS = frozenset((
    "sym_size.int", "arange.default", "arange.start", "add.Tensor", "sub.Tensor", "mul.Tensor", "slice.Tensor",
    "unsqueeze.default", "new_ones.default", "ones.default", "ge.Scalar", "le.Scalar", "gt.Scalar", "lt.Scalar",
    "ge.Tensor", "le.Tensor", "ne.Scalar", "eq.Scalar", "_assert_tensor_metadata.default", "to.device",
    "to.dtype", "to.dtype_layout", "__and__.Tensor", "bitwise_and.Tensor", "index.Tensor", "expand.default",
    "zeros.default", "full.default", "where.ScalarOther", "where.self", "view.default", "reshape.default",
    "_to_copy.default", "bitwise_not.default", "masked_fill.Scalar", "rsub.Scalar",
))


def _fuse_additive_mask(gm, samples=((1, 1), (1, 6), (2, 5), (3, 9))) -> int:
    """Replace the exported construction of a transformer's additive attention mask from its
    ``[B, S]`` key mask input (transformers' ``_prepare_4d_attention_mask`` / ``sdpa_mask``: aranges,
    unsqueezes, an index, ``and``s, ``_assert_tensor_metadata`` checks, ``where(m, 0, finfo.min)``:
    ~20 nodes, run once per call) by one :func:`_additive_key_mask` node. Conservative: the mask
    node must feed only attention nodes (:func:`_attention_qkv`, :func:`_sdpa`), depend on one
    graph input and on no weight, through known side-effect-free ops only, and the original
    subgraph must give exactly the same values as :func:`_additive_key_mask` on random key masks
    (with padding) of several shapes, run at load; otherwise the graph is left unchanged.
    The ``_assert_tensor_metadata`` checks of the removed intermediates go with them (they check
    tensors the graph itself made; the check on the graph input stays). Returns how many."""
    import torch

    graph = gm.graph
    count = 0
    attn_fns = (_attention_qkv, _sdpa)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.where.ScalarOther,
                                                             torch.ops.aten.where.self):
            continue
        if not node.users or any(u.op != "call_function" or u.target not in attn_fns for u in node.users):
            continue
        # ancestors, in graph order
        sym_size = torch.ops.aten.sym_size.int
        seen, stack, sizes = set(), [node], []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target is sym_size and getattr(n.args[0], "op", None) == "placeholder":
                sizes.append(n)  # a size: the dim of whichever input export read it from (a leaf here)
                continue
            stack.extend(n.all_input_nodes)
        inputs = [n for n in seen if n.op == "placeholder"]
        calls = [n for n in seen if n.op == "call_function"]
        val = inputs[0].meta.get("val") if len(inputs) == 1 else None
        if getattr(val, "dim", lambda: 0)() != 2 or len(seen) != len(inputs) + len(calls) \
                or any(f"{getattr(n.target, '__name__', n.target)}" not in _MASK_OPS for n in calls):
            continue
        src = inputs[0]
        # a size read from another input (export keeps one of the equal symbols): the key mask's dim
        # with the same symbol, or no rewrite
        dims = {}
        for n in sizes:
            if n.args[0] is src:
                continue
            same = [d for d in range(2) if str(val.shape[d]) == str(n.meta.get("val", object()))]
            if not same:
                break
            dims[n] = same[0]
        if len(dims) != sum(1 for n in sizes if n.args[0] is not src):
            continue
        order = [n for n in graph.nodes if n in seen]
        sub = torch.fx.Graph()
        env = {}
        for n in order:
            if n in dims:
                env[n] = sub.call_function(sym_size, (env[src], dims[n]))
            else:
                env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(env[node])
        fill = node.args[2] if node.target is torch.ops.aten.where.ScalarOther else None
        if not isinstance(fill, float):
            continue
        try:
            fn = torch.fx.GraphModule(torch.nn.Module(), sub)
            gen = torch.Generator().manual_seed(0)
            dtype = src.meta["val"].dtype
            ok = True
            with torch.inference_mode():
                for B, S in samples:
                    m = (torch.rand(B, S, generator=gen) < 0.7).to(dtype)
                    m[:, 0] = 1
                    for mm in (m, torch.ones(B, S, dtype=dtype)):
                        ref = fn(mm)
                        got = _additive_key_mask(mm, fill)
                        if ref.dtype != got.dtype or ref.shape != got.shape or not torch.equal(ref, got):
                            ok = False
        except Exception:  # a subgraph that does not run on its own: leave the graph as it is
            ok = False
        if not ok:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(_additive_key_mask, (src, fill))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        aten_assert = torch.ops.aten._assert_tensor_metadata.default
        for n in reversed(order):
            if n.op != "call_function":
                continue
            for u in list(n.users):
                if u.op == "call_function" and u.target is aten_assert and not u.users:
                    graph.erase_node(u)
            if not n.users:
                graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _drop_inactive_dropout(gm) -> int:
    """Remove ``aten.dropout(x, p, train=False)`` nodes (the identity: ATen returns ``x`` itself),
    which an exported eval-mode transformer keeps after every block's sublayers; returns how many."""
    import torch

    count = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target is torch.ops.aten.dropout.default and len(node.args) == 3
                and node.args[2] is False and not node.kwargs and isinstance(node.args[0], torch.fx.Node)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.recompile()
    return count


def native_module(art, *, kernels: str = "auto", sample_rows=(1, 128), repeats: int = 5, fuse: bool = True,
                  attention: bool | str = True, fold_norm: bool = True, pool: bool = True, mask: bool = True):
    """The artifact's module with its Linear layers on the chosen kernels.

    Parameters
    ----------
    art : :class:`pyserve.artifact.LoadedArtifact`
    kernels : ``auto`` (fastest per layer, measured; int8 kept within :data:`INT8_MARGIN`), ``dense``
        (unchanged graph), or one of
        ``int8``, ``csr``, ``codebook`` (used wherever a layer's stored form allows it).
    sample_rows : activation row counts (batch x tokens) the measurement uses.
    repeats : timed runs per kernel and row count (the fastest counts).
    fuse : merge Linear layers that share their input (Q, K, V) into one first, run eager
        attention as one scaled_dot_product_attention, drop inactive dropout nodes, and fold a
        GELU that only reads an int8 layer's output into that layer's native call (module
        docstring).
    attention : with ``fuse``, run the attention of a fused Q|K|V projection as one native
        :func:`pyserve.ops.attention_qkv` call (:func:`_fuse_qkv_attention`: no head views,
        transposes and copies; within float rounding of torch's SDPA, not bit-identical).
        ``"bf16"``: the same call with ``precision="bf16"`` (bfloat16 products summed in fp32 on
        CPUs with AVX-512 BF16, fp32 elsewhere; :func:`pyserve.ops.attention_qkv`); ``True`` or
        ``"fp32"``: fp32. ``False`` keeps torch's ``scaled_dot_product_attention``.
    fold_norm : with ``fuse``, fold ``layer_norm(int8 layer + residual)`` into the layer's native
        call (:func:`_fold_add_layer_norm`; within float rounding of torch's ``layer_norm``), and
        run every other LayerNorm with stored parameters (the embeddings') on the same native
        kernel (:func:`_native_layer_norm`).
    pool : with ``fuse``, run a sentence-transformers mean pooling + L2 normalisation as one native
        node (:func:`_fuse_mean_pool`, ``pyserve._C.mean_pool_normalize``; within float rounding).
    mask : with ``fuse``, build the additive attention mask from the key mask input in one node
        (:func:`_fuse_additive_mask`; the same values, checked at load) instead of the exported
        ~20 small ops.

    Returns
    -------
    (module, choices) : the rewritten ``torch.fx.GraphModule`` (the same object as ``art.module``,
        changed in place) and ``{weight tensor name: kernel}`` for every rewritten-or-kept Linear
        (a fused layer's kernel is reported under each of its original weights' names).

    Raises
    ------
    ValueError
        ``kernels`` not one of :data:`KERNELS`; ``attention`` not a bool, ``"fp32"`` or ``"bf16"``.
    """
    import torch

    if kernels not in KERNELS:
        raise ValueError(f"native_module: argument 'kernels': expected one of {KERNELS}, got {kernels!r}")
    if attention not in (True, False, "fp32", "bf16") or (attention in (0, 1) and not isinstance(attention, bool)):
        raise ValueError(f"native_module: argument 'attention': expected True, False, 'fp32' or 'bf16', "
                         f"got {attention!r}")
    gm = art.module
    choices: dict[str, str] = {}
    extra_int8: dict = {}
    extra_meta: dict = {}
    fused = _fuse_shared_input(gm, art, extra_int8, extra_meta) if fuse else {}
    if fuse:
        _fuse_attention(gm)
        _drop_inactive_dropout(gm)
        if attention:
            _fuse_qkv_attention(gm, "bf16" if attention == "bf16" else "fp32")
        if pool:
            _fuse_mean_pool(gm)
        if mask:
            _fuse_additive_mask(gm)
    if kernels == "dense":
        for fname, originals in fused.items():
            choices.update({w: "dense" for w in originals})
        if fuse and fold_norm:
            _native_layer_norm(gm)
            _erase_unused_get_attr(gm.graph)
            gm.recompile()
        gm.pyserve_kernel_timings = {}
        return gm, choices
    graph = gm.graph
    gen = torch.Generator().manual_seed(0)
    counter = 0
    timing_log: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x_node, w_node, b_node = args[:3]
        if getattr(w_node, "op", None) != "get_attr":
            continue
        wname = w_node.target
        weight = getattr_path(gm, wname).detach()
        if weight.dim() != 2:
            continue
        meta = extra_meta.get(wname) or art.manifest.tensors.get(wname, {})
        cands = _candidates(wname, weight, meta, extra_int8.get(wname) or art.int8.get(wname))
        if kernels != "auto":
            cands = {k: v for k, v in cands.items() if k == kernels}
        if not cands:
            choices[wname] = "dense"
            continue
        bias = None
        if b_node is not None:
            if getattr(b_node, "op", None) != "get_attr":
                continue
            bias = getattr_path(gm, b_node.target).detach().contiguous()
        chosen = next(iter(cands))
        if kernels == "auto":
            timings = _measure_candidates(gm, node, weight, bias, cands, sample_rows, repeats, gen,
                                          fuse and fold_norm, fuse)
            timing_log[wname] = timings
            chosen = _choose(timings)
            if chosen == "dense":
                choices[wname] = "dense"
                continue
        fn, extra = cands[chosen]
        names = []
        for t in extra + ([bias] if bias is not None else []):
            attr = f"_pyserve_k{counter}"
            counter += 1
            gm.register_buffer(attr, t)
            names.append(attr)
        layer = None
        if chosen == "int8" and _cached_pack_of(extra[0]) is not None:
            # the weights stay buffers of the module (state, memory accounting); the call binds them
            layer = _int8_packed_layer(extra[0], extra[1], bias)
        with graph.inserting_before(node):
            if layer is not None:
                new = graph.call_function(layer, (x_node,))
            else:
                getters = [graph.get_attr(a) for a in names]
                if bias is None:
                    getters.append(None)
                new = graph.call_function(fn, (x_node, *getters))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        choices[wname] = chosen
    if fuse:
        _fold_gelu(gm)
        if fold_norm:
            _fold_add_layer_norm(gm)
            _native_layer_norm(gm)
    _erase_unused_get_attr(graph)
    gm.recompile()
    gm.pyserve_kernel_timings = timing_log  # {weight name: {kernel: seconds}} of the kernels="auto" choice
    _memoize_input_check(gm)
    for fname, originals in fused.items():
        kernel = choices.pop(fname, "dense")
        choices.update({w: kernel for w in originals})
    return gm, choices


def _bound_int8_layers(graph) -> list:
    """The graph's int8 layer nodes bound at load (:func:`_int8_packed_layer`) with no add & LayerNorm
    folded in yet: ``[(node, (values, w_scale, bias, activation, norm))]`` in graph order."""
    out = []
    for node in graph.nodes:
        bound = getattr(getattr(node, "target", None), "_pyserve_int8", None)
        if node.op == "call_function" and bound is not None and bound[4] is None:
            out.append((node, bound))
    return out


def _fold_gelu(gm) -> int:
    """Fold ``aten.gelu(h)`` (exact erf form) into the bound int8 layer that computes ``h`` when the
    GELU is that layer's only reader (:func:`_epilogue_of`): one native call (``activation="gelu"``)
    instead of a second pass of torch's ``gelu`` over ``[rows, N]`` (BERT's FFN input layer: 0.2 ->
    0.09 ms at 128 x 1536 on one thread, 2026-11-30). Returns how many were folded."""
    graph = gm.graph
    folded = 0
    for src, (values, w_scale, bias, activation, _) in _bound_int8_layers(graph):
        if activation != "none" or _epilogue_of(gm, src, int(values.shape[0]), False, True) is None:
            continue
        gelu = next(iter(src.users))
        src.target = _int8_packed_layer(values, w_scale, bias, activation="gelu")
        gelu.replace_all_uses_with(src)
        graph.erase_node(gelu)
        folded += 1
    return folded


def _fold_add_layer_norm(gm) -> int:
    """Fold ``layer_norm(add(h, r), [N], weight, bias, eps)`` into the bound int8 layer computing ``h``
    when the add is that layer's only reader, the LayerNorm the add's and ``r`` is computed before
    the layer (:func:`_epilogue_of`; BERT's "add & norm" after the attention output and the FFN
    output layers): one native call (the add & LayerNorm epilogue, :func:`_int8_packed_layer` with
    ``norm``) instead of the layer, torch's ``add`` and torch's ``layer_norm`` — two fewer nodes and
    two fewer passes over ``[rows, N]``. ``weight`` and ``bias`` must be tensors of the module
    (``get_attr``). Returns how many were folded."""
    graph = gm.graph
    folded = 0
    for src, (values, w_scale, bias, activation, _) in _bound_int8_layers(graph):
        epi = _epilogue_of(gm, src, int(values.shape[0]), True, False)
        if epi is None:
            continue
        add = next(iter(src.users))
        ln = next(iter(add.users))
        residual = add.args[1] if add.args[0] is src else add.args[0]
        src.target = _int8_packed_layer(values, w_scale, bias, activation, norm=epi[1:])
        src.args = (src.args[0], residual)
        ln.replace_all_uses_with(src)
        graph.erase_node(ln)
        graph.erase_node(add)
        folded += 1
    return folded


def _layer_norm_layer(weight, bias, eps: float):
    """``fn(x)``: ``layer_norm(x, [N], weight, bias, eps)`` bound to the module's ``weight`` and ``bias``
    (float32 ``[N]`` tensors): the native kernel (``pyserve._C.layer_norm``, the int8 layers' add &
    LayerNorm epilogue alone; within float rounding of torch's, not bit-identical) on a CPU float32
    tensor without gradients, torch's ``layer_norm`` otherwise. :func:`_native_layer_norm` makes
    such nodes."""
    import torch

    from pyserve import _C

    N = int(weight.shape[0])
    w_np = weight.detach().float().contiguous().numpy()
    b_np = bias.detach().float().contiguous().numpy()
    eps = float(eps)
    native = _C.layer_norm

    def layer_norm(x):
        if (type(x) is torch.Tensor and x.dtype == torch.float32 and not x.is_cuda and not x.requires_grad
                and x.dim() >= 1 and x.shape[-1] == N):
            return torch.from_numpy(native((x if x.is_contiguous() else x.contiguous()).numpy(), w_np, b_np, eps))
        return torch.nn.functional.layer_norm(x, [N], weight, bias, eps)

    layer_norm.__module__ = __name__
    layer_norm._pyserve_layer_norm = (w_np, b_np, eps)  # what it is bound to
    return layer_norm


def _native_layer_norm(gm) -> int:
    """Put each remaining ``layer_norm(x, [N], weight, bias, eps)`` with stored float32 ``[N]``
    parameters (``get_attr``) on the native kernel (:func:`_layer_norm_layer`): a BERT's embeddings
    LayerNorm, and every LayerNorm of a graph on dense kernels. torch's op cost ~20 us at MiniLM's
    [128, 384] warm and ~140-170 us on the first call after a forward pass had evicted its dispatch
    code and data from the caches (2026-12-01, Zen 4); the native call is one pybind11 call. Returns
    how many were replaced."""
    import torch

    aten = torch.ops.aten
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.layer_norm.default or node.kwargs:
            continue
        args = list(node.args)
        if len(args) < 4 or len(args[1]) != 1 or not isinstance(args[1][0], int):
            continue
        if any(getattr(a, "op", None) != "get_attr" for a in args[2:4]):
            continue
        weight, bias = (getattr_path(gm, a.target) for a in args[2:4])
        N = args[1][0]
        if any(not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (N,)
               for t in (weight, bias)):
            continue
        eps = float(args[4]) if len(args) > 4 else 1e-5
        node.target = _layer_norm_layer(weight, bias, eps)
        node.args = (args[0],)
        done += 1
    return done


def _erase_unused_get_attr(graph) -> int:
    """Erase ``get_attr`` nodes nothing reads (the fp32 weights of rewritten layers: the generated
    code fetched each through a chain of ``Module.__getattr__`` calls and dropped it, at every
    call). Returns how many went."""
    dead = [n for n in graph.nodes if n.op == "get_attr" and not n.users]
    for n in dead:
        graph.erase_node(n)
    return len(dead)


def _input_key(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_input_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _input_key(v)) for k, v in value.items())))
    hash(value)  # TypeError for anything unhashable: not memoized
    return (type(value).__name__, value)


def input_checker(gm, limit: int = 256):
    """``check(*inputs)`` raising torch.export's own error (RuntimeError, e.g. "Expected input at
    *args[1].shape[1] to be equal to 10, but got 1") when the inputs (NumPy arrays or torch tensors,
    in placeholder order) break the export's shape constraints: each dimension's range and the
    equalities between dimensions of different inputs (a MiniLM's ``input_ids`` and
    ``attention_mask`` share batch and sequence). Memoized by the inputs' shapes and dtypes (a key
    that passed once passes again; ~180 us a new shape, ~2 us a known one), up to ``limit`` keys
    (beyond them a new shape is checked on every call). None for a module without the export's
    check, and where this torch has no ``torch.export._unlift._check_input_constraints_for_module``
    (a private function: the vocabulary check of :func:`embedding_vocab` then stands alone). The server runs its models with that check off (its data plane checks each
    input against the signature, whose ``-1`` dims cannot say that two inputs agree) and runs this
    one instead, so such a request is INVALID_ARGUMENT rather than broadcast silently."""
    import torch

    try:
        from torch.export._unlift import _check_input_constraints_for_module as check_module
    except ImportError:
        return None
    if not hasattr(gm, "_in_spec") or hasattr(gm, "_guards_fn"):
        return None
    passed: set = set()

    def check(*inputs):
        key = tuple((a.shape, a.dtype) for a in inputs)
        if key in passed:
            return
        tensors = [a if isinstance(a, torch.Tensor) else torch.empty(a.shape, dtype=torch.from_numpy(
            np.empty(0, a.dtype)).dtype, device="meta") for a in inputs]
        check_module(gm, tuple(tensors), {})
        if len(passed) < limit:
            passed.add(key)

    return check


def embedding_vocab(gm) -> dict[int, int]:
    """``{input position: rows}`` for each graph input used directly as the indices of an
    ``embedding`` of a stored table (a transformer's token ids): an id outside ``[0, rows)`` is the
    request's error, which the server reports as INVALID_ARGUMENT before running the model."""
    import torch

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default or len(node.args) < 2:
            continue
        table, ids = node.args[0], node.args[1]
        if ids in placeholders and getattr(table, "op", None) == "get_attr":
            rows = int(getattr_path(gm, table.target).shape[0])
            i = placeholders.index(ids)
            out[i] = min(rows, out.get(i, rows))
    return out


def _memoize_input_check(gm, limit: int = 256) -> bool:
    """Memoize torch.export's input check (``_check_input_constraints_pre_hook``) of ``gm`` by the
    inputs' shapes, dtypes, devices and Python types: the check depends on nothing else (dimension
    ranges and equalities, ranks, input count and structure), so a key that passed once passes
    again; a new key runs the real check (its errors unchanged) and is remembered when it passes,
    up to ``limit`` keys. Returns whether a hook was found and wrapped."""
    try:
        from torch.export._unlift import _check_input_constraints_pre_hook as original
    except ImportError:  # another torch layout: leave the module as it is
        return False
    hooks = getattr(gm, "_forward_pre_hooks", {})
    for hook_id, hook in list(hooks.items()):
        if hook is not original:
            continue
        passed: set = set()

        def check(module, args, kwargs, _hook=hook, _passed=passed):
            try:
                key = (_input_key(args), _input_key(kwargs))
            except TypeError:
                return _hook(module, args, kwargs)
            if key in _passed:
                return None
            result = _hook(module, args, kwargs)
            if len(_passed) < limit:
                _passed.add(key)
            return result

        hooks[hook_id] = check
        return True
    return False


def _cached_pack_of(values):
    from pyserve.ops.quant import _cached_pack

    return _cached_pack(values)


def getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
