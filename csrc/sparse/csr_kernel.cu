// CSR sparse linear kernel (CUDA): row-per-warp SpMM, y [B, N] = x [B, K] @ W.T + bias.
// Contract and layout: csr_kernel.h. Inputs are validated by the launcher on the host side.
#include <cuda_runtime.h>

#include <cstdint>

#include "sparse/csr_kernel.h"

namespace pyserve {
namespace sparse {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxGridY = 65535;

template <typename Index>
__global__ void csr_linear_warp_kernel(const float* __restrict__ x, int64_t B, int64_t K,
                                       const int64_t* __restrict__ indptr, const Index* __restrict__ indices,
                                       const float* __restrict__ values, const float* __restrict__ bias, int64_t N,
                                       float* __restrict__ y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;  // whole warps exit together: n is uniform within a warp
  const int64_t begin = indptr[n], end = indptr[n + 1];
  const float bn = bias ? bias[n] : 0.f;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float* xb = x + b * K;
    float sum = 0.f;
    for (int64_t j = begin + lane; j < end; j += kWarp) sum += values[j] * __ldg(xb + indices[j]);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) y[b * N + n] = sum + bn;
  }
}

}  // namespace

template <typename Index>
const char* csr_linear_cuda(const float* x, int64_t B, int64_t K, const int64_t* indptr, const Index* indices,
                            const float* values, const float* bias, int64_t N, float* y) {
  if (B == 0 || N == 0) return "";
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  csr_linear_warp_kernel<Index><<<grid, block, 0, 0>>>(x, B, K, indptr, indices, values, bias, N, y);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}

const char* cuda_copy_to_host(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return "";
  const cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

const char* cuda_upload(void** dst, const void* src, std::size_t bytes) {
  *dst = nullptr;
  cudaError_t err = cudaMalloc(dst, bytes > 0 ? bytes : 1);
  if (err == cudaSuccess && bytes > 0) err = cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice);
  if (err != cudaSuccess) {
    if (*dst) cudaFree(*dst);
    *dst = nullptr;
    return cudaGetErrorString(err);
  }
  return "";
}

void cuda_release(void* ptr) { cudaFree(ptr); }

template const char* csr_linear_cuda<int32_t>(const float*, int64_t, int64_t, const int64_t*, const int32_t*,
                                              const float*, const float*, int64_t, float*);
template const char* csr_linear_cuda<int64_t>(const float*, int64_t, int64_t, const int64_t*, const int64_t*,
                                              const float*, const float*, int64_t, float*);

}  // namespace sparse
}  // namespace pyserve
