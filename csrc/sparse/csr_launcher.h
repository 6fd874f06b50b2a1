// Entry point of the CSR sparse family: argument checks, validation of the CSR structure, GIL
// handling and the CPU/CUDA dispatch.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace pyserve {

// y [B, N] = x [B, K] @ W.T + bias with W [N, K] in CSR (indptr [N+1], indices [nnz], values [nnz]).
// CPU: numpy arrays (C-contiguous, native byte order), returns a new float32 numpy array.
// CUDA: objects exposing __cuda_array_interface__ (e.g. torch CUDA tensors), written into `out`
// ([B, N] float32 on the same device), which is returned.
pybind11::object csr_linear(const pybind11::object& x, const pybind11::object& indptr,
                            const pybind11::object& indices, const pybind11::object& values,
                            const pybind11::object& bias, const pybind11::object& out, bool force_portable);

// Whether csr_linear's AVX2+FMA path runs on this CPU.
bool csr_linear_has_avx2();

}  // namespace pyserve
