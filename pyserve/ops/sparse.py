"""CSR sparse x dense linear layer: ``y = x @ W.T + bias`` with a pruned weight ``W`` in CSR form.

This is how a layer pruned by Deep Compression (Han, Mao & Dally 2016, section 2: weights stored in
compressed sparse row form) runs without densifying it; EIE (Han et al. 2016, section III) executes
the same CSR/CSC layout in hardware. The CSR format itself follows Saad, *Iterative Methods for
Sparse Linear Systems* (2nd ed., section 3.4). The kernels live in ``csrc/sparse/``
(``pyserve._C``); this module only normalises arguments.

Algorithms (CPU)
----------------
* ``B == 1`` (SpMV): one dot product per output row, ``x`` read through the row's column indices
  (AVX2 8-wide gathers with FMA; a portable scalar path on other CPUs).
* ``B > 1`` (SpMM): ``x`` is transposed to ``[K, B]`` (padded to a multiple of 8 columns) so that
  each nonzero becomes one contiguous AXPY over the batch, up to 64 batch columns per pass in AVX2
  registers; the result is written straight into ``y [B, N]``.
* Output rows are split across ``get_num_threads()`` OpenMP threads (one fork-join per call);
  products under 2**18 multiply-adds run on the calling thread. The GIL is released.
* Column indices are validated inside the kernel, chunk by chunk, before a row reads ``x`` (B = 1:
  chunks of ~2048 nonzeros checked in one vectorised pass, then computed while their indices are in
  L1; B > 1: chunks of 16 rows); ``indptr`` is validated before the kernel starts. Plain
  C-contiguous numpy arguments go to ``_C`` without any Python-side conversion.

CUDA: one warp per output row with a warp-shuffle reduction per batch row (``csr_kernel.cu``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from pyserve import _C

__all__ = ["csr_linear"]

_OP = "csr_linear"


def _is_torch_tensor(obj: Any) -> bool:
    # Checked by name so that importing pyserve.ops never imports torch.
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "device") and hasattr(obj, "numpy")


def _plain(obj: Any) -> bool:
    """A C-contiguous numpy array in native byte order: passed to _C as it is."""
    return type(obj) is np.ndarray and obj.flags.c_contiguous and obj.dtype.isnative


def _kind(obj: Any) -> str:
    return f"torch.Tensor of dtype {obj.dtype}" if _is_torch_tensor(obj) else type(obj).__name__


def _to_numpy(obj: Any, arg: str, dtypes: tuple[np.dtype, ...], ndim: int, shape_hint: str) -> np.ndarray:
    """A C-contiguous, native-order numpy view or copy of a numpy array or CPU torch tensor."""
    if type(obj) is np.ndarray and obj.ndim == ndim and obj.flags.c_contiguous:
        dt = obj.dtype
        if dt.isnative and any(dt.kind == d.kind and dt.itemsize == d.itemsize for d in dtypes):
            return obj  # the common case, without any conversion
    # Messages are formatted only on error: str(numpy.dtype) runs Python code (~10 us each).
    def expected() -> str:
        return " or ".join(str(d) for d in dtypes)

    got = None  # the torch dtype, for messages
    if _is_torch_tensor(obj):
        got = obj.dtype
        if obj.device.type != "cpu":
            raise ValueError(f"{_OP}: argument '{arg}': expected a CPU tensor like x, got a tensor on device "
                             f"'{obj.device}'")
        obj = obj.detach()
        if str(obj.layout) != "torch.strided":
            raise ValueError(f"{_OP}: argument '{arg}': expected a dense (strided) tensor, got layout {obj.layout}")
        if obj.is_conj() or obj.is_neg():
            obj = obj.resolve_conj().resolve_neg()
        try:
            obj = obj.numpy()
        except TypeError as exc:  # dtypes numpy lacks, e.g. bfloat16
            raise ValueError(f"{_OP}: argument '{arg}': expected dtype {expected()}, got {obj.dtype}") from exc
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{_OP}: argument '{arg}': expected a numpy.ndarray or torch.Tensor of dtype {expected()}, "
                         f"got {type(obj).__name__}")
    if obj.ndim != ndim:
        raise ValueError(f"{_OP}: argument '{arg}': expected a {ndim}-D array {shape_hint}, got ndim={obj.ndim} "
                         f"with shape {obj.shape}")
    if obj.dtype not in dtypes and obj.dtype.newbyteorder("=") not in dtypes:
        raise ValueError(f"{_OP}: argument '{arg}': expected dtype {expected()}, got {got or obj.dtype}")
    if not obj.dtype.isnative:
        obj = obj.astype(obj.dtype.newbyteorder("="))
    return np.ascontiguousarray(obj)


_F32 = (np.dtype(np.float32),)
_IDX = (np.dtype(np.int32), np.dtype(np.int64))


def csr_linear(x: Any, indptr: Any, indices: Any, values: Any, bias: Optional[Any] = None) -> Any:
    """Sparse linear layer ``y = x @ W.T + bias`` with ``W [N, K]`` in CSR form.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        ``[B, K]`` float32 activations, any strides (non-contiguous or transposed inputs are copied
        to C order first). ``B = 1`` is the SpMV case; ``B = 0`` gives an empty ``[0, N]`` result.
    indptr : numpy.ndarray or torch.Tensor
        ``[N + 1]`` int32 or int64 row pointers: row ``n`` owns nonzeros
        ``indptr[n] : indptr[n + 1]``. ``indptr[0] == 0``, non-decreasing, ``indptr[N] == nnz``.
    indices : numpy.ndarray or torch.Tensor
        ``[nnz]`` int32 or int64 column indices, in ``[0, K)`` and strictly increasing within each
        row (canonical CSR, as ``scipy.sparse.csr_matrix`` after ``sum_duplicates()``; it is also
        what ``torch.Tensor.to_sparse_csr()`` produces).
    values : numpy.ndarray or torch.Tensor
        ``[nnz]`` float32 nonzero values.
    bias : numpy.ndarray or torch.Tensor, optional
        ``[N]`` float32, added to every row of the output.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[B, N]`` float32, of the same kind as ``x`` (a CPU torch tensor for a CPU tensor; for a
        CUDA tensor, a tensor on its device).

    Raises
    ------
    ValueError
        Naming the argument, the expectation and what came, when: an argument is not an array or
        tensor; a rank is wrong; ``x``/``values``/``bias`` are not float32 or ``indptr``/``indices``
        not int32/int64; ``len(values) != len(indices)``; ``len(bias) != N``; ``indptr`` is empty,
        does not start at 0, decreases anywhere or does not end at ``nnz``; a column index is
        negative or ``>= K`` (the ``K`` of ``x``), or column indices are not strictly increasing
        within a row; tensors are on different devices. The CSR structure is validated in
        O(N + nnz), each row before it reads ``x``, so malformed input never causes an
        out-of-bounds access; the error names the first offending position.
    RuntimeError
        For a CUDA ``x`` when ``pyserve._C`` was built without CUDA (``build_info()["cuda"]``), or
        on a CUDA error.

    Notes
    -----
    CSR layout: Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., section 3.4; its use
    for pruned networks: Deep Compression (Han et al., ICLR 2016), section 2, and EIE (Han et al.,
    ISCA 2016). Summation order differs from a dense matmul, so results agree with
    ``x @ W.T`` to float32 rounding (about ``1e-6 * sqrt(nnz per row)`` relative), not bitwise.
    Uses :func:`pyserve.ops.get_num_threads` OpenMP threads with the GIL released. The CUDA path
    copies ``indptr`` and ``indices`` to the host once per call to validate them.
    """
    if _plain(x) and _plain(indptr) and _plain(indices) and _plain(values) and (bias is None or _plain(bias)):
        # The common case, straight to _C (which checks ranks, dtypes and sizes with the same
        # messages): the argument normalisation below costs ~3-15 us per call, as much as a
        # 99%-sparse BERT-sized SpMV.
        return _C.csr_linear(x, indptr, indices, values, bias)
    if _is_torch_tensor(x) and x.device.type == "cuda":
        return _csr_linear_cuda(x, indptr, indices, values, bias)
    x_np = _to_numpy(x, "x", _F32, 2, "[B, K]")
    args = (
        _to_numpy(indptr, "indptr", _IDX, 1, "[N + 1]"),
        _to_numpy(indices, "indices", _IDX, 1, "[nnz]"),
        _to_numpy(values, "values", _F32, 1, "[nnz]"),
        None if bias is None else _to_numpy(bias, "bias", _F32, 1, "[N]"),
    )
    y = _C.csr_linear(x_np, *args)
    if _is_torch_tensor(x):
        import torch  # already imported by whoever made x

        return torch.from_numpy(y)
    return y


def _csr_linear_cuda(x: Any, indptr: Any, indices: Any, values: Any, bias: Optional[Any]) -> Any:
    import torch  # already imported by whoever made x

    named = {"indptr": indptr, "indices": indices, "values": values}
    if bias is not None:
        named["bias"] = bias
    for arg, t in named.items():
        if not _is_torch_tensor(t) or t.device != x.device:
            where = f"device '{t.device}'" if _is_torch_tensor(t) else type(t).__name__
            raise ValueError(f"{_OP}: argument '{arg}': expected a tensor on x's device '{x.device}', got {where}")
    if x.dim() != 2:
        raise ValueError(f"{_OP}: argument 'x': expected a 2-D array [B, K], got ndim={x.dim()} with shape "
                         f"{tuple(x.shape)}")
    x = x.detach().contiguous()
    named = {k: v.detach().contiguous() for k, v in named.items()}
    out = torch.empty((x.shape[0], len(named["indptr"]) - 1 if named["indptr"].dim() == 1 else 0),
                      dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        return _C.csr_linear(x, named["indptr"], named["indices"], named["values"], named.get("bias"), out)
