// CUDA int8 linear: per-row symmetric activation quantization, then an int8 GEMM with dp4a
// (4 int8 products summed into int32 per instruction, sm_61+). Quantization and dequantization
// match the CPU kernel (int8_kernel.h): scale = amax / 127 (1 when that is 0),
// q = clamp(rint(x / scale), -127, 127) with round-half-even, y = float(acc) * (sx * sw) + bias.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "quant/int8_kernel_cuda.h"

namespace pyserve {
namespace quant {

namespace {

constexpr int kQuantThreads = 256;

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

__device__ __forceinline__ int load4(const int8_t* p, int64_t k, int64_t K) {
  // Byte loads: rows start at n * K, which need not be 4-byte aligned.
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t b = (k + i < K) ? static_cast<uint8_t>(p[k + i]) : 0u;
    v |= b << (8 * i);
  }
  return static_cast<int>(v);
}

// One warp per output element y[b, n]; lanes stride over K four bytes at a time.
__global__ void int8_gemm_kernel(const int8_t* __restrict__ xq, const float* __restrict__ sx, const int8_t* __restrict__ w,
                                 const float* __restrict__ sw, const float* __restrict__ bias, float* __restrict__ y,
                                 int64_t B, int64_t K, int64_t N) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= B * N) return;
  const int64_t b = warp / N, n = warp % N;
  const int8_t* xr = xq + b * K;
  const int8_t* wr = w + n * K;
  int acc = 0;
  for (int64_t k = 4 * lane; k < K; k += 128) acc = __dp4a(load4(xr, k, K), load4(wr, k, K), acc);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float v = static_cast<float>(acc) * (sx[b] * sw[n]);
    y[b * N + n] = bias ? v + bias[n] : v;
  }
}

bool check(cudaError_t err, const char* what, std::string* error) {
  if (err == cudaSuccess) return true;
  *error = std::string(what) + ": " + cudaGetErrorString(err);
  return false;
}

}  // namespace

bool int8_linear_cuda(const float* x, const int8_t* w, const float* w_scale, const float* bias, float* y, int8_t* xq,
                      float* x_scale, int64_t B, int64_t K, int64_t N, std::string* error) {
  if (B == 0 || N == 0) return true;
  quantize_rows_kernel<<<static_cast<unsigned>(B), kQuantThreads>>>(x, K, xq, x_scale);
  if (!check(cudaGetLastError(), "quantize_rows_kernel launch", error)) return false;
  const int64_t threads = 256;
  const int64_t blocks = (B * N * 32 + threads - 1) / threads;
  int8_gemm_kernel<<<static_cast<unsigned>(blocks), threads>>>(xq, x_scale, w, w_scale, bias, y, B, K, N);
  if (!check(cudaGetLastError(), "int8_gemm_kernel launch", error)) return false;
  return check(cudaStreamSynchronize(0), "int8_linear_cuda", error);
}

}  // namespace quant
}  // namespace pyserve
