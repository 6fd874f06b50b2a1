// Error reporting shared by the CUDA sources (.cu only: needs cuda_runtime.h).
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace pyserve {

// true on cudaSuccess; otherwise sets *error to "<what>: <CUDA's message>" and returns false.
inline bool cuda_check(cudaError_t err, const char* what, std::string* error) {
  if (err == cudaSuccess) return true;
  *error = std::string(what) + ": " + cudaGetErrorString(err);
  return false;
}

}  // namespace pyserve
