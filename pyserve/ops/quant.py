"""int8 and codebook (weight-shared) linear layers, and the packing of 2..8-bit codebook indices.

The kernels live in ``csrc/quant/`` (``pyserve._C``); this module only normalises arguments
(numpy arrays or CPU torch tensors; CUDA torch tensors go to the CUDA kernels when they were
compiled) and returns results of the same kind as the main input.

int8 (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", section 2; symmetric, zero point 0)
------------------------------------------------------------------------------------------------
One row ``r`` of length ``K`` (a weight row = an output channel, or an activation row) is
quantized in fp32 arithmetic as::

    amax  = max(|r|)
    scale = amax / 127                      (1.0 when this is 0: an all-zero row, or underflow)
    q     = clamp(rint(r / scale), -127, 127)   (int8; rint rounds half to even)

``int8_linear`` quantizes ``x`` per row this way at every call ("dynamic" quantization), sums
``xq[b, :] * w_int8[n, :]`` exactly in int32 and returns
``float32(acc) * (x_scale[b] * w_scale[n]) + bias[n]``. Each quantized value is within half a step
(``scale / 2``) of its input; for Gaussian ``x`` and ``w`` the result's relative (Frobenius) error
against the fp32 product is about 1.1% (the tests assert < 2% on BERT-sized shapes).

Codebooks (Han, Mao & Dally 2016, "Deep Compression", section 3)
------------------------------------------------------------------------------------------------
``W[n, k] = codebook[idx[n, k]]`` (one ``[2**bits]`` codebook for the layer) or
``codebook[n, idx[n, k]]`` (``[N, 2**bits]``, one per output channel). Indices are stored packed:
row ``n`` of ``K`` codes takes ``ceil(K * bits / 8)`` bytes; code ``k`` occupies bits
``[k * bits, (k + 1) * bits)`` of the row, bit ``j`` of a row being bit ``j % 8`` of byte ``j // 8``
(little-endian bit order, least significant bit of a code first); unused high bits are zero.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from pyserve import _C

__all__ = [
    "codebook_linear",
    "int8_linear",
    "pack_indices",
    "pack_int8_weight",
    "quantize_per_channel",
    "unpack_indices",
]


def _is_torch_tensor(obj: Any) -> bool:
    # Checked by name so that importing pyserve.ops never imports torch.
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "device") and hasattr(obj, "numpy")


def _is_cuda_tensor(obj: Any) -> bool:
    return type(obj) is not np.ndarray and _is_torch_tensor(obj) and obj.device.type == "cuda"


def _to_numpy(obj: Any, op: str, arg: str, dtype: str) -> np.ndarray:
    """A C-contiguous, native-byte-order numpy view or copy of ``obj``; dtype is checked by _C."""
    if type(obj) is np.ndarray and obj.flags.c_contiguous and obj.dtype.isnative:
        return obj  # the common case, without the checks below (microseconds per call)
    if _is_torch_tensor(obj):
        if obj.device.type != "cpu":
            raise ValueError(
                f"{op}: argument '{arg}': expected a CPU tensor (like the other inputs), got device '{obj.device}'"
            )
        obj = obj.detach().resolve_conj().resolve_neg()
        try:
            obj = obj.numpy()
        except TypeError as exc:  # dtypes numpy lacks (bfloat16, ...)
            raise ValueError(f"{op}: argument '{arg}': expected dtype {dtype}, got {obj.dtype}") from exc
    if not isinstance(obj, np.ndarray):
        raise ValueError(
            f"{op}: argument '{arg}': expected a numpy.ndarray or torch.Tensor of dtype {dtype}, "
            f"got {type(obj).__name__}"
        )
    if not obj.dtype.isnative:
        obj = obj.astype(obj.dtype.newbyteorder("="))
    return np.ascontiguousarray(obj)


def _like(result: np.ndarray, template: Any) -> Any:
    if type(template) is not np.ndarray and _is_torch_tensor(template):
        import torch

        return torch.from_numpy(result)
    return result


def _check_int(value: Any, op: str, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{op}: argument '{arg}': expected an int, got {type(value).__name__}")
    return int(value)


def quantize_per_channel(w: Any) -> tuple[Any, Any]:
    """Quantize a weight matrix to int8, symmetric, one scale per output channel (row).

    Parameters
    ----------
    w : numpy.ndarray or torch.Tensor
        ``[N, K]`` float32 (any strides; a torch tensor must be on the CPU), finite.

    Returns
    -------
    w_int8 : numpy.ndarray or torch.Tensor
        ``[N, K]`` int8 in -127..127: ``clamp(rint(w / scale), -127, 127)``, computed in fp32,
        rounding half to even.
    w_scale : numpy.ndarray or torch.Tensor
        ``[N]`` float32, ``max|w[n, :]| / 127``; **1.0** for an all-zero row (its codes are all 0),
        so ``w_int8 * w_scale[:, None]`` reproduces it exactly. Same kind as ``w``.

    Raises
    ------
    ValueError
        ``w`` not a numpy array / CPU tensor, not 2-D, not float32, or holding inf/NaN.

    Notes
    -----
    Jacob et al. 2018, section 2 (symmetric variant, zero point 0). The per-element error is at
    most ``scale / 2``. Runs in C++ (AVX2 when available, OpenMP over rows), GIL released.
    """
    op = "quantize_per_channel"
    q, scale = _C.quantize_per_channel(_to_numpy(w, op, "w", "float32"))
    return _like(q, w), _like(scale, w)


def int8_linear(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """``y = x @ (w_int8 * w_scale[:, None]).T + bias`` with int8 arithmetic.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        ``[B, K]`` float32, finite; quantized per row at each call, symmetric, exactly as
        :func:`quantize_per_channel` quantizes weight rows (fp32, round half to even, scale 1.0 for
        an all-zero row). ``B`` and ``K`` may be 0; ``K <= 131072`` (exact int32 accumulation).
    w_int8 : numpy.ndarray, torch.Tensor or pyserve._C.Int8PackedWeight
        ``[N, K]`` int8; any value -128..127 is accepted. Or the same weights from
        :func:`pack_int8_weight` (CPU only; the same result, faster; see its notes).
    w_scale : numpy.ndarray or torch.Tensor
        ``[N]`` float32, the scale of each row of ``w_int8``.
    bias : numpy.ndarray or torch.Tensor, optional
        ``[N]`` float32.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[B, N]`` float32, of the same kind as ``x``:
        ``float32(acc) * (x_scale[b] * w_scale[n]) + bias[n]``, ``acc`` the exact int32 dot
        product of the int8 rows. For Gaussian data the relative error against the fp32 product
        ``x @ w.T`` is about 1.1% (w the weights before quantize_per_channel).

    Raises
    ------
    ValueError
        Wrong type, rank or dtype of any argument; ``w_int8.shape[1] != K``; ``w_scale`` or
        ``bias`` not of length N; ``K > 131072``; inf/NaN in ``x``; CUDA and CPU arguments mixed.
    RuntimeError
        ``x`` is a CUDA tensor but pyserve was built without CUDA, or a CUDA error.

    Notes
    -----
    Jacob et al. 2018, sections 2 and 2.3. CPU, plain weights: AVX2 ``vpmaddubsw`` on ``|w|``
    (unsigned) and ``x * sign(w)`` (``vpsignb``), ``vpmaddwd`` into int32, tiles of 4 activation
    rows x 2 output channels. Packed weights: ``vpmaddubsw`` on ``w + 128`` (unsigned) and four
    activations broadcast, ``vpmaddwd``, ``vpaddd`` (3 ops per 32 multiply-adds, as fbgemm without
    its 7-bit activations) in 4-row x 16-channel tiles; exact because each activation row is split
    per call into aligned pairs with ``|x[k] + x[k+1]| <= 128`` (no int16 saturation) plus a sparse
    remainder added back through the same instruction on the packed block, and ``128 * sum(x)``
    subtracted (``csrc/quant/int8_kernel.h`` has the derivation); each row is quantized straight
    into the kernel's split buffer, kept per thread between calls. With AVX-512 VNNI
    (:func:`pyserve.ops.cpu_kernels`): one ``vpdpbusd`` per 64 multiply-adds on the packed layout,
    rows as given (no split), 8-row x 32-channel tiles. Plain weights with ``B >= 16`` are packed into a per-thread scratch buffer for
    the call and take the packed kernel (packing costs about one pass over the weights; nothing is
    kept). All paths: OpenMP over blocks of 16 channels, portable C++ fallback, the GIL released,
    and the same output bit for bit.
    CUDA: ``dp4a`` (4 int8 products per instruction): one warp per output channel for B <= 16,
    32 x 32 output tiles through shared memory for larger B (``csrc/quant/int8_kernel.cu``); the
    result is bit-identical to the CPU's and is queued on torch's current stream without a
    host synchronisation.
    """
    op = "int8_linear"
    if _is_cuda_tensor(x):
        if isinstance(w_int8, _C.Int8PackedWeight):
            raise ValueError(
                f"{op}: argument 'w_int8': expected the int8 CUDA tensor for a CUDA x, got a CPU-only "
                "Int8PackedWeight (pack_int8_weight)"
            )
        return _int8_linear_cuda(x, w_int8, w_scale, bias)
    packed = w_int8 if isinstance(w_int8, _C.Int8PackedWeight) else _cached_pack(w_int8)
    args = (
        _to_numpy(w_scale, op, "w_scale", "float32"),
        None if bias is None else _to_numpy(bias, op, "bias", "float32"),
    )
    if packed is not None:
        y = _C.int8_linear_packed(_to_numpy(x, op, "x", "float32"), packed, *args)
    else:
        y = _C.int8_linear(_to_numpy(x, op, "x", "float32"), _to_numpy(w_int8, op, "w_int8", "int8"), *args)
    return _like(y, x)


def pack_int8_weight(w_int8: Any) -> "_C.Int8PackedWeight":
    """Pack int8 weights once for :func:`int8_linear` (CPU).

    Parameters
    ----------
    w_int8 : numpy.ndarray or torch.Tensor
        ``[N, K]`` int8 (CPU), any value -128..127, ``K <= 131072``.

    Returns
    -------
    pyserve._C.Int8PackedWeight
        An immutable packed copy (``.shape`` is ``(N, K)``, ``.nbytes`` about ``N * K``: the
        weights plus 128 as uint8 in blocks of 16 channels x 4 k).
        Pass it to :func:`int8_linear` as ``w_int8``: the result is bit for bit the one the plain
        array gives, from a faster kernel (4 activation rows x 16 channels register tile, 3 AVX2
        ops per 32 multiply-adds instead of 4; with AVX-512 VNNI, 8 rows x 32 channels and one
        ``vpdpbusd`` per 64; ``csrc/quant/int8_kernel.h``).

    Raises
    ------
    ValueError
        ``w_int8`` not a 2-D int8 array or CPU tensor, or ``K > 131072``.

    Notes
    -----
    :func:`int8_linear` never keeps a packed copy of a caller's weights: plain arrays and tensors
    take the row kernel below 16 activation rows and, from 16 rows, are packed into a scratch buffer
    for that call alone (the same result; the packing costs about one pass over the weights), so a
    weight changed in any way (``w.data.copy_``, a numpy alias) is always used as it is. Only tensors pyserve owns and never hands out for writing (the int8
    weights of a loaded artifact, :mod:`pyserve.artifact.kernels`) are packed at load and cached by
    the tensor object (``_pin_packed``); an in-place torch op on one (it bumps the version counter)
    re-packs it.
    """
    return _C.pack_int8_weight(_to_numpy(w_int8, "pack_int8_weight", "w_int8", "int8"))


class _PackEntry:
    __slots__ = ("ref", "version", "ptr", "shape", "packed")


_PACK_CACHE: dict[int, _PackEntry] = {}
_PACK_LOCK = threading.Lock()


def _drop_packed(key: int, ref: Any) -> None:
    with _PACK_LOCK:
        entry = _PACK_CACHE.get(key)
        if entry is not None and entry.ref is ref:
            del _PACK_CACHE[key]


def _pin_packed(w: Any) -> bool:
    """Pack CPU int8 torch weight tensor ``w`` now and let :func:`int8_linear` use the packed copy
    whenever it is given ``w`` (while ``w`` lives; re-packed after an in-place torch op). For
    weights pyserve owns (a loaded artifact's); returns False, and packs nothing, for anything the
    packed kernel cannot take or whose changes torch cannot track (inference tensors)."""
    import torch

    if (not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype != torch.int8 or w.dim() != 2
            or not w.is_contiguous() or w.requires_grad or w.is_inference() or w.shape[1] > 131072):
        return False
    key = id(w)
    entry = _PackEntry()
    entry.ref = weakref.ref(w, lambda ref, key=key: _drop_packed(key, ref))
    entry.version, entry.ptr, entry.shape = w._version, w.data_ptr(), tuple(w.shape)
    entry.packed = _C.pack_int8_weight(w.numpy())
    with _PACK_LOCK:
        _PACK_CACHE[key] = entry
    return True


def _cached_pack(w: Any) -> Any:
    """The packed form of a weight tensor pinned by :func:`_pin_packed` (None for anything else)."""
    entry = _PACK_CACHE.get(id(w))
    if entry is None or entry.ref() is not w:
        return None
    version, ptr, shape = w._version, w.data_ptr(), tuple(w.shape)
    if (entry.version, entry.ptr, entry.shape) != (version, ptr, shape):
        if not (w.is_contiguous() and w.dim() == 2):
            return None
        entry.packed = _C.pack_int8_weight(w.numpy())  # changed by an in-place torch op: re-pack
        entry.version, entry.ptr, entry.shape = version, ptr, shape
    return entry.packed


def pack_indices(idx: Any, bits: int) -> Any:
    """Pack codebook indices of ``bits`` bits each, little-endian bit order.

    Parameters
    ----------
    idx : numpy.ndarray or torch.Tensor
        ``[N, K]`` uint8, every value below ``2**bits``.
    bits : int
        2..8.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[N, ceil(K * bits / 8)]`` uint8 (layout in the module docstring), same kind as ``idx``.

    Raises
    ------
    ValueError
        ``bits`` not an int in 2..8; ``idx`` not 2-D uint8; a value ``>= 2**bits`` (its position
        is named).

    Notes
    -----
    Deep Compression section 3 stores ``log2(k)``-bit indices per weight; this is that storage.
    """
    op = "pack_indices"
    bits = _check_int(bits, op, "bits")
    return _like(_C.pack_indices(_to_numpy(idx, op, "idx", "uint8"), bits), idx)


def unpack_indices(packed: Any, bits: int, K: int) -> Any:
    """Inverse of :func:`pack_indices`.

    Parameters
    ----------
    packed : numpy.ndarray or torch.Tensor
        ``[N, ceil(K * bits / 8)]`` uint8.
    bits : int
        2..8.
    K : int
        Number of codes per row, ``>= 0``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[N, K]`` uint8, same kind as ``packed``. Padding bits are ignored.

    Raises
    ------
    ValueError
        ``bits`` outside 2..8; ``K`` negative; ``packed`` not 2-D uint8 or its rows not exactly
        ``ceil(K * bits / 8)`` bytes (short rows are never read past).
    """
    op = "unpack_indices"
    bits = _check_int(bits, op, "bits")
    K = _check_int(K, op, "K")
    return _like(_C.unpack_indices(_to_numpy(packed, op, "packed", "uint8"), bits, K), packed)


def codebook_linear(x: Any, packed: Any, codebook: Any, bits: int, bias: Any = None) -> Any:
    """``y = x @ W.T + bias`` with ``W[n, k] = codebook[idx[n, k]]`` and ``idx`` stored packed.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        ``[B, K]`` float32.
    packed : numpy.ndarray or torch.Tensor
        ``[N, ceil(K * bits / 8)]`` uint8, from :func:`pack_indices`.
    codebook : numpy.ndarray or torch.Tensor
        ``[2**bits]`` float32 (one codebook for the layer) or ``[N, 2**bits]`` (one per output
        channel: ``W[n, k] = codebook[n, idx[n, k]]``).
    bits : int
        2..8.
    bias : numpy.ndarray or torch.Tensor, optional
        ``[N]`` float32.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[B, N]`` float32, same kind as ``x``. Equal to ``x @ W.T + bias`` up to fp32 summation
        order (the kernel sums in a different order than BLAS).

    Raises
    ------
    ValueError
        ``bits`` outside 2..8; wrong type, rank or dtype; ``packed`` rows not
        ``ceil(K * bits / 8)`` bytes; ``codebook`` not ``[2**bits]`` or ``[N, 2**bits]``; ``bias``
        not ``[N]``; CUDA and CPU arguments mixed.
    RuntimeError
        ``x`` is a CUDA tensor but pyserve was built without CUDA, or a CUDA error.

    Notes
    -----
    Han, Mao & Dally 2016, "Deep Compression", section 3. CPU, bits <= 5 with AVX2: codes are
    taken straight from the packed row and looked up in registers — bits 4 and 5 with ``vpshufb``
    on the four byte planes of the codebook (32 weights per shuffle, exact), bits 2 and 3 with
    ``vpermps`` — then multiplied with FMA: fused with the dot product at B = 1, through a
    decoded fp32 row shared by the B rows otherwise. An activation-side lookup table (LUT-GEMM,
    Park et al. 2022) measured 2-4x slower on this CPU (``benchmarks/native/codebook_lut.cpp``). Bits 6..8 (and CPUs without AVX2): the row is
    unpacked to bytes and looked up with loads. OpenMP over rows, GIL released. CUDA: one warp per
    output row, the codebook in shared memory, 8 codes (``bits`` bytes) decoded per lane and step,
    batch chunks of 8, queued on torch's current stream without a host synchronisation. Decoding on the fly measured 4-7x faster at B = 1
    than accumulating x into per-centroid bins (``benchmarks/native/codebook_binning.cpp``).
    """
    op = "codebook_linear"
    bits = _check_int(bits, op, "bits")
    if _is_cuda_tensor(x):
        return _codebook_linear_cuda(x, packed, codebook, bits, bias)
    y = _C.codebook_linear(
        _to_numpy(x, op, "x", "float32"),
        _to_numpy(packed, op, "packed", "uint8"),
        _to_numpy(codebook, op, "codebook", "float32"),
        bits,
        None if bias is None else _to_numpy(bias, op, "bias", "float32"),
    )
    return _like(y, x)


# --- CUDA faces: torch CUDA tensors, checked here, then device pointers to _C -----------------


def _cuda_arg(t: Any, op: str, arg: str, device: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    if not _is_cuda_tensor(t) or t.device != device:
        raise ValueError(f"{op}: argument '{arg}': expected a torch tensor on {device} (like x), got {type(t).__name__}"
                         + (f" on {t.device}" if _is_torch_tensor(t) else ""))
    if t.dtype != dtype:
        raise ValueError(f"{op}: argument '{arg}': expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: argument '{arg}': expected shape {shape}, got {tuple(t.shape)}")
    return t.contiguous()


def _int8_linear_cuda(x: Any, w_int8: Any, w_scale: Any, bias: Any) -> Any:
    import torch

    op = "int8_linear"
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"{op}: argument 'x': expected a 2-D float32 tensor, got {x.dim()}-D {x.dtype}")
    B, K = x.shape
    if not _is_torch_tensor(w_int8) or w_int8.dim() != 2:
        raise ValueError(f"{op}: argument 'w_int8': expected a 2-D CUDA tensor")
    N = w_int8.shape[0]
    x = x.contiguous()
    w = _cuda_arg(w_int8, op, "w_int8", x.device, torch.int8, (N, K))
    s = _cuda_arg(w_scale, op, "w_scale", x.device, torch.float32, (N,))
    b = None if bias is None else _cuda_arg(bias, op, "bias", x.device, torch.float32, (N,))
    y = torch.empty((B, N), dtype=torch.float32, device=x.device)
    # One workspace allocation: xq [B, K] int8, then (16-byte aligned) x_scale [B] fp32.
    xq_bytes = (B * K + 15) // 16 * 16
    ws = torch.empty((xq_bytes + 4 * B,), dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        # Queued on torch's current stream, not waited for: y is ready in stream order like any
        # torch result (the workspace goes back to the caching allocator in that order too).
        _C.int8_linear_cuda(x.data_ptr(), w.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                            ws.data_ptr(), ws.data_ptr() + xq_bytes, B, K, N,
                            torch.cuda.current_stream(x.device).cuda_stream)
    return y


def _codebook_linear_cuda(x: Any, packed: Any, codebook: Any, bits: int, bias: Any) -> Any:
    import torch

    op = "codebook_linear"
    if not 2 <= bits <= 8:
        raise ValueError(f"{op}: argument 'bits': expected an integer in 2..8, got {bits}")
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"{op}: argument 'x': expected a 2-D float32 tensor, got {x.dim()}-D {x.dtype}")
    B, K = x.shape
    if not _is_torch_tensor(packed) or packed.dim() != 2:
        raise ValueError(f"{op}: argument 'packed': expected a 2-D CUDA tensor")
    N = packed.shape[0]
    C = 1 << bits
    x = x.contiguous()
    p = _cuda_arg(packed, op, "packed", x.device, torch.uint8, (N, (K * bits + 7) // 8))
    per_channel = _is_torch_tensor(codebook) and codebook.dim() == 2
    cb = _cuda_arg(codebook, op, "codebook", x.device, torch.float32, (N, C) if per_channel else (C,))
    b = None if bias is None else _cuda_arg(bias, op, "bias", x.device, torch.float32, (N,))
    y = torch.empty((B, N), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        # Queued on torch's current stream, not waited for (y is ready in stream order).
        _C.codebook_linear_cuda(x.data_ptr(), p.data_ptr(), cb.data_ptr(), 0 if b is None else b.data_ptr(),
                                y.data_ptr(), B, K, N, bits, per_channel, torch.cuda.current_stream(x.device).cuda_stream)
    return y
