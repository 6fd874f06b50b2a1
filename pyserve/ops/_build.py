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
        ``avx2`` (bool, AVX2/FMA code paths compiled in), ``openmp`` (bool), ``cuda`` (bool, the
        CUDA sources were compiled), ``cuda_archs`` (list of int SM versions such as
        ``[75, 80, 90]``; empty without CUDA).
    """
    return _C.build_info()


def cuda_device_count() -> int:
    """Number of CUDA devices the CUDA runtime sees.

    Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device);
    never raises. Call it in a subprocess when a broken driver must not take the caller down.
    """
    return _C.cuda_device_count()
