"""Multi-head attention straight from a fused query/key/value projection (``csrc/quant/attention_kernel.cpp``).

A transformer layer whose Q, K and V Linear layers were merged into one (``[B, S, 3 E]``: queries,
keys, values side by side, ``E = heads * head_size``; ``pyserve.artifact.kernels`` does this at load)
needs, per head ``h`` and batch row ``b`` (Vaswani et al. 2017, "Attention Is All You Need",
sections 3.2.1-3.2.2)::

    out[b, :, h] = softmax(scale * Q_h K_h^T + mask[b]) V_h          # [S, head_size]

with the heads side by side in the output, ``[B, S, E]``: what
``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).reshape(B, S, E)``
of the ``[B, H, S, D]`` views computes, in one native call without the views, the transposes and the
copy. fp32 throughout by default; within float rounding of torch (a different summation order and a
polynomial exp, not bit-identical). The AVX2 kernel covers head sizes 16 to 256 in steps of 16
(MiniLM: 32, BERT-base: 64); others take a scalar loop (correct, slow: :func:`attention_qkv_fast`
says which).

``precision="bf16"`` trades precision for speed where the CPU has AVX-512 BF16 (Intel Cooper Lake,
Sapphire Rapids and later; AMD Zen 4 and later; :func:`attention_qkv_bf16` says whether it runs):
Q, K, V and the softmax's exponentials (there by a cheaper polynomial, within about 3e-6 relative
of exp) are rounded to bfloat16 (8 significant bits, round to nearest even) and every product is
summed in fp32 by ``vdpbf16ps``, which does two multiply-adds per lane
and instruction (twice the fp32 FMA's); the scale, the mask, the softmax's maximum and sum and the
final division stay fp32. The scores then carry a relative error of about 2^-8 of
``|q| |k|``, the outputs of about 2^-8 of the values (the bfloat16 format: Kalamkar et al. 2019, "A
Study of BFLOAT16 for Deep Learning Training", section 2). Two edges of the format: values of
magnitude above about 3.39e38 round to infinity (inf or NaN outputs where fp32 stays finite), and
``vdpbf16ps`` flushes subnormal inputs and results to zero (outputs below about 1.2e-38 become 0).
Elsewhere ``"bf16"`` computes in fp32. In either precision the weighted sum is accumulated before
the division by the exponentials' sum (as torch's flash-attention kernel does), so values within a
factor S of the float32 maximum can overflow to inf.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pyserve import _C
from pyserve.ops.quant import _check_int, _is_torch_tensor, _like, _to_numpy

__all__ = ["attention_qkv", "attention_qkv_bf16", "attention_qkv_fast"]

_OP = "attention_qkv"


def attention_qkv_fast(head_size: int) -> bool:
    """Whether :func:`attention_qkv` runs its AVX2 kernel for ``head_size`` on this CPU."""
    return bool(_C.attention_qkv_fast(_check_int(head_size, "attention_qkv_fast", "head_size")))


def attention_qkv_bf16(head_size: int) -> bool:
    """Whether :func:`attention_qkv` with ``precision="bf16"`` runs its bfloat16 kernel for
    ``head_size`` on this CPU (the AVX2 kernel's head sizes, AVX-512 BF16, and
    ``PYSERVE_DISABLE_AVX512`` unset); when False, ``"bf16"`` computes in fp32."""
    return bool(_C.attention_qkv_bf16(_check_int(head_size, "attention_qkv_bf16", "head_size")))


def _mask3(mask: Any, B: int, S: int) -> np.ndarray:
    """``mask`` as a C-contiguous float32 ``[B or 1, S or 1, S]`` array (size-1 dims kept: the kernel
    broadcasts them). Accepted: ``[S]``, ``[B, S]`` (a key mask per batch row), ``[B, Sq, S]`` and
    ``[B, 1, Sq, S]`` (one mask for every head, as HF transformers builds it)."""
    if _is_torch_tensor(mask) and mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"{_OP}: argument 'mask': expected one mask for all heads (shape [B, 1, S or 1, S]), "
                             f"got shape {tuple(mask.shape)}")
        if mask.shape[2] > 1 and mask.stride(2) == 0:  # an expanded key mask: pass one row, not S copies
            mask = mask[:, :, :1]
        mask = mask[:, 0]
    m = _to_numpy(mask, _OP, "mask", "float32")
    if m.ndim in (1, 2) and (m.shape[-1] != S or (m.ndim == 2 and m.shape[0] not in (1, B))):
        rows = "1" if B == 1 else f"{B} or 1"
        raise ValueError(f"{_OP}: argument 'mask': expected a key mask of shape [S] = [{S}] or [B, S] = [{rows}, "
                         f"{S}] (a 2-D mask is one row of key offsets per batch row, not SDPA's [L, S]: pass "
                         f"[B, S, S] or [B, 1, S, S] for per-query masks), got shape {m.shape}")
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"{_OP}: argument 'mask': expected one mask for all heads (shape [B, 1, S or 1, S]), "
                             f"got shape {m.shape}")
        m = m[:, 0]
    elif m.ndim == 2:
        m = m[:, None, :]
    elif m.ndim == 1:
        m = m[None, None, :]
    elif m.ndim != 3:
        raise ValueError(f"{_OP}: argument 'mask': expected 1 to 4 dims, got shape {m.shape}")
    return np.ascontiguousarray(m)


def attention_qkv(qkv: Any, heads: int, mask: Any = None, scale: float | None = None,
                  precision: str = "fp32") -> Any:
    """Multi-head attention of a fused Q|K|V projection (module docstring).

    Parameters
    ----------
    qkv : numpy.ndarray or CPU torch.Tensor
        ``[B, S, 3 E]`` float32 (any layout: copied when not C-contiguous).
    heads : int
        Number of heads ``H`` >= 1; ``E`` must be a multiple of it (``head_size = E / H``).
    mask : array or tensor, optional
        Additive float32 mask on the scores, broadcast over heads: ``[S]``, ``[B, S]`` (per key:
        one row per batch row, unlike SDPA's 2-D ``[L, S]``), ``[B, S, S]`` or ``[B, 1, S, S]``
        (size-1 dims broadcast; HF transformers' extended mask with the most negative float at
        excluded keys is the usual one). A query whose every key is
        excluded that way gets the mean of the values, as in torch; with ``-inf`` everywhere, NaN.
    scale : float, optional
        Factor on the scores before the mask; default ``1 / sqrt(head_size)``.
    precision : ``"fp32"`` (default) or ``"bf16"``
        ``"bf16"``: bfloat16 products summed in fp32 where :func:`attention_qkv_bf16` (module
        docstring: twice the multiply-adds per instruction, outputs within about 2^-8 of the values'
        magnitude), fp32 elsewhere.

    Returns
    -------
    ``[B, S, E]`` float32, the same kind (numpy or torch) as ``qkv``.

    Raises
    ------
    ValueError
        A wrong dtype, rank or shape of ``qkv`` or ``mask`` (the message names the argument), ``heads``
        not an int >= 1 or not dividing ``E``, a non-finite ``scale``, a CUDA tensor, ``precision``
        not ``"fp32"`` or ``"bf16"``.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"{_OP}: argument 'precision': expected 'fp32' or 'bf16', got {precision!r}")
    heads = _check_int(heads, _OP, "heads")
    x = _to_numpy(qkv, _OP, "qkv", "float32")
    if x.ndim != 3:
        raise ValueError(f"{_OP}: argument 'qkv': expected [B, S, 3 E] (3 dims), got shape {x.shape}")
    if x.shape[2] == 0 or x.shape[2] % 3 != 0:
        raise ValueError(f"{_OP}: argument 'qkv': expected a last dim of 3 * heads * head_size (Q, K and V side by "
                         f"side), got shape {x.shape}")
    if heads < 1 or x.shape[2] % (3 * heads) != 0:
        raise ValueError(f"{_OP}: argument 'heads': expected >= 1 and 3 * heads dividing qkv.shape[2] = "
                         f"{x.shape[2]}, got {heads}")
    if scale is None:
        scale = 1.0 / math.sqrt(max(x.shape[2] // (3 * heads), 1))
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"{_OP}: argument 'scale': expected a float, got {type(scale).__name__}")
    m = None if mask is None else _mask3(mask, x.shape[0], x.shape[1])
    return _like(_C.attention_qkv(x, heads, m, float(scale), precision), qkv)
