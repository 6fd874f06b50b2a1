"""A straight-line NumPy plan for feed-forward and transformer graphs: the artifact's graph without
torch's per-call machinery.

For a model as small as LeNet-300-100 (266k multiply-adds at batch 1), most of a call through the
rebuilt ``torch.fx.GraphModule`` is not arithmetic: pytree flattening of the arguments, ``Module``
attribute lookups and one aten dispatch per node cost ~100 µs, the three matrix products ~25 µs
(docs/performance.md, "The model's share is mostly not arithmetic"). :func:`compile_plan` turns a
graph made only of the ops below into steps on NumPy arrays, generated as one Python function of
local variables, so the served call is the arithmetic plus a few µs, and NumPy's BLAS calls (and
pyserve's native ops) release the GIL while they compute:

* ``aten.linear`` with a stored weight ``[N, K]`` and bias: ``x @ W^T + b`` (``W^T`` laid out
  ``[K, N]`` once at compile time), any leading dims; in a transformer graph (one with an
  embedding or the native attention) torch's own ``linear`` on views of the arrays instead,
  the graph's kernel and threads,
* ``aten.relu``: ``max(x, 0)`` (NaN stays NaN, as torch),
* ``aten.softmax`` / ``aten.log_softmax`` over a constant dim of a float32 activation (max-shifted,
  as torch computes them),
* the native kernel nodes :func:`pyserve.artifact.kernels.native_module` put in (``int8_linear``,
  ``csr_linear``, ``codebook_linear`` layers): called as they are, on zero-copy torch views of the
  NumPy arrays; an int8 layer bound to its packed weights (with its GELU or add & LayerNorm
  epilogue) as one direct call of ``pyserve._C.int8_linear_packed`` on the arrays (the call the
  bound function makes, so the same result bit for bit, ~6 us less per layer);
* a transformer encoder's other nodes, as ``native_module`` leaves them: the native attention
  (``pyserve._C.attention_qkv``), the additive key mask, the mean pooling + L2 normalisation, and
  the embeddings (``embedding`` lookups, which refuse a negative or out-of-range id as torch does,
  ``add``, the native LayerNorm ``native_module`` binds (``pyserve._C.layer_norm``), torch's
  ``layer_norm`` and ``gelu`` (on a view) elsewhere, ``slice``/``expand``/``gather`` of the position and
  token-type ids, ``sym_size``, the dtype asserts of the export).

Steps that depend on the input shapes alone (the sizes the graph reads, and what it computes from
them and stored tensors: a BERT's position ids, token-type ids and their embeddings) run once per
input shape; their results are kept, read-only, up to :attr:`Plan.MEMO_BYTES` (32 MiB) in all.
Each value is released once the last step reading it has run, as the graph's generated code does:
kept to the end of the call, a transformer's ~40 intermediates (~15 MB for MiniLM at sequence
128) took fresh pages, and their faults, on every call. On the int8 MiniLM (batch 1, sequence
128, one thread, Zen 4) the plan takes 0.5-0.7 ms (5-6%) less a call than the ``GraphModule`` with
the same kernels and the same result bit for bit (``benchmarks/bert_ab.py --graph``, 2026-12-01).

Anything else (a convolution, a view with a symbolic shape, a second use of a stored tensor as an
activation...) means no plan: the caller keeps the GraphModule. A plan is also refused, and the
GraphModule kept, when on a sample input its outputs differ from the GraphModule's by more than
float rounding (``rtol=1e-4``, ``atol=1e-5`` relative to the output's scale): the results differ
only in the order of the float32 sums (NumPy's BLAS against torch's dense layers; the native
nodes give the graph's results bit for bit).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

__all__ = ["Plan", "compile_plan"]

log = logging.getLogger("pyserve.artifact")


class Plan:
    """``plan(*arrays) -> tuple of arrays``: the graph's outputs for its inputs (NumPy, one array per
    graph input in placeholder order: float32 where the graph takes float32, int64 or int32 token
    ids and masks for a transformer). Safe to call from several threads at once.

    Raises ``TypeError`` for a wrong number of inputs or token ids that are not int64/int32,
    ``IndexError`` for a token id outside its embedding table (naming the id and where it is), and
    what a step's own op raises for inputs the graph does not take (shapes that do not broadcast, a
    sequence beyond the position table: the server checks those first,
    :func:`pyserve.artifact.kernels.input_checker`).

    Attributes
    ----------
    steps : int
        Operations per call (for logs and tests).
    shape_steps : int
        Of those, how many depend on the input shapes alone and run once per shape (their values
        kept, read-only, up to :attr:`MEMO_BYTES` per plan).
    """

    __slots__ = ("_run", "_n_inputs", "steps", "shape_steps", "_memo")

    #: bytes of shape-only values a plan keeps, all shapes together (oldest shape dropped first; a
    #: shape whose values alone exceed it is not kept: computed on every call)
    MEMO_BYTES = 32 << 20

    def __init__(self, steps: list, n_inputs: int, outputs: tuple[int, ...]) -> None:
        # The steps become one generated function of local variables (v0, v1, ...: no list of values,
        # no loop, ~1 us less per step than interpreting the list), and each value is deleted right
        # after the last step reading it (unless it is an output): a transformer's intermediates are
        # released as the graph's generated code releases them, instead of all living to the end of
        # the call (fresh pages, and their faults, every call).
        #
        # Steps that depend on the inputs' shapes alone (the sizes the graph reads, then what is
        # computed from those and stored tensors only: a BERT's position and token-type embeddings
        # of [B, S]) run once per shape: their values are kept (read-only) by the input dims they
        # read, up to MEMO_BYTES in all, and a call with a known shape skips them.
        kind: dict[int, str] = {i: "value" for i in range(n_inputs)}
        for k, (fn, args) in enumerate(steps):
            slot = n_inputs + k
            if getattr(fn, "_pyserve_shape", False) and len(args) == 1 and args[0] < n_inputs:
                kind[slot] = "size"
            elif all(kind[a] in ("size", "shape") for a in args) and slot not in outputs:
                kind[slot] = "shape"
            else:
                kind[slot] = "value"
        shape_steps = [k for k in range(len(steps)) if kind[n_inputs + k] == "shape"]
        if not shape_steps:  # nothing to keep: every step in graph order
            for slot in list(kind):
                if kind[slot] == "size":
                    kind[slot] = "value"
        order = ([k for k in range(len(steps)) if kind[n_inputs + k] == "size"] + shape_steps
                 + [k for k in range(len(steps)) if kind[n_inputs + k] == "value"])
        value_steps = [k for k in order if kind[n_inputs + k] == "value"]
        last: dict[int, int] = {}
        for k in value_steps:
            for a in steps[k][1]:
                last[a] = k
        dead: dict[int, list[int]] = {k: [] for k in value_steps}
        for slot, k in last.items():
            if slot not in outputs and kind[slot] == "value":
                dead[k].append(slot)
        params = ", ".join(f"v{i}" for i in range(n_inputs))
        lines = [f"def run({params}):"]

        def call(k: int, indent: str) -> None:
            lines.append(f"{indent}v{n_inputs + k} = f{k}({', '.join(f'v{a}' for a in steps[k][1])})")

        sizes = [k for k in order if kind[n_inputs + k] == "size"]
        for k in sizes:
            call(k, "    ")
        if shape_steps:
            kept = sorted({a for k in value_steps for a in steps[k][1] if kind[a] == "shape"})
            key = "(" + "".join(f"v{n_inputs + k}, " for k in sizes) + ")"
            names = "".join(f"v{s}, " for s in kept)
            lines += [f"    _kept = _memo.get({key})", "    if _kept is None:"]
            for k in shape_steps:
                call(k, "        ")
            lines += [f"        _kept = _keep(_memo, {key}, ({names}))", "    else:", "        _kept = _kept[0]"]
            if kept:
                lines.append(f"    ({names}) = _kept")
        for k in value_steps:
            call(k, "    ")
            if dead[k]:
                lines.append(f"    del {', '.join(f'v{d}' for d in sorted(dead[k]))}")
        lines.append(f"    return ({''.join(f'v{i}, ' for i in outputs)})")
        self._memo: dict = {}
        scope = {f"f{k}": fn for k, (fn, _) in enumerate(steps)}
        scope.update(_memo=self._memo, _keep=_keep)
        exec(compile("\n".join(lines), "<pyserve plan>", "exec"), scope)  # noqa: S102 - generated from the graph
        self._run = scope["run"]
        self._n_inputs = n_inputs
        self.steps = len(steps)
        #: how many steps run once per input shape (kept), not on every call
        self.shape_steps = len(shape_steps)

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(inputs) != self._n_inputs:
            raise TypeError(f"plan takes {self._n_inputs} input(s), got {len(inputs)}")
        return self._run(*inputs)


def _keep(memo: dict, key: tuple, values: tuple) -> tuple:
    """Keep ``values`` (made read-only: later calls share them) under ``key`` in ``memo``, the oldest
    keys dropped while all would exceed :attr:`Plan.MEMO_BYTES`; values larger than that alone are
    returned, not kept. ``memo`` maps key -> (values, bytes)."""
    size = sum(v.nbytes for v in values if isinstance(v, np.ndarray))
    if size > Plan.MEMO_BYTES:
        return values
    for v in values:
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    with _KEEP_LOCK:  # plans run on several threads at once (the server's instances)
        while memo and sum(b for _, b in memo.values()) + size > Plan.MEMO_BYTES:
            memo.pop(next(iter(memo)))
        memo[key] = (values, size)
    return values


_KEEP_LOCK = threading.Lock()


def _size_step(dim: int) -> Callable:
    """``x.shape[dim]`` (a symbolic size the graph reads)."""
    def size(x):
        return x.shape[dim]

    size._pyserve_shape = True
    return size


def _dense(weight, bias) -> Callable:
    wt = np.ascontiguousarray(weight.detach().float().numpy().T)  # [K, N]
    b = None if bias is None else np.ascontiguousarray(bias.detach().float().numpy())

    if b is None:
        def linear(x):
            return np.matmul(x, wt)
    else:
        def linear(x):
            y = np.matmul(x, wt)
            y += b
            return y
    return linear


def _torch_linear(weight, bias) -> Callable:
    import torch

    w = weight.detach()
    b = None if bias is None else bias.detach()

    def linear(x):
        with torch.inference_mode():
            return torch.nn.functional.linear(_torch_of(x), w, b).numpy()

    return linear


def _relu(x):
    return np.maximum(x, np.float32(0)) if x.dtype == np.float32 else np.maximum(x, 0)


def _softmax(dim: int, log: bool) -> Callable:
    def softmax(x):
        # initial=-inf: an empty softmax dim (0 rows, a 0-length sequence) gives an empty result, as torch
        z = x - np.max(x, axis=dim, keepdims=True, initial=-np.inf)
        if log:
            with np.errstate(divide="ignore"):  # log(0) of an empty dim: the result is empty anyway
                return z - np.log(np.sum(np.exp(z), axis=dim, keepdims=True))
        e = np.exp(z)
        e /= np.sum(e, axis=dim, keepdims=True)
        return e

    return softmax


def _kernel_node(fn, consts: list) -> Callable:
    """A native kernel node (``fn(x_torch, *consts)``) on NumPy arrays."""
    import torch

    def call(x):
        if not (x.flags.writeable and x.flags.c_contiguous):  # torch.from_numpy warns on read-only arrays
            x = np.array(x, order="C", copy=True)
        return fn(torch.from_numpy(x), *consts).numpy()

    return call


def _int8_native(fn) -> tuple[Callable, int]:
    """An int8 layer bound by :func:`pyserve.artifact.kernels._int8_packed_layer` (``fn._pyserve_int8``)
    as one direct call of the native op on NumPy arrays: ``(step, n_inputs)``, 2 inputs (x and the
    residual) for an add & LayerNorm layer. The same call the bound function makes, so the same
    result bit for bit, without its torch conversions (~6 us a call)."""
    from pyserve import _C
    from pyserve.ops.quant import _cached_pack

    values, w_scale, bias, activation, norm = fn._pyserve_int8
    packed = _cached_pack(values)
    if packed is None:  # not pinned: the bound function (it packs per call)
        return None, 0
    native = _C.int8_linear_packed
    scale = w_scale.detach().contiguous().numpy()
    b = None if bias is None else bias.detach().contiguous().numpy()
    N = int(values.shape[0])

    def rows_of(x):
        r = x.reshape(-1, x.shape[-1])
        if r.dtype != np.float32 or not r.flags.c_contiguous:
            r = np.ascontiguousarray(r, dtype=np.float32)
        return r

    if norm is None:
        def int8_step(x):
            return native(rows_of(x), packed, scale, b, activation).reshape(*x.shape[:-1], N)

        return int8_step, 1
    g = norm[0].detach().float().contiguous().numpy()
    nb = norm[1].detach().float().contiguous().numpy()
    eps = float(norm[2])

    def int8_add_norm_step(x, residual):
        if residual.dtype != np.float32 or residual.shape != (*x.shape[:-1], N):
            return fn(_torch_of(x), _torch_of(residual)).numpy()  # the bound function's own fallback
        res = np.ascontiguousarray(residual.reshape(-1, N))
        return native(rows_of(x), packed, scale, b, activation, res, g, nb, eps).reshape(*x.shape[:-1], N)

    return int8_add_norm_step, 2


def _torch_of(x):
    """A torch view of NumPy array ``x`` (a contiguous writable copy first where it is not one)."""
    import torch

    if not (x.flags.writeable and x.flags.c_contiguous):
        x = np.array(x, order="C", copy=True)
    return torch.from_numpy(x)


def _attention_step(heads: int, head_size: int, scale: float, precision: str) -> Callable:
    """:func:`pyserve.artifact.kernels._attention_qkv` on NumPy arrays: the native kernel for a float32
    ``[B, S, 3 E]`` projection and a ``[B, 1, S or 1, S]`` additive mask, else the graph's ops."""
    from pyserve.artifact.kernels import _attention_qkv, _attention_qkv_np

    E = heads * head_size

    def attention(qkv, mask):
        out = _attention_qkv_np(qkv, mask, heads, E, scale, precision)
        if out is not None:
            return out
        return _attention_qkv(_torch_of(qkv), _torch_of(mask), heads, head_size, scale, precision).numpy()

    return attention


def _additive_mask_step(fill: float) -> Callable:
    """:func:`pyserve.artifact.kernels._additive_key_mask` on a NumPy ``[B, S]`` key mask."""
    def additive_key_mask(mask):
        B, S = mask.shape
        add = np.where(mask != 0, np.float32(0.0), np.float32(fill))
        return np.broadcast_to(add[:, None, None, :], (B, 1, S, S))

    return additive_key_mask


def _mean_pool_step(eps_count: float, eps_norm: float) -> Callable:
    """:func:`pyserve.artifact.kernels._mean_pool_normalize` on NumPy arrays (the same native call)."""
    from pyserve.artifact.kernels import _mean_pool_normalize, _mean_pool_normalize_np

    def mean_pool(h, mask):
        if h.dtype == np.float32 and h.ndim == 3 and mask.ndim == 2 and mask.shape == h.shape[:2]:
            return _mean_pool_normalize_np(h, mask, eps_count, eps_norm)
        return _mean_pool_normalize(_torch_of(h), _torch_of(mask), eps_count, eps_norm).numpy()

    return mean_pool


class _Unsupported(Exception):
    pass


def _bind(impl: Callable, args: tuple, index: dict, consts: dict) -> tuple[Callable, tuple[int, ...]]:
    """``(step, input slots)`` calling ``impl`` with ``args`` (a node's arguments: computed nodes,
    stored tensors as NumPy arrays, Python constants, one level of lists of these) filled in."""
    import torch
    from torch.fx import Node

    slots: list[int] = []

    def spec(a):
        if isinstance(a, Node):
            if a in index:
                slots.append(index[a])
                return (0, len(slots) - 1)
            if a in consts:
                c = consts[a]
                return (1, c.detach().numpy() if isinstance(c, torch.Tensor) else c)
            raise _Unsupported(f"argument {a.name} is neither computed nor stored")
        if isinstance(a, (list, tuple)):
            return (2, [spec(x) for x in a])
        if a is None or isinstance(a, (bool, int, float, str)):
            return (1, a)
        raise _Unsupported(f"argument {a!r} of type {type(a).__name__}")

    specs = [spec(a) for a in args]
    if all(k == 0 for k, _ in specs):
        return impl, tuple(slots)

    def fill(sp, vals):
        kind, v = sp
        if kind == 0:
            return vals[v]
        if kind == 1:
            return v
        return [fill(x, vals) for x in v]

    def step(*vals):
        return impl(*[fill(sp, vals) for sp in specs])

    return step, tuple(slots)


def _slice(x, dim: int = 0, start=None, end=None, step: int = 1):
    return x[(slice(None),) * (dim % x.ndim) + (slice(start, end, step),)]


def _expand(x, sizes):
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise RuntimeError(f"expand: {len(sizes)} sizes for a {x.ndim}-D tensor")
    shape = [x.shape[i - lead] if (s == -1 and i >= lead) else s for i, s in enumerate(sizes)]
    return np.broadcast_to(x, shape)


def _gather(x, dim: int, idx):
    dim %= x.ndim
    if idx.ndim != x.ndim or any(idx.shape[d] > x.shape[d] for d in range(x.ndim) if d != dim):
        raise RuntimeError(f"gather: index of shape {idx.shape} for input of shape {x.shape} along dim {dim}")
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[dim]):
        raise IndexError(f"gather: index out of range for dim {dim} of size {x.shape[dim]}")
    src = x[tuple(slice(None) if d == dim else slice(0, idx.shape[d]) for d in range(x.ndim))]
    return np.take_along_axis(src, idx, axis=dim)


def _embedding(weight, ids, *_):
    if ids.dtype != np.int64 and ids.dtype != np.int32:  # as torch's embedding
        raise TypeError(f"embedding: expected int64 or int32 indices, got {ids.dtype}")
    rows = weight.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= rows))[0])
        raise IndexError(f"embedding: index {int(ids[bad])} at {bad} is out of range for a table of {rows} rows")
    return weight.take(ids, axis=0)


def _add(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype:
        return np.add(a, b)
    import torch

    ta = _torch_of(a) if isinstance(a, np.ndarray) else a
    tb = _torch_of(b) if isinstance(b, np.ndarray) else b
    return torch.add(ta, tb).numpy()


def _layer_norm_step(shape, weight, bias, eps: float) -> Callable:
    import torch

    shape = [int(d) for d in shape]
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()

    def layer_norm(x):
        return torch.nn.functional.layer_norm(_torch_of(x), shape, weight, bias, eps).numpy()

    return layer_norm


def _layer_norm_native(fn, weight: np.ndarray, bias: np.ndarray, eps: float) -> Callable:
    """A bound native LayerNorm (:func:`pyserve.artifact.kernels._layer_norm_layer`) on NumPy arrays:
    the same native call, so the same result bit for bit; anything else through ``fn``."""
    from pyserve import _C

    native = _C.layer_norm
    N = weight.shape[0]

    def layer_norm(x):
        if x.dtype == np.float32 and x.ndim >= 1 and x.shape[-1] == N:
            return native(np.ascontiguousarray(x), weight, bias, eps)
        return fn(_torch_of(x)).numpy()

    return layer_norm


def _gelu(x):
    import torch

    return torch.nn.functional.gelu(_torch_of(x)).numpy()


def _assert_dtype_step(dtype) -> Callable:
    from pyserve import dtypes

    try:
        d = dtypes.from_torch(dtype)
    except ValueError:
        raise _Unsupported(f"metadata assert on {dtype}") from None
    if d.name == "BF16":  # NumPy holds its bits as uint16: no dtype to compare with
        raise _Unsupported(f"metadata assert on {dtype}")
    want = d.numpy

    def assert_dtype(x):
        if x.dtype != want:
            raise RuntimeError(f"expected a {want} tensor, got {x.dtype}")

    return assert_dtype


def _is_kernel_fn(target) -> bool:
    from pyserve.artifact import kernels

    if getattr(target, "_pyserve_int8", None) is not None:
        return getattr(target, "__name__", "").startswith("int8_linear_packed")
    if target in (kernels._int8_fn, kernels._csr_fn):
        return True
    return getattr(target, "__module__", None) == kernels.__name__ and \
        getattr(target, "__name__", "").startswith("codebook") and getattr(target, "__name__", "").endswith("_linear")


def _steps_of(gm):
    """(steps, n_inputs, outputs) for the graph, or a string saying why there is no plan."""
    import torch

    from pyserve.artifact.kernels import getattr_path

    aten = torch.ops.aten
    index: dict = {}
    consts: dict = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        index[n] = i
    steps: list = []
    outputs = None
    # In a transformer graph a dense layer stays on torch's linear (on views of the arrays): the
    # graph's own kernel and threads, bit for bit; NumPy's BLAS is for the small MLPs it was measured on.
    from pyserve.artifact import kernels

    transformer = any(n.op == "call_function" and n.target in (aten.embedding.default, kernels._attention_qkv)
                      for n in gm.graph.nodes)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            consts[node] = getattr_path(gm, node.target)
            continue
        if node.op == "output":
            (out,) = node.args
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not all(o in index for o in outs):
                return "an output is not computed by a step"
            outputs = tuple(index[o] for o in outs)
            continue
        if node.op != "call_function":
            return f"node {node.name} ({node.op}) is not a function call"
        t = node.target
        args = node.args
        if t is aten._assert_tensor_metadata.default and args and args[0] in index and \
                set(node.kwargs) <= {"dtype", "device", "layout"} and node.kwargs.get("dtype") is not None:
            try:
                steps.append((_assert_dtype_step(node.kwargs["dtype"]), (index[args[0]],)))
            except _Unsupported as exc:
                return f"node {node.name}: {exc}"
            index[node] = len(placeholders) + len(steps) - 1
            continue
        if node.kwargs:
            return f"node {node.name} has keyword arguments"
        try:
            special = _transformer_step(t, args, index, consts)
        except _Unsupported as exc:
            return f"node {node.name}: {exc}"
        if special is not None:
            steps.append(special)
            index[node] = len(placeholders) + len(steps) - 1
            continue
        if t is aten.linear.default:
            if len(args) not in (2, 3) or args[0] not in index or args[1] not in consts or \
                    (len(args) == 3 and args[2] is not None and args[2] not in consts):
                return f"node {node.name}: linear without a stored weight"
            weight = consts[args[1]]
            bias = consts[args[2]] if len(args) == 3 and args[2] is not None else None
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32:
                return f"node {node.name}: weight is not a 2-D float32 tensor"
            steps.append(((_torch_linear if transformer else _dense)(weight, bias), (index[args[0]],)))
        elif t in (aten.relu.default, aten.relu_.default):
            if len(args) != 1 or args[0] not in index:
                return f"node {node.name}: relu of a non-activation"
            steps.append((_relu, (index[args[0]],)))
        elif t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default):
            if len(args) < 2 or args[0] not in index or not isinstance(args[1], int) or isinstance(args[1], bool):
                return f"node {node.name}: softmax without a constant dim"
            extra = args[2] if len(args) > 2 else None
            if extra not in (None, False):  # a dtype to compute in, or half_to_float
                return f"node {node.name}: softmax with a dtype"
            steps.append((_softmax(args[1], t in (aten.log_softmax.int, aten._log_softmax.default)),
                          (index[args[0]],)))
        elif callable(t) and _is_kernel_fn(t):
            if not args or args[0] not in index:
                return f"node {node.name}: kernel call on a non-activation"
            rest = []
            for a in args[1:]:
                if a is None:
                    rest.append(None)
                elif a in consts:
                    rest.append(consts[a])
                else:
                    return f"node {node.name}: kernel argument {a} is not stored"
            steps.append((_kernel_node(t, rest), (index[args[0]],)))
        else:
            return f"node {node.name}: {getattr(t, '__name__', t)} is not supported"
        index[node] = len(placeholders) + len(steps) - 1
    if outputs is None:
        return "the graph has no output"
    return steps, len(placeholders), outputs


def _transformer_step(t, args: tuple, index: dict, consts: dict):
    """The step of a transformer graph's node (embeddings, the native int8 layers with their
    epilogues, attention, mask, pooling), None for a node of another kind."""
    import torch

    from pyserve.artifact import kernels

    aten = torch.ops.aten
    if getattr(t, "_pyserve_int8", None) is not None and getattr(t, "__name__", "").startswith("int8_linear_packed"):
        fn, n = _int8_native(t)
        if fn is None:
            return None
        if len(args) != n or any(a not in index for a in args):
            raise _Unsupported(f"int8 layer with arguments {args}")
        return fn, tuple(index[a] for a in args)
    if t is kernels._attention_qkv:
        if len(args) != 6 or args[0] not in index or args[1] not in index:
            raise _Unsupported("attention without computed inputs")
        return _attention_step(*args[2:]), (index[args[0]], index[args[1]])
    if t is kernels._additive_key_mask:
        if len(args) != 2 or args[0] not in index:
            raise _Unsupported("additive mask of a non-activation")
        return _additive_mask_step(float(args[1])), (index[args[0]],)
    if t is kernels._mean_pool_normalize:
        if len(args) != 4 or args[0] not in index or args[1] not in index:
            raise _Unsupported("mean pooling without computed inputs")
        return _mean_pool_step(float(args[2]), float(args[3])), (index[args[0]], index[args[1]])
    if t is aten.sym_size.int:
        if len(args) != 2 or args[0] not in index or not isinstance(args[1], int):
            raise _Unsupported("sym_size of a non-activation")
        return _size_step(args[1]), (index[args[0]],)
    if t is aten.slice.Tensor:
        return _bind(_slice, args, index, consts)
    if t is aten.expand.default and len(args) == 2:
        return _bind(_expand, args, index, consts)
    if t is aten.gather.default and len(args) == 3:
        return _bind(_gather, args, index, consts)
    if t is aten.embedding.default and args and args[0] in consts:
        return _bind(_embedding, args, index, consts)
    if t is aten.add.Tensor and len(args) == 2:
        return _bind(_add, args, index, consts)
    bound_norm = getattr(t, "_pyserve_layer_norm", None)
    if bound_norm is not None:
        if len(args) != 1 or args[0] not in index:
            raise _Unsupported("bound layer_norm of a non-activation")
        return _layer_norm_native(t, *bound_norm), (index[args[0]],)
    if t is aten.gelu.default and len(args) == 1 and args[0] in index:
        return _gelu, (index[args[0]],)
    if t is aten.layer_norm.default and len(args) >= 4 and args[0] in index:
        w = consts.get(args[2]) if args[2] is not None else None
        b = consts.get(args[3]) if args[3] is not None else None
        if (args[2] is not None and w is None) or (args[3] is not None and b is None):
            raise _Unsupported("layer_norm without stored parameters")
        eps = float(args[4]) if len(args) > 4 else 1e-5
        return _layer_norm_step(args[1], w, b, eps), (index[args[0]],)
    return None


def compile_plan(gm, sample_inputs: tuple[np.ndarray, ...] | None = None) -> Plan | None:
    """A :class:`Plan` computing what ``gm`` (a ``torch.fx.GraphModule`` as
    :func:`pyserve.artifact.kernels.native_module` returns it) computes, or None when its graph has
    an op the plan does not run (module docstring), when a stored tensor has no NumPy dtype
    (bfloat16), or when on ``sample_inputs`` (NumPy arrays, one per graph input, values the graph
    accepts: the backend uses random floats and ones for integer inputs such as token ids; no check
    when None) the graph or the plan fails or their outputs differ beyond float rounding. Never
    raises for a graph it cannot run.
    """
    import torch

    try:
        got = _steps_of(gm)
    except Exception as exc:  # noqa: BLE001 - a stored tensor NumPy cannot hold (bfloat16), ...: no plan
        got = f"{type(exc).__name__}: {exc}"
    if isinstance(got, str):
        log.debug("no straight-line plan: %s", got)
        return None
    plan = Plan(*got)
    if sample_inputs is not None:
        try:
            with torch.inference_mode():
                ref = gm(*[torch.from_numpy(np.ascontiguousarray(a)) for a in sample_inputs])
            outs = plan(*sample_inputs)
        except Exception as exc:  # noqa: BLE001 - the graph or the plan fails on the sample: no plan
            log.debug("no straight-line plan: the sample input failed: %s: %s", type(exc).__name__, exc)
            return None
        refs = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
        if len(refs) != len(outs):
            return None
        for r, o in zip(refs, outs):
            r = r.detach().numpy()
            if r.shape != o.shape or r.dtype != o.dtype:
                log.debug("no straight-line plan: output %s %s against the graph's %s %s", o.shape, o.dtype,
                          r.shape, r.dtype)
                return None
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            if not np.allclose(o, r, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                log.debug("no straight-line plan: outputs differ from the graph's")
                return None
    return plan
