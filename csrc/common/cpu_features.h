// Run-time CPU feature checks shared by the kernels. AVX2+FMA code (and AVX-512 VNNI code) is compiled
// in when the compiler supports it (PYSERVE_AVX2, PYSERVE_AVX512, set by CMake) and used only where
// the running CPU has the features.
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

// True when the AVX-512 paths are compiled in (PYSERVE_AVX512) and this CPU has AVX-512 F, BW and VL
// (Intel Skylake-SP and later servers, AMD Zen 4 and later), and the AVX2 paths are on:
// the fp32 attention's 16-lane kernel. PYSERVE_DISABLE_AVX512 (any value) forces the AVX2 paths.
inline bool cpu_has_avx512() {
#if PYSERVE_AVX512
  static const bool has = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          std::getenv("PYSERVE_DISABLE_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

// True when the AVX-512 VNNI paths are compiled in (PYSERVE_AVX512) and this CPU runs them:
// AVX-512 F, BW, VL and VNNI (Intel Cascade Lake and later servers, AMD Zen 4 and later), and the
// AVX2 paths are on. PYSERVE_DISABLE_AVX512 (any value) forces the AVX2 paths instead;
// PYSERVE_DISABLE_AVX2 turns off both.
inline bool cpu_has_avx512_vnni() {
#if PYSERVE_AVX512
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// True when the AVX-512 BF16 attention path is compiled in (PYSERVE_AVX512_BF16) and this CPU runs
// it: AVX-512 F, BW, VL and BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
// later), and the AVX2 paths are on. PYSERVE_DISABLE_AVX512 turns it off too.
inline bool cpu_has_avx512_bf16() {
#if PYSERVE_AVX512_BF16
  static const bool has = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16") && std::getenv("PYSERVE_DISABLE_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

}  // namespace pyserve
