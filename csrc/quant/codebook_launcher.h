// Entry points of the codebook family: argument checks, GIL handling, dispatch to the kernels.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

namespace pyserve {

// idx [N, K] uint8 (values < 2**bits), bits in 2..8 -> packed [N, ceil(K * bits / 8)] uint8.
pybind11::array pack_indices(const pybind11::array& idx, int bits);

// packed [N, ceil(K * bits / 8)] uint8 -> idx [N, K] uint8.
pybind11::array unpack_indices(const pybind11::array& packed, int bits, int64_t K);

// x [B, K] float32, packed [N, ceil(K*bits/8)] uint8, codebook [2**bits] or [N, 2**bits] float32,
// bias [N] float32 or None -> y [B, N] float32.
pybind11::array codebook_linear(const pybind11::array& x, const pybind11::array& packed,
                                const pybind11::array& codebook, int bits, const std::optional<pybind11::array>& bias);

// CUDA path on device pointers (the Python face checks the torch tensors); shapes as above, all
// contiguous on the current device; bias may be 0. Queued on `stream` (a cudaStream_t as an
// integer, 0 = the legacy default stream) without waiting for it.
void codebook_linear_cuda(std::uintptr_t x, std::uintptr_t packed, std::uintptr_t codebook, std::uintptr_t bias,
                          std::uintptr_t y, int64_t B, int64_t K, int64_t N, int bits, bool per_channel,
                          std::uintptr_t stream = 0);

}  // namespace pyserve
