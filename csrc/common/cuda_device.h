// CUDA device queries. Defined in cuda_device.cu when the CUDA sources are compiled
// (PYSERVE_WITH_CUDA=1), otherwise in build_info.cpp.
#pragma once

namespace pyserve {

// Number of CUDA devices the runtime sees; 0 on any error (no driver, no device) and 0 when pyserve
// was built without CUDA. Never throws.
int cuda_device_count() noexcept;

}  // namespace pyserve
