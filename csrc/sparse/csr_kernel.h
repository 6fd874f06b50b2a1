// CSR sparse x dense linear layer, y = x @ W.T + bias: framework-free CPU kernel on raw pointers.
//
// Layout
//   W [N, K] in compressed sparse row form (Saad, "Iterative Methods for Sparse Linear Systems",
//   2nd ed., section 3.4; the per-row "relative index + value" storage of Deep Compression, Han et
//   al. 2016, section 2, and EIE, Han et al. 2016, section III, is the same idea):
//     indptr  [N + 1]  row n owns the nonzeros indptr[n] .. indptr[n+1]-1
//     indices [nnz]    column of each nonzero (int32 or int64)
//     values  [nnz]    fp32 value of each nonzero
//   x [B, K] fp32 row-major, bias [N] fp32 or null, y [B, N] fp32 row-major.
//
// Algorithms
//   * B == 1 (SpMV): one dot product per output row, x read through the row's column indices
//     (AVX2: 8-wide gathers + FMA with two accumulators; fallback: 4 scalar accumulators).
//   * B > 1 (SpMM): x is first transposed into xt [K, Bp] (Bp = B rounded up to 8, zero padded) so
//     that every nonzero w = W[n, k] becomes one contiguous AXPY  acc[0:Bp] += w * xt[k, 0:Bp]
//     (AVX2: up to 8 ymm accumulators = 64 batch columns per pass over the row), and the
//     accumulators are written to the column n of y. The nonzeros of a row are streamed once per
//     64 batch columns instead of once per batch row.
//   * OpenMP splits the output rows n across threads (dynamic chunks of rows).
//
// Contract: the launcher (csr_launcher.cpp) has checked all sizes and indptr (indptr[0] == 0,
// non-decreasing, indptr[N] == nnz). Column indices are checked by the kernel itself, fused with
// the computation (see csr_linear_cpu); with those, no access is out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyserve {
namespace sparse {

// True when the AVX2+FMA code path is compiled in and the running CPU supports it.
bool csr_has_avx2();

// Computes y [B, N] = x [B, K] @ W.T + bias (bias may be null) on `threads` OpenMP threads (>= 1).
// indptr must already be valid (indptr[0] == 0, non-decreasing, indptr[N] == nnz). The column
// indices are validated inside the kernel, chunk by chunk, before the chunk touches x (its indices
// are in L1 by then, so validation costs no extra pass over memory). B == 1: chunks of ~2048
// nonzeros, checked in one vectorised pass (largest index, count of non-increasing neighbour pairs
// against those on row boundaries); an invalid chunk is not computed. B > 1: chunks of 16 rows; a
// row whose indices are not strictly increasing inside [0, K) is skipped. Returns -1 when every row was valid, else
// the position of the first offending nonzero (the output is then garbage and must be discarded).
// xt_scratch: caller-provided buffer of at least csr_scratch_floats(B, K) floats (may be null when
// that is 0). When force_portable is true the portable fallback runs even on AVX2 CPUs (tests).
template <typename Index>
int64_t csr_linear_cpu(const float* x, int64_t B, int64_t K, const int64_t* indptr, const Index* indices,
                       const float* values, const float* bias, int64_t N, float* y, float* xt_scratch,
                       int threads, bool force_portable);

// Floats of scratch csr_linear_cpu needs for a [B, K] input (0 when B <= 1).
int64_t csr_scratch_floats(int64_t B, int64_t K);

// Checks that indices are strictly increasing within each row and lie in [0, K), given a valid
// indptr (a separate pass, used for the CUDA path). Returns -1 when all is well, else the position
// of the first offending nonzero.
template <typename Index>
int64_t csr_first_bad_index(const int64_t* indptr, int64_t N, const Index* indices, int64_t K);

}  // namespace sparse
}  // namespace pyserve

namespace pyserve {
namespace sparse {

// CUDA version (csr_kernel.cu, compiled only when PYSERVE_WITH_CUDA): all pointers are device
// pointers; indptr (Ptr = int32 or int64, [N + 1]) and indices (Index = int32 or int64, [nnz]) are
// NOT trusted: the kernel validates them while it computes (indptr[0] == 0, non-decreasing,
// indptr[N] == nnz; indices in [0, K), strictly increasing within each row) and never reads out of
// bounds. One warp per output row n; B < 32: lanes over the row's nonzeros, batch rows in chunks
// of 8 accumulated per lane, shuffle reduction; B >= 32: x transposed into a cudaMallocAsync
// workspace of B * K floats, lanes over the batch; launch configuration in csr_kernel.cu. Runs on `stream`
// (a cudaStream_t as an integer, 0 = the legacy default stream) and synchronises it (one 8-byte
// device-to-host copy of the validation word). *first_bad: -1 when the structure is valid, else >= 0 (some offending position; y is then
// garbage and the caller must re-check on the host for the exact message). N == 0 launches nothing
// (the caller checks indptr itself). Returns an empty string on success, else the CUDA error text.
template <typename Ptr, typename Index>
const char* csr_linear_cuda(const float* x, int64_t B, int64_t K, const Ptr* indptr, const Index* indices,
                            const float* values, const float* bias, int64_t N, int64_t nnz, float* y,
                            int64_t* first_bad, std::uintptr_t stream);

// cudaMemcpy device -> host of `bytes` bytes; empty string on success, else the CUDA error text.
const char* cuda_copy_to_host(void* dst, const void* src, std::size_t bytes);

}  // namespace sparse
}  // namespace pyserve
