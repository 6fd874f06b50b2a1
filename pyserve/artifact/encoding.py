"""Tensor encodings stored in an artifact, and their exact decoders.

Three encodings (docs/artifact.md gives the byte layout):

``raw``
    The tensor's bytes, little-endian, C order. Used for biases and anything left uncompressed.

``sparse``
    Deep Compression's storage of a pruned, weight-shared layer (Han, Mao, Dally, ICLR 2016,
    arXiv 1510.00149, section 2 and figure 2): the flattened (row-major) tensor keeps only its
    non-zero entries, each stored as

    * a **relative index**: the gap to the previous stored entry, ``1 .. 2**index_bits``, kept as
      the symbol ``gap - 1`` (uint8). When a gap exceeds ``2**index_bits`` a *filler* entry with
      value zero is inserted at the largest gap, as in the paper;
    * a **value**: a codebook index (uint8, ``values="codebook"``) into a per-tensor fp32
      codebook whose entry 0 is reserved for 0.0 (the fillers), or the raw fp32 value
      (``values="raw"``, fillers store 0.0).

    With ``entropy="huffman"`` the gap and codebook-index symbol streams are Huffman coded with
    :func:`pyserve.ops.huffman_encode` (paper section 4); with ``entropy="none"`` they are stored
    one byte per symbol.

``int8``
    Symmetric per-output-channel int8 weights (the ``int8`` compression method): ``values`` int8
    ``[N, ...]`` (C order) and ``scale`` fp32 ``[N]``; the tensor is ``values * scale`` broadcast
    over axis 0. The optional ``input_scale`` (a positive float in meta) is a static activation
    scale from calibration; without it activations are quantized per row at run time. Readers
    that run int8 kernels take the parts with :func:`int8_parts`; every other reader gets the
    dequantized fp32 tensor from :func:`decode_tensor`.

Decoders check every count, index and bound and raise :class:`ArtifactError` on any mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np

from pyserve import dtypes
from pyserve.artifact._container import ArtifactError

__all__ = ["EncodedTensor", "Int8Parts", "encode_int8", "encode_raw", "encode_sparse", "decode_tensor",
           "int8_parts", "relative_indices"]

ENCODINGS = ("raw", "sparse", "int8")
ENTROPY = ("huffman", "none")


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as stored: ``meta`` (JSON-safe) and named ``blobs``.

    ``meta`` always holds ``encoding``, ``datatype`` (protocol name, e.g. "FP32") and ``shape``.
    """

    meta: dict
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(len(b) for b in self.blobs.values())


def encode_raw(array: np.ndarray) -> EncodedTensor:
    """Store ``array`` as is (little-endian, C order)."""
    array = np.asarray(array)
    dt = dtypes.from_numpy(array.dtype)
    if dt.byte_size is None:
        raise ValueError("encode_raw: BYTES tensors cannot be stored in an artifact")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return EncodedTensor({"encoding": "raw", "datatype": dt.name, "shape": list(array.shape)}, {"data": data})


def relative_indices(flat_positions: np.ndarray, index_bits: int, numel: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Relative (gap) indexing with fillers (Deep Compression, section 2).

    Parameters
    ----------
    flat_positions : int64 [nnz], strictly increasing positions of the non-zeros
    index_bits : int in 1..8, the largest storable gap is ``2**index_bits``
    numel : elements in the tensor; when given, filler entries are appended until fewer than
        ``2**index_bits`` positions remain after the last entry, so the stored entries bound the
        tensor's size (a reader refuses a shape the entries do not cover)

    Returns
    -------
    gap_symbols : uint8 [entries], ``gap - 1`` for each stored entry
    source : int64 [entries], index into ``flat_positions`` of each entry, or -1 for a filler
    """
    max_gap = 1 << index_bits
    gaps = np.diff(flat_positions, prepend=-1)
    # Each gap g needs ceil(g / max_gap) entries: the fillers carry max_gap, the last the rest.
    n_entries = (gaps + max_gap - 1) // max_gap
    total = int(n_entries.sum())
    ends = np.cumsum(n_entries) - 1                      # slot of each real entry
    last = int(flat_positions[-1]) if flat_positions.size else -1
    n_tail = 0 if numel is None else max(numel - 1 - last, 0) // max_gap
    gap_vals = np.full(total + n_tail, max_gap, dtype=np.int64)
    gap_vals[ends] = gaps - (n_entries - 1) * max_gap
    source = np.full(total + n_tail, -1, dtype=np.int64)
    source[ends] = np.arange(flat_positions.size)
    return (gap_vals - 1).astype(np.uint8), source


def _pack_symbols(symbols: np.ndarray, entropy: str) -> bytes:
    if entropy == "huffman":
        from pyserve.ops import huffman_encode

        return huffman_encode(symbols)
    return symbols.astype(np.uint8).tobytes()


def _unpack_symbols(blob: bytes, entropy: str, count: int, what: str) -> np.ndarray:
    if entropy == "huffman":
        from pyserve.ops import huffman_decode

        try:
            symbols = huffman_decode(blob)
        except ValueError as exc:
            raise ArtifactError(f"{what}: bad Huffman stream: {exc}") from None
    else:
        symbols = np.frombuffer(blob, dtype=np.uint8)
    if symbols.dtype != np.uint8 or symbols.size != count:
        raise ArtifactError(f"{what}: expected {count} uint8 symbols, found {symbols.size} {symbols.dtype}")
    return symbols


def encode_sparse(array: np.ndarray, *, index_bits: int = 5, codebook: np.ndarray | None = None,
                  entropy: str = "huffman") -> EncodedTensor:
    """Encode a pruned (and optionally weight-shared) fp32 tensor in the ``sparse`` encoding.

    Parameters
    ----------
    array : float32 array of any shape; zeros are pruned weights.
    index_bits : 1..8, bits of a relative index (paper: 5 for fully connected, 8 for conv).
    codebook : float32 [K], K <= 256, with ``codebook[0] == 0``; every non-zero of ``array`` must
        equal one of ``codebook[1:]`` exactly. ``None`` stores raw fp32 values.
    entropy : "huffman" or "none".

    Raises
    ------
    ValueError
        For an argument out of range or a value not in the codebook.
    """
    array = np.asarray(array)
    if array.dtype != np.float32:
        raise ValueError(f"encode_sparse: array must be float32, got {array.dtype}")
    if not 1 <= int(index_bits) <= 8:
        raise ValueError(f"encode_sparse: index_bits must be in 1..8, got {index_bits}")
    if entropy not in ENTROPY:
        raise ValueError(f"encode_sparse: entropy must be one of {ENTROPY}, got {entropy!r}")
    flat = np.ascontiguousarray(array).ravel()
    positions = np.flatnonzero(flat)
    gap_symbols, source = relative_indices(positions, int(index_bits), flat.size)
    meta = {"encoding": "sparse", "datatype": "FP32", "shape": list(array.shape), "index_bits": int(index_bits),
            "entries": int(gap_symbols.size), "nnz": int(positions.size), "entropy": entropy}
    blobs = {"gaps": _pack_symbols(gap_symbols, entropy)}
    entry_values = np.zeros(gap_symbols.size, dtype=np.float32)
    entry_values[source >= 0] = flat[positions]
    if codebook is None:
        meta["values"] = "raw"
        blobs["values"] = entry_values.astype("<f4").tobytes()
    else:
        codebook = np.asarray(codebook, dtype=np.float32).ravel()
        if not 1 <= codebook.size <= 256 or codebook[0] != 0.0:
            raise ValueError("encode_sparse: codebook must hold 1..256 float32 entries with codebook[0] == 0.0")
        order = np.argsort(codebook[1:], kind="stable") + 1
        sorted_cb = codebook[order]
        slot = np.clip(np.searchsorted(sorted_cb, entry_values), 0, max(sorted_cb.size - 1, 0))
        codes = np.where(entry_values == 0.0, 0, order[slot] if sorted_cb.size else 0).astype(np.uint8)
        if not np.array_equal(codebook[codes], entry_values):
            bad = entry_values[codebook[codes] != entry_values][0]
            raise ValueError(f"encode_sparse: value {bad!r} is not in the codebook")
        meta["values"] = "codebook"
        meta["codebook_size"] = int(codebook.size)
        blobs["codes"] = _pack_symbols(codes, entropy)
        blobs["codebook"] = codebook.astype("<f4").tobytes()
    return EncodedTensor(meta, blobs)


def encode_int8(values: np.ndarray, scale: np.ndarray, *, input_scale: float | None = None) -> EncodedTensor:
    """Store a per-output-channel int8 tensor in the ``int8`` encoding.

    Parameters
    ----------
    values : int8 [N, ...] (at least 1-D), e.g. ``quantize_per_channel(w)[0]``.
    scale : float32 [N], finite and > 0: the tensor is ``values * scale[:, None, ...]``.
    input_scale : optional static activation scale (float > 0) from calibration.

    Raises
    ------
    ValueError
        Wrong dtype or shape, a scale that is not finite and positive.
    """
    values = np.asarray(values)
    scale = np.asarray(scale)
    if values.dtype != np.int8 or values.ndim < 1:
        raise ValueError(f"encode_int8: values must be an int8 array of at least 1 dimension, got {values.dtype} "
                         f"{values.shape}")
    if scale.dtype != np.float32 or scale.shape != values.shape[:1]:
        raise ValueError(f"encode_int8: scale must be float32 [{values.shape[0]}], got {scale.dtype} {scale.shape}")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ValueError("encode_int8: every scale must be finite and > 0")
    meta = {"encoding": "int8", "datatype": "FP32", "shape": list(values.shape), "axis": 0}
    if input_scale is not None:
        input_scale = float(input_scale)
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"encode_int8: input_scale must be finite and > 0, got {input_scale}")
        meta["input_scale"] = input_scale
    blobs = {"values": np.ascontiguousarray(values).tobytes(), "scale": scale.astype("<f4").tobytes()}
    return EncodedTensor(meta, blobs)


@dataclass(frozen=True)
class Int8Parts:
    """The stored parts of an ``int8`` tensor: int8 ``values`` [N, ...], fp32 ``scale`` [N] and the
    optional static activation scale ``input_scale``."""

    values: np.ndarray
    scale: np.ndarray
    input_scale: float | None


def int8_parts(meta: dict, blobs: dict[str, bytes], what: str) -> Int8Parts:
    """Check and return the parts of an ``int8``-encoded tensor (no dequantization).

    Raises :class:`ArtifactError` for any other encoding or an inconsistent entry.
    """
    if meta.get("encoding") != "int8":
        raise ArtifactError(f"{what}: not an int8 tensor (encoding {meta.get('encoding')!r})")
    shape = tuple(_field(meta, "shape", list, what))
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ArtifactError(f"{what}: bad int8 shape {list(shape)}")
    if meta.get("datatype") != "FP32" or meta.get("axis", 0) != 0:
        raise ArtifactError(f"{what}: int8 encoding holds FP32 along axis 0, manifest says "
                            f"{meta.get('datatype')!r} axis {meta.get('axis')!r}")
    numel = math.prod(shape)
    raw_values, raw_scale = blobs.get("values"), blobs.get("scale")
    if raw_values is None or raw_scale is None:
        raise ArtifactError(f"{what}: int8 tensor needs blobs 'values' and 'scale'")
    if len(raw_values) != numel or len(raw_scale) != 4 * shape[0]:
        raise ArtifactError(f"{what}: int8 blobs have {len(raw_values)} + {len(raw_scale)} bytes, shape "
                            f"{list(shape)} needs {numel} + {4 * shape[0]}")
    scale = np.frombuffer(raw_scale, dtype="<f4").astype(np.float32)
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ArtifactError(f"{what}: int8 scales must be finite and > 0")
    input_scale = meta.get("input_scale")
    if input_scale is not None:
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) \
                or not (math.isfinite(input_scale) and input_scale > 0):
            raise ArtifactError(f"{what}: input_scale must be a finite number > 0, got {input_scale!r}")
        input_scale = float(input_scale)
    values = np.frombuffer(raw_values, dtype=np.int8).reshape(shape).copy()
    return Int8Parts(values, scale, input_scale)


def _field(meta: dict, key: str, kind, what: str):
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArtifactError(f"{what}: field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def decode_tensor(meta: dict, blobs: dict[str, bytes], what: str) -> np.ndarray:
    """Decode one stored tensor to a numpy array of its datatype and shape.

    ``what`` names the tensor in error messages. Raises :class:`ArtifactError` on any inconsistency.
    """
    encoding = _field(meta, "encoding", str, what)
    shape = tuple(_field(meta, "shape", list, what))
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArtifactError(f"{what}: bad shape {list(shape)}")
    try:
        dt = dtypes.from_name(_field(meta, "datatype", str, what))
    except ValueError as exc:
        raise ArtifactError(f"{what}: {exc}") from None
    numel = math.prod(shape)

    def blob(name: str) -> bytes:
        if name not in blobs:
            raise ArtifactError(f"{what}: blob {name!r} is missing")
        return blobs[name]

    if encoding == "raw":
        data = blob("data")
        if dt.byte_size is None or len(data) != numel * dt.byte_size:
            raise ArtifactError(f"{what}: raw data has {len(data)} bytes, shape {list(shape)} of {dt.name} needs {numel * (dt.byte_size or 0)}")
        return np.frombuffer(data, dtype=dt.numpy.newbyteorder("<")).astype(dt.numpy).reshape(shape)
    if encoding == "int8":
        parts = int8_parts(meta, blobs, what)
        bshape = (-1,) + (1,) * (len(shape) - 1)
        return (parts.values.astype(np.float32) * parts.scale.reshape(bshape)).astype(np.float32)
    if encoding != "sparse":
        raise ArtifactError(f"{what}: unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    if dt.name != "FP32":
        raise ArtifactError(f"{what}: sparse encoding holds FP32, manifest says {dt.name}")
    index_bits = _field(meta, "index_bits", int, what)
    entries = _field(meta, "entries", int, what)
    entropy = _field(meta, "entropy", str, what)
    if not 1 <= index_bits <= 8 or entries < 0 or entries > max(numel, 0) or entropy not in ENTROPY:
        raise ArtifactError(f"{what}: bad sparse header index_bits={index_bits} entries={entries} entropy={entropy!r}")
    if numel >= (entries + 1) << index_bits:
        # Writers append fillers so that fewer than 2**index_bits positions follow the last entry;
        # a shape larger than the entries cover is refused before anything is allocated.
        raise ArtifactError(f"{what}: shape {list(shape)} ({numel} elements) is larger than its {entries} "
                            f"relative-index entries can cover")
    gap_symbols = _unpack_symbols(blob("gaps"), entropy, entries, f"{what} gaps")
    if gap_symbols.size and int(gap_symbols.max()) >= (1 << index_bits):
        raise ArtifactError(f"{what}: relative index {int(gap_symbols.max()) + 1} exceeds 2**{index_bits}")
    positions = np.cumsum(gap_symbols.astype(np.int64) + 1) - 1
    if positions.size and positions[-1] >= numel:
        raise ArtifactError(f"{what}: relative indices run past the end of a {numel}-element tensor")
    if numel - 1 - (int(positions[-1]) if positions.size else -1) >= (1 << index_bits):
        raise ArtifactError(f"{what}: the relative-index entries end more than 2**{index_bits} elements before "
                            f"the end of the tensor")
    values_kind = _field(meta, "values", str, what)
    if values_kind == "raw":
        raw = blob("values")
        if len(raw) != 4 * entries:
            raise ArtifactError(f"{what}: {len(raw)} bytes of values for {entries} entries")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif values_kind == "codebook":
        cb_raw = blob("codebook")
        size = _field(meta, "codebook_size", int, what)
        if not 1 <= size <= 256 or len(cb_raw) != 4 * size:
            raise ArtifactError(f"{what}: codebook has {len(cb_raw)} bytes, codebook_size={size}")
        codebook = np.frombuffer(cb_raw, dtype="<f4").astype(np.float32)
        codes = _unpack_symbols(blob("codes"), entropy, entries, f"{what} codes")
        if codes.size and int(codes.max()) >= size:
            raise ArtifactError(f"{what}: codebook index {int(codes.max())} out of range for {size} centroids")
        values = codebook[codes]
    else:
        raise ArtifactError(f"{what}: unknown sparse values kind {values_kind!r}")
    out = np.zeros(numel, dtype=np.float32)
    out[positions] = values
    return out.reshape(shape)
