// Entry points of the Huffman family: argument checks, GIL handling, dispatch to the kernel.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/typing.h>

namespace pyserve {

// symbols: [n] uint8 or uint16, C-contiguous, native byte order -> the encoded stream; chunk_symbols
// None (format version 1) or an int in 1..2^24 (format version 2, chunks of that many symbols).
pybind11::bytes huffman_encode(const pybind11::array& symbols, const pybind11::object& chunk_symbols);

// stream -> {dtype, count, format_version, num_chunks, chunk_symbols} after validating its header,
// code lengths and bitstream sizes (the bitstreams themselves are checked by decoding).
pybind11::dict huffman_stream_info(
    const pybind11::typing::Union<pybind11::bytes, pybind11::bytearray, pybind11::memoryview>& stream);

// Decodes on the GPU into the device buffer at `out` (out_nbytes bytes: count * symbol size).
void huffman_decode_cuda(
    const pybind11::typing::Union<pybind11::bytes, pybind11::bytearray, pybind11::memoryview>& stream, uintptr_t out,
    uint64_t out_nbytes);

// stream: any C-contiguous bytes-like object -> [n] uint8 or uint16 (as recorded in the stream).
pybind11::array huffman_decode(
    const pybind11::typing::Union<pybind11::bytes, pybind11::bytearray, pybind11::memoryview>& stream);

}  // namespace pyserve
