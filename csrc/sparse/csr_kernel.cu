// CSR sparse linear kernel (CUDA): y [B, N] = x [B, K] @ W.T + bias, with the CSR structure
// validated on the device in the same launch. Contract and layout: csr_kernel.h.
//
// Launch: one warp per output row n (8 warps = 256 threads per block, grid.x = ceil(N / 8)).
// B < 32 (csr_linear_warp_kernel): grid.y = min(ceil(B / 8), 65535) blocks walk the batch in
// chunks of kChunk = 8 activation rows (a grid-stride loop over chunks covers larger B). Within a
// warp the 32 lanes stride through the row's nonzeros; each lane keeps kChunk fp32 partial sums
// (one per batch row of the chunk), reads values/indices once per chunk (coalesced) and x through
// the read-only path (__ldg), and a shuffle reduction ends each chunk.
// B >= 32 (csr_linear_wide_kernel): x is first transposed to xt [K, B] in a stream-ordered
// workspace (transpose_kernel, 32 x 33 shared tiles), then the lanes run over the batch (64 rows
// per warp, grid.y over slices of 64) and each nonzero costs one coalesced line of xt per 32 lanes
// instead of a 32-way gather from x; no reduction. If the workspace cannot be allocated, the
// chunked kernel runs. Blocks with blockIdx.y == 0 also validate their rows
// (indptr[0] == 0, indptr[n] <= indptr[n + 1], indptr[N] == nnz; indices in [0, K) and strictly
// increasing within the row) and record the smallest offending position with atomicMin in a
// device word; the launcher copies only that word back (8 bytes) and, when it is set, re-runs the
// host checks on a host copy of indptr/indices to raise the usual message. The computation itself
// never trusts the structure: row bounds are clamped to [0, nnz] and a column is read from x only
// when it lies in [0, K), so malformed input never reads out of bounds (y is then garbage and the
// launcher raises).
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "sparse/csr_kernel.h"

namespace pyserve {
namespace sparse {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 8;  // batch rows per pass over a row's nonzeros
constexpr int kMaxGridY = 65535;
constexpr unsigned long long kNoError = ~0ull;
constexpr int64_t kWideMinB = 32;  // from this batch size on: transposed x, lanes over the batch
constexpr int kWideB = 64;         // batch rows per warp in the wide kernel (two per lane)

// The first offending position found by the last launch (kNoError when none): one word per device
// (a module-scope __device__ variable lives once per context, initialised when the module loads).
// Invariant between calls: kNoError, so the valid path needs no reset (no host-to-device copy);
// a call that finds it set resets it. Guarded by g_flag_mutex on the host, from the launch to the
// read-back (and reset), so concurrent callers do not mix their results.
__device__ unsigned long long g_first_bad = ~0ull;
std::mutex g_flag_mutex;

__device__ __forceinline__ void flag(unsigned long long pos) { atomicMin(&g_first_bad, pos); }

// Row n's nonzero range, clamped: [begin, end) = [indptr[n], indptr[n + 1]) when that lies in
// [0, nnz] and is not reversed, else empty. With `validate`, also flags indptr[0] != 0 (row 0),
// indptr[N] != nnz (row N - 1), a reversed or out-of-range row, and column indices outside [0, K)
// or not strictly increasing within the row: lane l looks at nonzero j = base + l and compares with
// j - 1 (a neighbour lane, or the previous pass's last lane). Called by all 32 lanes of a warp.
// Flagged positions: indptr problems report 0, n + 1 or N; index problems N + 1 + j (nonzero j).
// Only "set or not" matters to the launcher (the host re-check names the first offender); the
// minimum keeps the word deterministic.
template <typename Ptr, typename Index>
__device__ __forceinline__ void check_row(const Ptr* __restrict__ indptr, const Index* __restrict__ indices, int64_t K,
                                          int64_t N, int64_t nnz, int64_t n, int lane, bool validate,
                                          int64_t* begin_out, int64_t* end_out) {
  int64_t begin = static_cast<int64_t>(indptr[n]), end = static_cast<int64_t>(indptr[n + 1]);
  const bool row_ok = begin >= 0 && begin <= end && end <= nnz;
  if (validate && lane == 0) {
    if (n == 0 && begin != 0) flag(0);
    if (!row_ok) flag(static_cast<unsigned long long>(n + 1));
    if (n == N - 1 && end != nnz) flag(static_cast<unsigned long long>(N));
  }
  if (!row_ok) begin = end = 0;  // compute nothing from a malformed row
  if (validate) {
    int64_t prev_last = 0;
    for (int64_t base = begin; base < end; base += kWarp) {
      const int64_t j = base + lane;
      const int64_t c = j < end ? static_cast<int64_t>(indices[j]) : 0;
      int64_t before = __shfl_up_sync(0xffffffffu, c, 1);
      if (lane == 0) before = prev_last;
      const bool bad = j < end && (c < 0 || c >= K || (j > begin && c <= before));
      if (bad) flag(static_cast<unsigned long long>(N + 1 + j));
      prev_last = __shfl_sync(0xffffffffu, c, kWarp - 1);
    }
  }
  *begin_out = begin;
  *end_out = end;
}

template <typename Ptr, typename Index>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    csr_linear_warp_kernel(const float* __restrict__ x, int64_t B, int64_t K, const Ptr* __restrict__ indptr,
                           const Index* __restrict__ indices, const float* __restrict__ values,
                           const float* __restrict__ bias, int64_t N, int64_t nnz, float* __restrict__ y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;  // whole warps exit together: n is uniform within a warp
  int64_t begin, end;
  check_row(indptr, indices, K, N, nnz, n, lane, blockIdx.y == 0, &begin, &end);
  const float bn = bias ? bias[n] : 0.f;
  const int64_t chunks = (B + kChunk - 1) / kChunk;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t b0 = chunk * kChunk;
    const int rows = static_cast<int>(B - b0 < kChunk ? B - b0 : kChunk);
    float acc[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i] = 0.f;
    const float* xb = x + b0 * K;
    for (int64_t j = begin + lane; j < end; j += kWarp) {
      const int64_t c = static_cast<int64_t>(indices[j]);
      if (c < 0 || c >= K) continue;  // flagged above; never read outside x
      const float v = values[j];
#pragma unroll
      for (int i = 0; i < kChunk; ++i)
        if (i < rows) acc[i] = fmaf(v, __ldg(xb + i * K + c), acc[i]);
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], offset);
    }
    // Lane 0 holds the sums; it writes the chunk's rows (at most kChunk stores per row and chunk).
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i)
        if (i < rows) y[(b0 + i) * N + n] = acc[i] + bn;
    }
  }
}

// xt [K, B] = x [B, K]^T through 32 x 33 shared-memory tiles (block 32 x 8; grid.x over K,
// grid.y over B with a grid-stride loop). Every read and write is bounds-checked.
__global__ void __launch_bounds__(kWarp * 8) transpose_kernel(const float* __restrict__ x, int64_t B, int64_t K,
                                                               float* __restrict__ xt) {
  __shared__ float tile[kWarp][kWarp + 1];
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kWarp;
  const int64_t btiles = (B + kWarp - 1) / kWarp;
  for (int64_t bt = blockIdx.y; bt < btiles; bt += gridDim.y) {
    const int64_t b0 = bt * kWarp;
    for (int r = threadIdx.y; r < kWarp; r += blockDim.y) {  // r: batch row within the tile
      const int64_t b = b0 + r, k = k0 + threadIdx.x;
      if (b < B && k < K) tile[r][threadIdx.x] = x[b * K + k];
    }
    __syncthreads();
    for (int r = threadIdx.y; r < kWarp; r += blockDim.y) {  // r: column k within the tile
      const int64_t k = k0 + r, b = b0 + threadIdx.x;
      if (b < B && k < K) xt[k * B + b] = tile[threadIdx.x][r];
    }
    __syncthreads();
  }
}

// B >= kWideMinB: lanes over the batch. Each warp owns row n and a slice of kWideB = 64 batch rows
// (lane l: rows b0 + l and b0 + l + 32, grid.y over slices with a grid-stride loop). The warp
// reads 32 nonzeros at a time (coalesced), broadcasts each (column, value) with shuffles, and every
// lane reads xt[c, b] from the transposed activations: one 128-byte line per 32 lanes instead of
// a gather from 32 scattered columns.
template <typename Ptr, typename Index>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    csr_linear_wide_kernel(const float* __restrict__ xt, int64_t B, int64_t K, const Ptr* __restrict__ indptr,
                           const Index* __restrict__ indices, const float* __restrict__ values,
                           const float* __restrict__ bias, int64_t N, int64_t nnz, float* __restrict__ y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;  // uniform per warp
  int64_t begin, end;
  check_row(indptr, indices, K, N, nnz, n, lane, blockIdx.y == 0, &begin, &end);
  const float bn = bias ? bias[n] : 0.f;
  const int64_t slices = (B + kWideB - 1) / kWideB;
  for (int64_t slice = blockIdx.y; slice < slices; slice += gridDim.y) {
    const int64_t b_lo = slice * kWideB + lane, b_hi = b_lo + kWarp;
    float acc_lo = 0.f, acc_hi = 0.f;
    for (int64_t base = begin; base < end; base += kWarp) {  // uniform trip count
      const int64_t j = base + lane;
      int64_t cj = -1;
      float vj = 0.f;
      if (j < end) {
        cj = static_cast<int64_t>(indices[j]);
        vj = values[j];
      }
      const int count = static_cast<int>(end - base < kWarp ? end - base : kWarp);
      for (int t = 0; t < count; ++t) {  // count is uniform: all lanes shuffle together
        const int64_t c = __shfl_sync(0xffffffffu, cj, t);
        const float v = __shfl_sync(0xffffffffu, vj, t);
        if (c < 0 || c >= K) continue;  // flagged by check_row; never read outside xt
        const float* col = xt + c * B;
        if (b_lo < B) acc_lo = fmaf(v, col[b_lo], acc_lo);
        if (b_hi < B) acc_hi = fmaf(v, col[b_hi], acc_hi);
      }
    }
    if (b_lo < B) y[b_lo * N + n] = acc_lo + bn;
    if (b_hi < B) y[b_hi * N + n] = acc_hi + bn;
  }
}

}  // namespace

template <typename Ptr, typename Index>
const char* csr_linear_cuda(const float* x, int64_t B, int64_t K, const Ptr* indptr, const Index* indices,
                            const float* values, const float* bias, int64_t N, int64_t nnz, float* y,
                            int64_t* first_bad, std::uintptr_t stream_handle) {
  *first_bad = -1;
  if (N == 0) return "";  // nothing to launch; the launcher checks indptr = [0] itself
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::lock_guard<std::mutex> lock(g_flag_mutex);
  const dim3 block(kWarp * kWarpsPerBlock);
  const unsigned grid_x = static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  cudaError_t err = cudaSuccess;
  // Wide batches: transpose x into a stream-ordered workspace (cudaMallocAsync); where that
  // allocation fails (no memory pools, out of memory), the chunked kernel below runs instead.
  float* xt = nullptr;
  if (B >= kWideMinB && K > 0) {
    if (cudaMallocAsync(reinterpret_cast<void**>(&xt), static_cast<std::size_t>(B * K) * sizeof(float), stream) !=
        cudaSuccess) {
      (void)cudaGetLastError();  // clear it: fall back
      xt = nullptr;
    }
  }
  if (xt) {
    const int64_t btiles = (B + kWarp - 1) / kWarp, slices = (B + kWideB - 1) / kWideB;
    const dim3 tgrid(static_cast<unsigned>((K + kWarp - 1) / kWarp),
                     static_cast<unsigned>(btiles < kMaxGridY ? btiles : kMaxGridY));
    transpose_kernel<<<tgrid, dim3(kWarp, 8), 0, stream>>>(x, B, K, xt);
    err = cudaGetLastError();
    if (err == cudaSuccess) {
      const dim3 grid(grid_x, static_cast<unsigned>(slices < kMaxGridY ? slices : kMaxGridY));
      csr_linear_wide_kernel<Ptr, Index><<<grid, block, 0, stream>>>(xt, B, K, indptr, indices, values, bias, N, nnz, y);
      err = cudaGetLastError();
    }
    const cudaError_t free_err = cudaFreeAsync(xt, stream);
    if (err == cudaSuccess) err = free_err;
  } else {
    const int64_t chunks = (B + kChunk - 1) / kChunk;
    // grid.y >= 1 even for B == 0: the y == 0 blocks validate the structure.
    const dim3 grid(grid_x, static_cast<unsigned>(chunks < 1 ? 1 : (chunks < kMaxGridY ? chunks : kMaxGridY)));
    csr_linear_warp_kernel<Ptr, Index><<<grid, block, 0, stream>>>(x, B, K, indptr, indices, values, bias, N, nnz, y);
    err = cudaGetLastError();
  }
  unsigned long long word = kNoError;
  if (err == cudaSuccess)
    err = cudaMemcpyFromSymbolAsync(&word, g_first_bad, sizeof(word), 0, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess && word != kNoError) {
    *first_bad = static_cast<int64_t>(word);
    err = cudaMemcpyToSymbolAsync(g_first_bad, &kNoError, sizeof(kNoError), 0, cudaMemcpyHostToDevice, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  }
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}

const char* cuda_copy_to_host(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return "";
  const cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

#define PYSERVE_CSR_INSTANTIATE(Ptr, Index)                                                                         \
  template const char* csr_linear_cuda<Ptr, Index>(const float*, int64_t, int64_t, const Ptr*, const Index*,       \
                                                   const float*, const float*, int64_t, int64_t, float*, int64_t*,   \
                                                   std::uintptr_t);
PYSERVE_CSR_INSTANTIATE(int32_t, int32_t)
PYSERVE_CSR_INSTANTIATE(int32_t, int64_t)
PYSERVE_CSR_INSTANTIATE(int64_t, int32_t)
PYSERVE_CSR_INSTANTIATE(int64_t, int64_t)
#undef PYSERVE_CSR_INSTANTIATE

}  // namespace sparse
}  // namespace pyserve
