"""A straight-line NumPy plan for small feed-forward graphs: the artifact's graph without torch's
per-call machinery.

For a model as small as LeNet-300-100 (266k multiply-adds at batch 1), most of a call through the
rebuilt ``torch.fx.GraphModule`` is not arithmetic: pytree flattening of the arguments, ``Module``
attribute lookups and one aten dispatch per node cost ~100 µs, the three matrix products ~25 µs
(docs/performance.md, "The model's share is mostly not arithmetic"). :func:`compile_plan` turns a
graph made only of the ops below into a list of steps run on NumPy arrays, so the served call is
the arithmetic plus a few µs, and NumPy's BLAS calls release the GIL while they compute:

* ``aten.linear`` with a stored weight ``[N, K]`` and bias: ``x @ W^T + b`` (``W^T`` laid out
  ``[K, N]`` once at compile time), any leading dims,
* ``aten.relu``: ``max(x, 0)`` (NaN stays NaN, as torch),
* ``aten.softmax`` / ``aten.log_softmax`` over a constant dim of a float32 activation (max-shifted,
  as torch computes them),
* the native kernel nodes :func:`pyserve.artifact.kernels.native_module` put in (``int8_linear``,
  ``csr_linear``, ``codebook_linear`` layers): called as they are, on zero-copy torch views of the
  NumPy arrays.

Anything else (a convolution, a view with a symbolic shape, a second use of a stored tensor as an
activation...) means no plan: the caller keeps the GraphModule. A plan is also refused, and the
GraphModule kept, when on a sample input its outputs differ from the GraphModule's by more than
float rounding (``rtol=1e-4``, ``atol=1e-5`` relative to the output's scale): the results differ
only in the order of the float32 sums (NumPy's BLAS against torch's).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

__all__ = ["Plan", "compile_plan"]

log = logging.getLogger("pyserve.artifact")


class Plan:
    """``plan(*arrays) -> tuple of arrays``: the graph's outputs for its inputs (NumPy, one array per
    graph input in placeholder order, float32 where the graph takes float32).

    Attributes
    ----------
    steps : int
        Operations per call (for logs and tests).
    """

    __slots__ = ("_steps", "_n_inputs", "_outputs", "steps")

    def __init__(self, steps: list, n_inputs: int, outputs: tuple[int, ...]) -> None:
        self._steps = steps
        self._n_inputs = n_inputs
        self._outputs = outputs
        self.steps = len(steps)

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(inputs) != self._n_inputs:
            raise TypeError(f"plan takes {self._n_inputs} input(s), got {len(inputs)}")
        values: list = list(inputs) + [None] * len(self._steps)
        slot = self._n_inputs
        for fn, args in self._steps:
            values[slot] = fn(*[values[a] for a in args])
            slot += 1
        return tuple(values[i] for i in self._outputs)


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
        if node.kwargs:
            return f"node {node.name} has keyword arguments"
        t = node.target
        args = node.args
        if t is aten.linear.default:
            if len(args) not in (2, 3) or args[0] not in index or args[1] not in consts or \
                    (len(args) == 3 and args[2] is not None and args[2] not in consts):
                return f"node {node.name}: linear without a stored weight"
            weight = consts[args[1]]
            bias = consts[args[2]] if len(args) == 3 and args[2] is not None else None
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32:
                return f"node {node.name}: weight is not a 2-D float32 tensor"
            steps.append((_dense(weight, bias), (index[args[0]],)))
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


def compile_plan(gm, sample_inputs: tuple[np.ndarray, ...] | None = None) -> Plan | None:
    """A :class:`Plan` computing what ``gm`` (a ``torch.fx.GraphModule`` as
    :func:`pyserve.artifact.kernels.native_module` returns it) computes, or None when its graph has
    an op the plan does not run (module docstring) or when the plan's outputs on ``sample_inputs``
    (NumPy arrays, one per graph input; no check when None) differ from ``gm``'s beyond float rounding.
    """
    import torch

    got = _steps_of(gm)
    if isinstance(got, str):
        log.debug("no straight-line plan: %s", got)
        return None
    plan = Plan(*got)
    if sample_inputs is not None:
        with torch.inference_mode():
            ref = gm(*[torch.from_numpy(np.ascontiguousarray(a)) for a in sample_inputs])
        refs = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
        outs = plan(*sample_inputs)
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
