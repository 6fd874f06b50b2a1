// CUDA codebook linear: one block per output row n and group of up to kRowsB activation rows. The
// row's codebook (2**bits fp32) is staged in shared memory; each thread decodes codes straight
// from the packed bytes (little-endian bit order, codebook_kernel.h) and accumulates kRowsB dot
// products, then the block reduces them.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "quant/codebook_kernel_cuda.h"

namespace pyserve {
namespace quant {

namespace {

constexpr int kThreads = 128;
constexpr int kRowsB = 8;

__device__ __forceinline__ uint32_t code_at(const uint8_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  // A code spans at most two bytes (bits <= 8); the second is read only when needed.
  uint32_t v = row[byte];
  if (shift + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

__global__ void codebook_linear_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed,
                                       const float* __restrict__ codebook, const float* __restrict__ bias,
                                       float* __restrict__ y, int64_t B, int64_t K, int64_t N, int bits,
                                       bool per_channel) {
  __shared__ float cb[256];
  __shared__ float red[kRowsB][kThreads];
  const int64_t n = blockIdx.x;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kRowsB;
  const int C = 1 << bits;
  const float* src = per_channel ? codebook + n * C : codebook;
  for (int c = threadIdx.x; c < C; c += blockDim.x) cb[c] = src[c];
  __syncthreads();
  const int64_t rb = (K * bits + 7) / 8;
  const uint8_t* row = packed + n * rb;
  float acc[kRowsB];
  for (int i = 0; i < kRowsB; ++i) acc[i] = 0.0f;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRowsB), B - b0));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float wv = cb[code_at(row, k, bits)];
    for (int i = 0; i < kRowsB; ++i)
      if (i < rows) acc[i] = fmaf(wv, x[(b0 + i) * K + k], acc[i]);
  }
  for (int i = 0; i < kRowsB; ++i) red[i][threadIdx.x] = acc[i];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int i = 0; i < kRowsB; ++i) red[i][threadIdx.x] += red[i][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < rows) {
    const int i = threadIdx.x;
    y[(b0 + i) * N + n] = red[i][0] + (bias ? bias[n] : 0.0f);
  }
}

}  // namespace

bool codebook_linear_cuda(const float* x, const uint8_t* packed, const float* codebook, const float* bias, float* y,
                          int64_t B, int64_t K, int64_t N, int bits, bool per_channel, std::string* error) {
  if (B == 0 || N == 0) return true;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((B + kRowsB - 1) / kRowsB));
  codebook_linear_kernel<<<grid, kThreads>>>(x, packed, codebook, bias, y, B, K, N, bits, per_channel);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaStreamSynchronize(0);
  if (err != cudaSuccess) {
    *error = std::string("codebook_linear_kernel: ") + cudaGetErrorString(err);
    return false;
  }
  return true;
}

}  // namespace quant
}  // namespace pyserve
