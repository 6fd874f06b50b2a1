// CUDA codebook linear: y [B, N] = x [B, K] . W^T (+ bias), W[n, k] = codebook[code(n, k)], from
// packed 2..8-bit codes (layout: codebook_kernel.h). Deep Compression (Han et al. 2016), section 3.
//
// Launch: one warp per output row n (8 warps = 256 threads per block, grid.x = ceil(N / 8));
// grid.y = min(ceil(B / 8), 65535) blocks walk the batch in chunks of 8 rows (grid-stride loop).
// The codebook sits in shared memory: a per-layer codebook ([2**bits]) is loaded once per block, a
// per-channel one ([N, 2**bits]) by each warp for its row (8 x 256 floats = 8 KB at most). Lane l
// decodes the groups of 8 codes g = l, l + 32, ...: a group is exactly `bits` bytes of the packed
// row (8 codes x bits bits), read with byte loads (rows need not be aligned) and never past the
// row's ceil(K * bits / 8) bytes; its 8 weights are looked up once per batch chunk and multiplied
// with x[b, 8g .. 8g + 7] (reads at k >= K skipped) into 8 fp32 accumulators per lane, reduced with
// shuffles at the end of the chunk. Results agree with the CPU to fp32 rounding (another summation
// order). Queued on the caller's stream, not waited for.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/cuda_check.cuh"
#include "quant/codebook_kernel_cuda.h"

namespace pyserve {
namespace quant {

namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kChunk = 8;  // batch rows per pass
constexpr int kMaxGridY = 65535;

template <int Bits>
__global__ void __launch_bounds__(kWarp* kWarps)
    codebook_linear_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed,
                           const float* __restrict__ codebook, const float* __restrict__ bias, float* __restrict__ y,
                           int64_t B, int64_t K, int64_t N, bool per_channel) {
  constexpr int C = 1 << Bits;
  __shared__ float cb_s[kWarps][C];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (!per_channel) {  // uniform over the block: the barrier is reached by every thread
    for (int c = threadIdx.x; c < C; c += blockDim.x) cb_s[0][c] = codebook[c];
    __syncthreads();
  }
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (n >= N) return;  // uniform per warp; no block barrier below
  const float* cb = cb_s[per_channel ? warp : 0];
  if (per_channel) {
    for (int c = lane; c < C; c += kWarp) cb_s[warp][c] = codebook[n * C + c];
    __syncwarp();
  }
  const int64_t row_bytes = (K * Bits + 7) / 8;
  const uint8_t* row = packed + n * row_bytes;
  const int64_t groups = (K + 7) / 8;
  const float bn = bias ? bias[n] : 0.0f;
  const int64_t chunks = (B + kChunk - 1) / kChunk;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t b0 = chunk * kChunk;
    const int rows = static_cast<int>(B - b0 < kChunk ? B - b0 : kChunk);
    float acc[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i] = 0.0f;
    for (int64_t g = lane; g < groups; g += kWarp) {
      // The group's Bits bytes, little-endian: code e is bits [e * Bits, (e + 1) * Bits).
      const int64_t first = g * Bits;
      uint64_t v = 0;
#pragma unroll
      for (int j = 0; j < Bits; ++j)
        if (first + j < row_bytes) v |= static_cast<uint64_t>(__ldg(row + first + j)) << (8 * j);
      float wv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) wv[e] = cb[(v >> (e * Bits)) & (C - 1)];
      const int64_t k0 = 8 * g;
      const int valid = static_cast<int>(K - k0 < 8 ? K - k0 : 8);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i >= rows) continue;
        const float* xr = x + (b0 + i) * K + k0;
        float s = acc[i];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (e < valid) s = fmaf(wv[e], __ldg(xr + e), s);
        acc[i] = s;
      }
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i)
        if (i < rows) y[(b0 + i) * N + n] = acc[i] + bn;
    }
  }
}

template <int Bits>
void launch(const float* x, const uint8_t* packed, const float* codebook, const float* bias, float* y, int64_t B,
            int64_t K, int64_t N, bool per_channel, cudaStream_t stream) {
  const int64_t chunks = (B + kChunk - 1) / kChunk;
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps),
                  static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
  codebook_linear_kernel<Bits><<<grid, kWarp * kWarps, 0, stream>>>(x, packed, codebook, bias, y, B, K, N,
                                                                     per_channel);
}

}  // namespace

bool codebook_linear_cuda(const float* x, const uint8_t* packed, const float* codebook, const float* bias, float* y,
                          int64_t B, int64_t K, int64_t N, int bits, bool per_channel, std::uintptr_t stream_handle,
                          std::string* error) {
  if (B == 0 || N == 0) return true;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (bits) {
    case 2: launch<2>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 3: launch<3>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 4: launch<4>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 5: launch<5>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 6: launch<6>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 7: launch<7>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    case 8: launch<8>(x, packed, codebook, bias, y, B, K, N, per_channel, stream); break;
    default: *error = "codebook_linear_cuda: bits must be in 2..8, got " + std::to_string(bits); return false;
  }
  return cuda_check(cudaGetLastError(), "codebook_linear_kernel launch", error);
}

}  // namespace quant
}  // namespace pyserve
