"""Atomic file output shared by the artifact writer, the compressor's checkpoints and ``pyserve export``."""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output", "read_pem"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask. Linux reports it in /proc/self/status (kernel 4.7+), which reads it
    without changing it; elsewhere reading it means setting it for a moment (another thread
    creating a file in that moment would get 0o022), so pyserve's own writers are serialised."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory (created if missing); when the block succeeds
    the file is fsynced and renamed onto ``path`` in one step, and when it raises (Ctrl-C included)
    it is removed, so ``path`` is never half-written and an existing file is never damaged.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask; mkstemp
    alone makes it 0600, which the unprivileged user of a model-repository image could not read).
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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_pem(path: str | os.PathLike, what: str, *, key: bool = False) -> bytes:
    """The bytes of PEM file ``path`` for gRPC TLS credentials: a private key (``key=True``) or
    certificates (a certificate chain or CA bundle).

    Raises ValueError naming ``what`` (the argument or flag) when the file cannot be read, holds no
    ``-----BEGIN`` line, or holds no block of the expected kind (e.g. certificate and key swapped,
    which gRPC itself reports only as a failed bind or handshake).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {str(path)!r} is not a PEM file (no '-----BEGIN' line)")
    wanted = b"PRIVATE KEY-----" if key else b"CERTIFICATE-----"
    if wanted not in data:
        kind = "a private key" if key else "a certificate"
        raise ValueError(f"{what}: {str(path)!r} holds no {wanted.decode().rstrip('-')} block (expected {kind})")
    return data
