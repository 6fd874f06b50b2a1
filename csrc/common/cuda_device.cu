// CUDA runtime queries; compiled only when CMake finds nvcc (PYSERVE_WITH_CUDA=1).
#include <cuda_runtime.h>

#include "common/cuda_device.h"

namespace pyserve {

int cuda_device_count() noexcept {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // No driver, no device, or a driver older than the runtime: report none and clear the sticky
    // error so later runtime calls do not see it.
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace pyserve
