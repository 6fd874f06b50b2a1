// Entry point of the CSR sparse family: argument checks, validation of the CSR structure, GIL
// handling and the CPU/CUDA dispatch.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <utility>

#include "sparse/csr_packed_kernel.h"

namespace pyserve {

// y [B, N] = x [B, K] @ W.T + bias with W [N, K] in CSR (indptr [N+1], indices [nnz], values [nnz]).
// CPU: numpy arrays (C-contiguous, native byte order), returns a new float32 numpy array.
// CUDA: objects exposing __cuda_array_interface__ (e.g. torch CUDA tensors), written into `out`
// ([B, N] float32 on the same device), which is returned; the kernel runs on `stream` (a
// cudaStream_t as an integer, 0 = the legacy default stream; ignored for CPU arrays), which is
// synchronised before returning (the structure check's 8-byte result is read back).
pybind11::object csr_linear(const pybind11::object& x, const pybind11::object& indptr,
                            const pybind11::object& indices, const pybind11::object& values,
                            const pybind11::object& bias, const pybind11::object& out, bool force_portable,
                            std::uintptr_t stream = 0);

// A CSR weight prepared once for csr_linear (layout: sparse/csr_packed_kernel.h). Immutable: the
// packed arrays are a copy, validated when made, so later writes to the source arrays do not reach
// them and no call checks the indices again.
class CsrPackedWeight {
 public:
  explicit CsrPackedWeight(std::shared_ptr<const sparse::CsrPacked> w) : w_(std::move(w)) {}
  pybind11::tuple shape() const { return pybind11::make_tuple(w_->N, w_->K); }
  int64_t nnz() const { return w_->nnz; }
  int64_t nbytes() const { return static_cast<int64_t>(w_->nbytes()); }
  int index_bits() const { return w_->index_bits; }
  bool sorted_rows() const { return w_->sorted_rows; }
  // Entries stored (nonzeros plus the padding of SELL slices) / nonzeros; 1.0 when nnz == 0.
  double padding_ratio() const {
    return w_->nnz ? static_cast<double>(w_->slice_ptr.back()) / static_cast<double>(w_->nnz) : 1.0;
  }
  const sparse::CsrPacked& get() const { return *w_; }

 private:
  std::shared_ptr<const sparse::CsrPacked> w_;
};

// indptr [N+1] int32/int64, indices [nnz] int32/int64, values [nnz] float32 (C-contiguous numpy),
// K = number of columns: validated (ValueError naming the argument) and packed.
CsrPackedWeight csr_pack_weight(const pybind11::object& indptr, const pybind11::object& indices,
                                const pybind11::object& values, int64_t K, int sort_rows);

// y [B, N] = x [B, K] @ W.T + bias with a packed W; x [B, K] float32 C-contiguous numpy.
pybind11::object csr_linear_packed(const pybind11::object& x, const CsrPackedWeight& w, const pybind11::object& bias,
                                   bool force_portable);

// Whether csr_linear's AVX2+FMA path runs on this CPU.
bool csr_linear_has_avx2();

}  // namespace pyserve
