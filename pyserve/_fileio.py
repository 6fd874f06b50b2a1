"""Atomic file output shared by the artifact writer, the compressor's checkpoints and ``pyserve export``."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output"]


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory (created if missing); when the block succeeds
    the file is fsynced and renamed onto ``path`` in one step, and when it raises (Ctrl-C included)
    it is removed, so ``path`` is never half-written and an existing file is never damaged.

    The temporary name keeps ``path``'s suffix last (torch.export.save warns about a file not
    ending in ``.pt2``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
