"""What the native module was built with."""

from __future__ import annotations

from typing import Any

from pyserve import _C


def build_info() -> dict[str, Any]:
    """Describe the compiled native module ``pyserve._C``.

    Returns
    -------
    dict
        ``version`` (str, the package version), ``compiler`` (str, e.g. ``"GNU 12.2.0"``),
        ``avx2`` (bool, AVX2/FMA code paths compiled in), ``avx512_vnni`` (bool, the AVX-512 VNNI
        int8 paths and the fp32 attention's AVX-512 kernel compiled in), ``avx512_bf16`` (bool, the AVX-512 BF16 attention compiled in),
        ``openmp`` (bool), ``cuda`` (bool, the CUDA sources were
        compiled), ``cuda_archs`` (list of int SM versions such as ``[75, 80, 90]``; empty without
        CUDA). Which paths this CPU runs: :func:`cpu_kernels`.
    """
    return _C.build_info()


def cpu_kernels() -> dict[str, bool]:
    """The CPU code paths this process runs: ``{"avx2": bool, "avx512": bool, "avx512_vnni": bool,
    "avx512_bf16": bool}``.

    ``avx512``: the fp32 attention's AVX-512 kernel (``attention_qkv``; compiled in where
    ``build_info()["avx512_vnni"]`` is). A path runs when it is compiled in (:func:`build_info`), the
    CPU has its instructions (AVX2 and FMA; AVX-512 F, BW and VL for ``avx512``: Intel Xeon from
    Skylake-SP, AMD from Zen 4; AVX-512 F, BW, VL and VNNI: Intel Xeon from Cascade Lake, AMD from Zen 4; AVX-512 BF16:
    Intel Cooper Lake and Sapphire Rapids or later (not Ice Lake), AMD from Zen 4) and the environment does not turn it off:
    ``PYSERVE_DISABLE_AVX512`` (any value) keeps the int8 kernels and the fp32 attention on AVX2 and
    the bfloat16 attention on fp32, ``PYSERVE_DISABLE_AVX2`` turns all of them off (portable C++). Each path
    reads them once, the first time it is considered, and keeps its answer for the process: set them
    before the process starts (changing them later can leave paths disagreeing). The int8 kernels and the fp32 attention return the same values bit
    for bit on every path (the attention's portable loop aside: another exponential); ``attention_qkv(precision="bf16")`` runs bfloat16 products only where ``avx512_bf16``.
    """
    return _C.cpu_kernels()


def cuda_device_count() -> int:
    """Number of CUDA devices the CUDA runtime sees.

    Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device);
    never raises. Call it in a subprocess when a broken driver must not take the caller down.
    """
    return _C.cuda_device_count()
