"""Deterministic sticky assignment: a routing key hashed to a bucket in [0, 1).

BLAKE2b (RFC 7693) of ``salt \\x00 key``, first 8 bytes as a big-endian integer, divided by 2**64.
It is the same on every replica, process and Python version (Python's ``hash()`` of a str is salted
per process, so it is not used). Pure: imports only the standard library.
"""

from __future__ import annotations

import hashlib

__all__ = ["bucket", "bucket_percent"]

_SCALE = float(2**64)


def bucket(salt: str, key: str) -> float:
    """A uniform, deterministic number in [0, 1) for ``key`` under ``salt`` (e.g. the route name).

    Different salts give independent buckets for the same key (the canary split and each shadow's
    sampling use different salts, so they are not correlated).
    """
    h = hashlib.blake2b(salt.encode("utf-8") + b"\x00" + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / _SCALE


def bucket_percent(salt: str, key: str) -> float:
    """:func:`bucket` scaled to [0, 100)."""
    return 100.0 * bucket(salt, key)
