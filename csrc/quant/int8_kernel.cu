// CUDA int8 linear: per-row symmetric activation quantization, then an int8 GEMM with dp4a
// (4 int8 products summed into int32 per instruction, sm_61+). Quantization and dequantization
// match the CPU kernel (int8_kernel.h) bit for bit: scale = amax / 127 (1 when that is 0),
// q = clamp(rint(x / scale), -127, 127) with round-half-even, acc = exact int32 dot product (any
// summation order gives the same integer for K <= kInt8MaxK), y = float(acc) * (sx * sw) + bias
// with two roundings (no FMA contraction: __fmul_rn / __fadd_rn).
//
// Kernels (all on the caller's stream, no synchronisation):
//   quantize_rows_kernel   one block of 256 threads per activation row (amax by a shared-memory
//                          max reduction, then the quantized bytes).
//   int8_gemv_kernel       B <= kGemvMaxB: one warp per output channel n (8 warps per block, grid.x =
//                          ceil(N / 8)); lane l reads the 4-byte words l, l + 32, ... of w's row n
//                          (coalesced) and, per word, the same word of each of the B <= 8 x rows
//                          (batch chunks of 8 for larger B), kGemvChunk int32 accumulators per
//                          lane, a shuffle reduction, lane 0 writes the chunk's outputs.
//   int8_gemm_tiled_kernel B > kGemvMaxB: 32 x 32 output tiles (batch x channel), 256 threads,
//                          each computing 2 x 2 outputs; K in steps of 128 bytes (32 words) staged
//                          in shared memory (row stride 33 words: conflict-free reads), the next
//                          step's words prefetched into registers while the current one is used.
// Word loads: "aligned" (K % 4 == 0 and both base pointers 4-byte aligned) reads int32 words
// directly; otherwise each word is assembled from byte loads, with bytes at k >= K read as 0. Every
// global access is bounds-checked (rows against B / N, bytes against K).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/cuda_check.cuh"
#include "quant/int8_kernel_cuda.h"

namespace pyserve {
namespace quant {

namespace {

constexpr int kQuantThreads = 256;
constexpr int kWarp = 32;
constexpr int kGemvWarps = 8;
constexpr int kGemvChunk = 8;
constexpr int64_t kGemvMaxB = 16;
constexpr int kTile = 32;         // tile edge (batch rows and channels)
constexpr int kTileWords = 32;    // K step: 32 words = 128 bytes
constexpr int kTileThreads = 256;
constexpr int kTileRowsPerPass = kTileThreads / kTileWords;  // 8 rows of a tile loaded per pass
constexpr int kTileLoads = kTile / kTileRowsPerPass;          // 4 words per thread per operand
constexpr int kMaxGridY = 65535;

// One block per activation row.
__global__ void quantize_rows_kernel(const float* __restrict__ x, int64_t K, int8_t* __restrict__ q,
                                     float* __restrict__ scale) {
  __shared__ float partial[kQuantThreads];
  const int64_t row = blockIdx.x;
  const float* r = x + row * K;
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(r[k]));
  partial[threadIdx.x] = amax;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + s]);
    __syncthreads();
  }
  float sc = __fdiv_rn(partial[0], 127.0f);
  const bool zero = sc == 0.0f;
  if (zero) sc = 1.0f;
  if (threadIdx.x == 0) scale[row] = sc;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float v = zero ? 0.0f : rintf(__fdiv_rn(r[k], sc));
    v = fminf(127.0f, fmaxf(-127.0f, v));
    q[row * K + k] = static_cast<int8_t>(v);
  }
}

// Bytes k .. k+3 of a row of K bytes as a little-endian int32, bytes at k + i >= K as 0; k >= 0 is a
// multiple of 4. Aligned: the row starts 4-byte aligned and K % 4 == 0, so the word is whole or
// entirely past the end.
template <bool Aligned>
__device__ __forceinline__ int load_word(const int8_t* __restrict__ row, int64_t k, int64_t K) {
  if (Aligned) return k < K ? __ldg(reinterpret_cast<const int*>(row + k)) : 0;
  uint32_t v = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t b = (k + i < K) ? static_cast<uint8_t>(__ldg(row + k + i)) : 0u;
    v |= b << (8 * i);
  }
  return static_cast<int>(v);
}

__device__ __forceinline__ float dequant(int acc, float sx, float sw, const float* __restrict__ bias, int64_t n) {
  const float v = __fmul_rn(static_cast<float>(acc), __fmul_rn(sx, sw));
  return bias ? __fadd_rn(v, bias[n]) : v;
}

template <bool Aligned>
__global__ void __launch_bounds__(kWarp* kGemvWarps)
    int8_gemv_kernel(const int8_t* __restrict__ xq, const float* __restrict__ sx, const int8_t* __restrict__ w,
                     const float* __restrict__ sw, const float* __restrict__ bias, float* __restrict__ y, int64_t B,
                     int64_t K, int64_t N) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // uniform per warp
  const int8_t* wr = w + n * K;
  const int64_t words = (K + 3) / 4;
  for (int64_t b0 = 0; b0 < B; b0 += kGemvChunk) {
    const int rows = static_cast<int>(B - b0 < kGemvChunk ? B - b0 : kGemvChunk);
    int acc[kGemvChunk];
#pragma unroll
    for (int i = 0; i < kGemvChunk; ++i) acc[i] = 0;
    for (int64_t q = lane; q < words; q += kWarp) {
      const int64_t k = 4 * q;
      const int wv = load_word<Aligned>(wr, k, K);
#pragma unroll
      for (int i = 0; i < kGemvChunk; ++i)
        if (i < rows) acc[i] = __dp4a(load_word<Aligned>(xq + (b0 + i) * K, k, K), wv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < kGemvChunk; ++i) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], off);
    }
    if (lane == 0) {
      const float swn = sw[n];
#pragma unroll
      for (int i = 0; i < kGemvChunk; ++i)
        if (i < rows) y[(b0 + i) * N + n] = dequant(acc[i], sx[b0 + i], swn, bias, n);
    }
  }
}

// Tile loads: 32 rows x 32 words of x (and of w) per K step, 1024 words, four per thread: thread
// t takes word t % 32 (a warp reads 128 contiguous bytes of one row) of rows t / 32 + 8 h, h < 4.
template <bool Aligned>
__device__ __forceinline__ void load_tile(const int8_t* __restrict__ base, int64_t row0, int64_t rows_total,
                                          int64_t k0, int64_t K, int (&regs)[kTileLoads]) {
  const int word = threadIdx.x % kTileWords;
  const int r = threadIdx.x / kTileWords;  // 0..7
#pragma unroll
  for (int h = 0; h < kTileLoads; ++h) {
    const int64_t row = row0 + r + kTileRowsPerPass * h;
    regs[h] = row < rows_total ? load_word<Aligned>(base + row * K, k0 + 4 * word, K) : 0;
  }
}

template <bool Aligned>
__global__ void __launch_bounds__(kTileThreads)
    int8_gemm_tiled_kernel(const int8_t* __restrict__ xq, const float* __restrict__ sx, const int8_t* __restrict__ w,
                           const float* __restrict__ sw, const float* __restrict__ bias, float* __restrict__ y,
                           int64_t B, int64_t K, int64_t N) {
  __shared__ int xs[kTile][kTileWords + 1];
  __shared__ int ws[kTile][kTileWords + 1];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // outputs (b0 + ty + 16 i, n0 + tx + 16 j)
  const int lw = threadIdx.x % kTileWords, lr = threadIdx.x / kTileWords;
  const int64_t btiles = (B + kTile - 1) / kTile;
  for (int64_t bt = blockIdx.y; bt < btiles; bt += gridDim.y) {
    const int64_t b0 = bt * kTile;
    int acc[2][2] = {{0, 0}, {0, 0}};
    int xr[kTileLoads], wr[kTileLoads];
    load_tile<Aligned>(xq, b0, B, 0, K, xr);
    load_tile<Aligned>(w, n0, N, 0, K, wr);
    for (int64_t k0 = 0; k0 < K; k0 += 4 * kTileWords) {
#pragma unroll
      for (int h = 0; h < kTileLoads; ++h) {
        xs[lr + kTileRowsPerPass * h][lw] = xr[h];
        ws[lr + kTileRowsPerPass * h][lw] = wr[h];
      }
      __syncthreads();
      if (k0 + 4 * kTileWords < K) {  // prefetch the next step while this one is computed
        load_tile<Aligned>(xq, b0, B, k0 + 4 * kTileWords, K, xr);
        load_tile<Aligned>(w, n0, N, k0 + 4 * kTileWords, K, wr);
      }
#pragma unroll
      for (int q = 0; q < kTileWords; ++q) {
        const int a0 = xs[ty][q], a1 = xs[ty + 16][q];
        const int w0 = ws[tx][q], w1 = ws[tx + 16][q];
        acc[0][0] = __dp4a(a0, w0, acc[0][0]);
        acc[0][1] = __dp4a(a0, w1, acc[0][1]);
        acc[1][0] = __dp4a(a1, w0, acc[1][0]);
        acc[1][1] = __dp4a(a1, w1, acc[1][1]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t b = b0 + ty + 16 * i;
      if (b >= B) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < N) y[b * N + n] = dequant(acc[i][j], sx[b], sw[n], bias, n);
      }
    }
  }
}

template <bool Aligned>
void launch_gemm(const int8_t* xq, const float* sx, const int8_t* w, const float* sw, const float* bias, float* y,
                 int64_t B, int64_t K, int64_t N, cudaStream_t stream) {
  if (B <= kGemvMaxB) {
    const unsigned blocks = static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps);
    int8_gemv_kernel<Aligned><<<blocks, kWarp * kGemvWarps, 0, stream>>>(xq, sx, w, sw, bias, y, B, K, N);
  } else {
    const int64_t btiles = (B + kTile - 1) / kTile;
    const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                    static_cast<unsigned>(btiles < kMaxGridY ? btiles : kMaxGridY));
    int8_gemm_tiled_kernel<Aligned><<<grid, kTileThreads, 0, stream>>>(xq, sx, w, sw, bias, y, B, K, N);
  }
}

}  // namespace

bool int8_linear_cuda(const float* x, const int8_t* w, const float* w_scale, const float* bias, float* y, int8_t* xq,
                      float* x_scale, int64_t B, int64_t K, int64_t N, std::uintptr_t stream_handle,
                      std::string* error) {
  if (B == 0 || N == 0) return true;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  quantize_rows_kernel<<<static_cast<unsigned>(B), kQuantThreads, 0, stream>>>(x, K, xq, x_scale);
  if (!cuda_check(cudaGetLastError(), "quantize_rows_kernel launch", error)) return false;
  const bool aligned = K % 4 == 0 && reinterpret_cast<std::uintptr_t>(w) % 4 == 0 &&
                       reinterpret_cast<std::uintptr_t>(xq) % 4 == 0;
  if (aligned)
    launch_gemm<true>(xq, x_scale, w, w_scale, bias, y, B, K, N, stream);
  else
    launch_gemm<false>(xq, x_scale, w, w_scale, bias, y, B, K, N, stream);
  return cuda_check(cudaGetLastError(), "int8 GEMM kernel launch", error);
}

}  // namespace quant
}  // namespace pyserve
