"""Native kernels behind thin Python faces (``pyserve._C``), one module per kernel family.

``pyserve.ops.reference`` holds the slow NumPy references the tests compare against; it is not
re-exported here.
"""

from pyserve.ops._build import build_info, cpu_kernels, cuda_device_count
from pyserve.ops.huffman import (
    HUFFMAN_FORMAT_VERSION,
    HUFFMAN_FORMAT_VERSION_CHUNKED,
    HUFFMAN_MAX_CHUNK_SYMBOLS,
    HUFFMAN_MAX_CODE_LENGTH,
    HUFFMAN_TABLE_BITS,
    huffman_decode,
    huffman_encode,
    huffman_stream_info,
)
from pyserve.ops._threads import get_num_threads, set_num_threads
from pyserve.ops.attention import attention_qkv, attention_qkv_bf16, attention_qkv_fast
from pyserve.ops.sparse import csr_linear, pack_csr_weight
from pyserve.ops.quant import (
    codebook_linear,
    int8_linear,
    pack_indices,
    pack_int8_weight,
    quantize_per_channel,
    unpack_indices,
)

__all__ = [
    "HUFFMAN_FORMAT_VERSION",
    "HUFFMAN_FORMAT_VERSION_CHUNKED",
    "HUFFMAN_MAX_CHUNK_SYMBOLS",
    "HUFFMAN_MAX_CODE_LENGTH",
    "HUFFMAN_TABLE_BITS",
    "build_info",
    "cpu_kernels",
    "cuda_device_count",
    "huffman_decode",
    "huffman_encode",
    "huffman_stream_info",
    "csr_linear",
    "pack_csr_weight",
    "get_num_threads",
    "set_num_threads",
    # attention from a fused Q|K|V projection (pyserve.ops.attention)
    "attention_qkv",
    "attention_qkv_bf16",
    "attention_qkv_fast",
    # int8 and codebook linear (pyserve.ops.quant)
    "codebook_linear",
    "int8_linear",
    "pack_indices",
    "pack_int8_weight",
    "quantize_per_channel",
    "unpack_indices",
]
