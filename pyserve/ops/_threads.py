"""The thread count shared by every OpenMP kernel of ``pyserve._C``."""

from __future__ import annotations

import numbers

from pyserve import _C


def set_num_threads(n: int) -> None:
    """Set how many OpenMP threads the pyserve kernels use.

    Parameters
    ----------
    n : int
        Threads, ``>= 1``. The setting is process-wide: it applies to kernels called from any
        Python thread (unlike ``omp_set_num_threads``, which only affects its calling thread).
        Without OpenMP the value is recorded and kernels run on one thread.

    Raises
    ------
    ValueError
        If ``n`` is not an integer or is less than 1.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"set_num_threads: argument 'n': expected an integer >= 1, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"set_num_threads: argument 'n': expected an integer >= 1, got {n}")
    _C.set_num_threads(min(int(n), 2**31 - 1))


def get_num_threads() -> int:
    """Number of OpenMP threads the pyserve kernels use (default: ``omp_get_max_threads()``,
    which honours ``OMP_NUM_THREADS``)."""
    return _C.get_num_threads()
