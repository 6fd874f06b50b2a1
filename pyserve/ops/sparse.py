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

Prepared weights (:func:`pack_csr_weight`): a validated copy in SELL-8-sigma layout (Kreutzer et al.
2014) with 16-bit column indices where ``K <= 65536``; ``csr_linear(x, packed, bias=b)`` then runs
without any per-call index check, 8 rows per AVX2 register for ``B == 1``
(``csrc/sparse/csr_packed_kernel.h``). A loaded artifact's CSR layers use it
(:mod:`pyserve.artifact.kernels`, through :func:`_pin_csr`).

CUDA: one warp per output row; for B < 32 lanes over the row's nonzeros, batch rows in chunks of
8 per pass, a warp-shuffle reduction per batch row; for B >= 32 x is transposed once and the lanes
run over the batch (``csr_kernel.cu``); the same launch validates the CSR structure on the device.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

import numpy as np

from pyserve import _C

__all__ = ["csr_linear", "pack_csr_weight"]

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


def csr_linear(x: Any, indptr: Any, indices: Optional[Any] = None, values: Optional[Any] = None,
               bias: Optional[Any] = None) -> Any:
    """Sparse linear layer ``y = x @ W.T + bias`` with ``W [N, K]`` in CSR form.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        ``[B, K]`` float32 activations, any strides (non-contiguous or transposed inputs are copied
        to C order first). ``B = 1`` is the SpMV case; ``B = 0`` gives an empty ``[0, N]`` result.
    indptr : numpy.ndarray, torch.Tensor or pyserve._C.CsrPackedWeight
        ``[N + 1]`` int32 or int64 row pointers: row ``n`` owns nonzeros
        ``indptr[n] : indptr[n + 1]``. ``indptr[0] == 0``, non-decreasing, ``indptr[N] == nnz``.
        Or the whole weight from :func:`pack_csr_weight` (CPU ``x`` only; then ``indices`` and
        ``values`` stay None and ``bias`` is passed by keyword): the same result to fp32 rounding,
        faster, with no per-call index check.
    indices : numpy.ndarray or torch.Tensor
        ``[nnz]`` int32 or int64 column indices, in ``[0, K)`` and strictly increasing within each
        row (canonical CSR, as ``scipy.sparse.csr_matrix`` after ``sum_duplicates()``; it is also
        what ``torch.Tensor.to_sparse_csr()`` produces). Required with raw ``indptr``.
    values : numpy.ndarray or torch.Tensor
        ``[nnz]`` float32 nonzero values. Required with raw ``indptr``.
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
    runs on torch's current stream, validates ``indptr`` and ``indices`` inside the kernel and
    copies back one 8-byte word (a synchronisation of that stream); only for a malformed structure are ``indptr``
    and ``indices`` copied to the host, to name the first offending position. On that error an
    ``out`` array passed to ``_C.csr_linear`` holds garbage.
    """
    if isinstance(indptr, _C.CsrPackedWeight):
        return _csr_linear_packed(x, indptr, indices, values, bias)
    if indices is None or values is None:
        arg = "indices" if indices is None else "values"
        raise ValueError(f"{_OP}: argument '{arg}': expected a [nnz] array with a raw indptr, got None "
                         "(only a CsrPackedWeight from pack_csr_weight carries its own indices and values)")
    if _plain(x) and _plain(indptr) and _plain(indices) and _plain(values) and (bias is None or _plain(bias)):
        # The common case, straight to _C (which checks ranks, dtypes and sizes with the same
        # messages): the argument normalisation below costs ~3-15 us per call, as much as a
        # 99%-sparse BERT-sized SpMV.
        return _C.csr_linear(x, indptr, indices, values, bias)
    if _is_torch_tensor(x) and x.device.type == "cuda":
        return _csr_linear_cuda(x, indptr, indices, values, bias)
    packed = _cached_csr(indptr, indices, values) if _CSR_CACHE and _is_torch_tensor(values) else None
    if packed is not None and _is_torch_tensor(x) and x.dim() == 2 and x.shape[1] == packed.shape[1]:
        return _csr_linear_packed(x, packed, None, None, bias)  # a loaded artifact's weight (_pin_csr)
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
    views = [_cuda_view(t) for t in (x, named["indptr"], named["indices"], named["values"], named.get("bias"), out)]
    with torch.cuda.device(x.device):
        _C.csr_linear(*views, False, torch.cuda.current_stream(x.device).cuda_stream)
    return out  # the tensors above stay alive until here, so the pointers in the views stay valid


class _CudaView:
    """A C-contiguous CUDA tensor's ``__cuda_array_interface__`` (v2), built once.

    torch builds the interface in Python on every attribute access (about 2.2 us on the CI CPU;
    this one about 0.9 us), and ``_C.csr_linear`` reads it for six arrays per call. Holds only the
    pointer: the caller keeps the tensor alive.
    """

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, typestr: str, t: Any) -> None:
        self.__cuda_array_interface__ = {"typestr": typestr, "shape": tuple(t.shape), "strides": None,
                                         "data": (t.data_ptr(), False), "version": 2}


_TYPESTR: dict = {}  # torch dtype -> typestr, filled on first use (torch is imported lazily)


def _cuda_view(t: Any) -> Any:
    """``t`` (contiguous, on a CUDA device) as a _CudaView, or ``t`` itself for other dtypes (so that
    ``_C`` reports them with torch's own interface) and for None."""
    if t is None:
        return None
    if not _TYPESTR:
        import torch  # already imported by whoever made t

        _TYPESTR.update({torch.float32: "<f4", torch.int32: "<i4", torch.int64: "<i8"})
    typestr = _TYPESTR.get(t.dtype)
    return t if typestr is None else _CudaView(typestr, t)


def _csr_linear_packed(x: Any, packed: Any, indices: Any, values: Any, bias: Optional[Any]) -> Any:
    if indices is not None or values is not None:
        arg = "indices" if indices is not None else "values"
        raise ValueError(f"{_OP}: argument '{arg}': expected None with a CsrPackedWeight (it carries its own "
                         f"indices and values; pass bias by keyword), got {_kind(indices if arg == 'indices' else values)}")
    if _is_torch_tensor(x) and x.device.type != "cpu":
        raise ValueError(f"{_OP}: argument 'x': expected a CPU tensor with a CsrPackedWeight (pack_csr_weight is "
                         f"CPU-only; pass indptr, indices and values on x's device), got a tensor on device '{x.device}'")
    x_np = x if _plain(x) else _to_numpy(x, "x", _F32, 2, "[B, K]")
    b_np = bias if bias is None or _plain(bias) else _to_numpy(bias, "bias", _F32, 1, "[N]")
    y = _C.csr_linear_packed(x_np, packed, b_np)
    if _is_torch_tensor(x):
        import torch  # already imported by whoever made x

        return torch.from_numpy(y)
    return y


def pack_csr_weight(indptr: Any, indices: Any, values: Any, K: int) -> "_C.CsrPackedWeight":
    """Validate a CSR weight ``W [N, K]`` once and pack it for :func:`csr_linear` (CPU).

    Parameters
    ----------
    indptr : numpy.ndarray or torch.Tensor
        ``[N + 1]`` int32 or int64 row pointers (``indptr[0] == 0``, non-decreasing,
        ``indptr[N] == nnz``).
    indices : numpy.ndarray or torch.Tensor
        ``[nnz]`` int32 or int64 column indices in ``[0, K)``, strictly increasing within each row.
    values : numpy.ndarray or torch.Tensor
        ``[nnz]`` float32.
    K : int
        Number of columns of ``W`` (the ``K`` of the ``x [B, K]`` it will multiply),
        ``0 <= K < 2**31``.

    Returns
    -------
    pyserve._C.CsrPackedWeight
        An immutable copy (``.shape`` ``(N, K)``, ``.nnz``, ``.nbytes``, ``.index_bits``,
        ``.padding_ratio``) in SELL-8-sigma layout (Kreutzer, Hager, Wellein, Fehske & Bishop,
        SIAM J. Sci. Comput. 2014, section 2): rows in slices of 8, each slice's entries stored
        column-major (entry ``j`` of its 8 rows side by side), padded to its longest row; column
        indices as uint16 when ``K <= 65536`` (6 bytes per nonzero instead of CSR's 8), else int32;
        rows sorted by length within windows of 64 rows when natural slices would pad by more
        than 5%. Pass it to :func:`csr_linear` as ``indptr`` (``csr_linear(x, packed, bias=b)``).

    Raises
    ------
    ValueError
        Naming the argument: not an array/tensor, wrong rank or dtype, ``len(values) !=
        len(indices)``, ``indptr`` empty, not starting at 0, decreasing or not ending at ``nnz``, a
        column index negative, ``>= K`` or not strictly increasing within its row (the message names
        the first offending position), ``K`` not an int in ``[0, 2**31)``.

    Notes
    -----
    The validation happens here, once, in O(N + nnz); :func:`csr_linear` with the packed weight
    checks only ``x`` and ``bias``. Results equal :func:`csr_linear` on the raw arrays to fp32
    rounding (the summation order differs), for any thread count. :func:`csr_linear` never packs
    a caller's arrays behind its back; only tensors pyserve owns (a loaded artifact's, pinned by
    :mod:`pyserve.artifact.kernels`) take the packed kernel implicitly.
    """
    op = "pack_csr_weight"
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)):
        raise ValueError(f"{op}: argument 'K': expected an int (the number of columns of W), got {type(K).__name__}")
    if not 0 <= int(K) < 2**31:
        raise ValueError(f"{op}: argument 'K': expected 0 <= K < 2**31 (the number of columns of W), got {int(K)}")
    def conv(obj: Any, arg: str, dtypes: tuple, hint: str) -> np.ndarray:
        try:
            return _to_numpy(obj, arg, dtypes, 1, hint)
        except ValueError as exc:
            raise ValueError(str(exc).replace(f"{_OP}:", f"{op}:", 1)) from None

    return _C.pack_csr_weight(conv(indptr, "indptr", _IDX, "[N + 1]"), conv(indices, "indices", _IDX, "[nnz]"),
                              conv(values, "values", _F32, "[nnz]"), int(K))


class _CsrEntry:
    __slots__ = ("refs", "state", "K", "packed")


_CSR_CACHE: dict[int, _CsrEntry] = {}
_CSR_LOCK = threading.Lock()


def _tensor_state(ts: tuple) -> tuple:
    return tuple((t._version, t.data_ptr(), tuple(t.shape)) for t in ts)


def _drop_csr(key: int, ref: Any) -> None:
    with _CSR_LOCK:
        entry = _CSR_CACHE.get(key)
        if entry is not None and entry.refs[2] is ref:
            del _CSR_CACHE[key]


def _pin_csr(indptr: Any, indices: Any, values: Any, K: int) -> bool:
    """Pack the CPU torch CSR tensors ``(indptr, indices, values)`` of a ``[N, K]`` weight now and let
    :func:`csr_linear` use the packed copy whenever it is given these three tensors (while
    ``values`` lives; re-packed after an in-place torch op on any of them). For weights pyserve owns
    (a loaded artifact's); returns False, and packs nothing, for anything else (not CPU torch
    tensors, inference tensors whose changes torch cannot track, or an invalid structure)."""
    import torch

    ts = (indptr, indices, values)
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
               and not t.requires_grad and not t.is_inference() for t in ts):
        return False
    try:
        packed = pack_csr_weight(indptr, indices, values, K)
    except ValueError:
        return False
    key = id(values)
    entry = _CsrEntry()
    entry.refs = tuple(weakref.ref(t) for t in ts[:2]) + (weakref.ref(values, lambda ref, key=key: _drop_csr(key, ref)),)
    entry.state, entry.K, entry.packed = _tensor_state(ts), int(K), packed
    with _CSR_LOCK:
        _CSR_CACHE[key] = entry
    return True


def _cached_csr(indptr: Any, indices: Any, values: Any) -> Any:
    """The packed form of tensors pinned by :func:`_pin_csr` (None for anything else)."""
    entry = _CSR_CACHE.get(id(values))
    if entry is None or entry.refs[0]() is not indptr or entry.refs[1]() is not indices or entry.refs[2]() is not values:
        return None
    ts = (indptr, indices, values)
    state = _tensor_state(ts)
    if state != entry.state:  # changed by an in-place torch op: re-pack (or give up if now invalid)
        try:
            entry.packed = pack_csr_weight(indptr, indices, values, entry.K)
        except ValueError:
            return None
        entry.state = state
    return entry.packed
