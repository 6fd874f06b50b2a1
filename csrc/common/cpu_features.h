// Run-time CPU feature checks shared by the kernels. AVX2+FMA code is compiled in when the compiler
// supports it (PYSERVE_AVX2, set by CMake) and used only where the running CPU has both.
#pragma once

#include <cstdlib>

namespace pyserve {

// True when the AVX2+FMA paths are compiled in and this CPU runs them. The environment variable
// PYSERVE_DISABLE_AVX2 (any value) forces the portable paths, so tests cover them on AVX2 CPUs.
inline bool cpu_has_avx2_fma() {
#if PYSERVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("PYSERVE_DISABLE_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

}  // namespace pyserve
