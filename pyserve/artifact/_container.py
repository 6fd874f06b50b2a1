"""The byte container of a ``.pyserve`` file: header, JSON manifest, checksummed blobs.

Layout (all integers little-endian; see docs/artifact.md)::

    offset  size  field
    0       8     magic  b"\\x89PYSRV\\r\\n"
    8       4     u32 format_version (2; version 1 files are still read)
    12      8     u64 manifest_size_bytes
    20      8     u64 blobs_size_bytes
    28      32    SHA-256 of the manifest bytes
    60      4     u32 reserved, 0
    64      M     manifest: zlib-compressed UTF-8 JSON (version 2), plain UTF-8 JSON (version 1)
    64+M    B     blob region; each blob's offset (from the region's start), size and SHA-256 are in
                  the manifest's "blobs" table

The file size must equal 64 + M + B exactly, so a truncated or extended file is refused before any
blob is read. Writes go to a temporary file in the same directory that is renamed over the target
at the end, so an interrupted write leaves no half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

from pyserve._fileio import atomic_output

MAGIC = b"\x89PYSRV\r\n"
FORMAT_VERSION = 2
#: Versions this reader accepts. 2 differs from 1 only in the manifest being zlib-compressed (RFC 1950):
#: the JSON of a small compressed model is ~3 KB, ~12% of its file, and compresses ~2.6x.
READ_VERSIONS = (1, 2)
_HEADER = struct.Struct("<8sIQQ32sI")
HEADER_SIZE = _HEADER.size  # 64
_MAX_MANIFEST_BYTES = 64 << 20


class ArtifactError(ValueError):
    """A ``.pyserve`` file is missing, truncated, corrupt (checksum) or of an unknown format."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_container(path: str | os.PathLike, manifest: dict, blobs: dict[str, bytes]) -> int:
    """Write ``manifest`` plus ``blobs`` atomically to ``path``; returns the file size in bytes.

    The manifest's ``"blobs"`` table (name -> offset, size_bytes, sha256) is filled in here.
    """
    table, offset = {}, 0
    for name, data in blobs.items():
        table[name] = {"offset": offset, "size_bytes": len(data), "sha256": sha256(data)}
        offset += len(data)
    manifest = dict(manifest, blobs=table)
    manifest_bytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), 9)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), offset,
                          hashlib.sha256(manifest_bytes).digest(), 0)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(manifest_bytes)
            for data in blobs.values():
                fh.write(data)
    return HEADER_SIZE + len(manifest_bytes) + offset


def read_container(path: str | os.PathLike, *, verify_blobs: bool = True) -> tuple[dict, dict[str, bytes]]:
    """Read and check a container; returns ``(manifest, blobs)``.

    Raises
    ------
    ArtifactError
        Missing file, bad magic, unknown format version, size mismatch (truncated or extended),
        manifest or blob checksum mismatch, malformed manifest or blob table.
    """
    path = Path(path)
    try:
        if not path.is_file():  # a directory, FIFO or device would hang or never end
            kind = "no such artifact" if not path.exists() else "not a regular file"
            raise ArtifactError(f"{path}: {kind}")
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact: {exc.strerror or exc}") from None
    if len(data) < HEADER_SIZE:
        raise ArtifactError(f"{path}: truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, manifest_size, blobs_size, manifest_sha, reserved = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not a pyserve artifact (bad magic {magic!r})")
    if version not in READ_VERSIONS:
        raise ArtifactError(f"{path}: unsupported artifact format version {version}; this pyserve reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))}")
    if reserved != 0 or manifest_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: corrupt header (manifest size {manifest_size} bytes, reserved field {reserved})")
    expected = HEADER_SIZE + manifest_size + blobs_size
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ArtifactError(f"{path}: {kind}: header promises {expected} bytes, file has {len(data)}")
    manifest_bytes = data[HEADER_SIZE:HEADER_SIZE + manifest_size]
    if hashlib.sha256(manifest_bytes).digest() != manifest_sha:
        raise ArtifactError(f"{path}: manifest SHA-256 checksum mismatch (file is corrupt)")
    if version >= 2:
        inflate = zlib.decompressobj()
        try:
            manifest_bytes = inflate.decompress(manifest_bytes, _MAX_MANIFEST_BYTES)
        except zlib.error as exc:
            raise ArtifactError(f"{path}: manifest is not valid zlib data: {exc}") from None
        if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
            raise ArtifactError(f"{path}: manifest zlib stream is incomplete, has trailing bytes or inflates past "
                                f"{_MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("blobs"), dict):
        raise ArtifactError(f"{path}: manifest has no blob table")
    region = memoryview(data)[HEADER_SIZE + manifest_size:]
    blobs: dict[str, bytes] = {}
    for name, entry in manifest["blobs"].items():
        try:
            offset, size, digest = int(entry["offset"]), int(entry["size_bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ArtifactError(f"{path}: malformed blob table entry {name!r}") from None
        if offset < 0 or size < 0 or offset + size > blobs_size:
            raise ArtifactError(f"{path}: blob {name!r} [{offset}, {offset + size}) lies outside the {blobs_size}-byte blob region")
        blob = bytes(region[offset:offset + size])
        if verify_blobs and sha256(blob) != digest:
            raise ArtifactError(f"{path}: SHA-256 checksum mismatch in blob {name!r} (file is corrupt)")
        blobs[name] = blob
    return manifest, blobs
