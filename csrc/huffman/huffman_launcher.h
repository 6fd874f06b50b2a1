// Entry points of the Huffman family: argument checks, GIL handling, dispatch to the kernel.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/typing.h>

namespace pyserve {

// symbols: [n] uint8 or uint16, C-contiguous, native byte order -> the encoded stream.
pybind11::bytes huffman_encode(const pybind11::array& symbols);

// stream: any C-contiguous bytes-like object -> [n] uint8 or uint16 (as recorded in the stream).
pybind11::array huffman_decode(
    const pybind11::typing::Union<pybind11::bytes, pybind11::bytearray, pybind11::memoryview>& stream);

}  // namespace pyserve
