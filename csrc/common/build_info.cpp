// pyserve._C.build_info(): the compile definitions CMake passed (CMakeLists.txt).
#include "common/build_info.h"

#include <cctype>
#include <string>

#include "common/cpu_features.h"
#include "common/cuda_device.h"

#ifndef PYSERVE_VERSION
#define PYSERVE_VERSION "0.0.0+unknown"
#endif
#ifndef PYSERVE_COMPILER
#define PYSERVE_COMPILER "unknown"
#endif
#ifndef PYSERVE_AVX2
#define PYSERVE_AVX2 0
#endif
#ifndef PYSERVE_AVX512
#define PYSERVE_AVX512 0
#endif
#ifndef PYSERVE_AVX512_BF16
#define PYSERVE_AVX512_BF16 0
#endif
#ifndef PYSERVE_OPENMP
#define PYSERVE_OPENMP 0
#endif
#ifndef PYSERVE_WITH_CUDA
#define PYSERVE_WITH_CUDA 0
#endif
#ifndef PYSERVE_CUDA_ARCHS
#define PYSERVE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace pyserve {

namespace {
// "75,80,90" (or CMake forms such as "75-real,90a") -> [75, 80, 90]
py::list parse_archs(const std::string& text) {
  py::list archs;
  std::size_t i = 0;
  while (i < text.size()) {
    if (std::isdigit(static_cast<unsigned char>(text[i]))) {
      int value = 0;
      while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) value = value * 10 + (text[i++] - '0');
      archs.append(value);
      while (i < text.size() && text[i] != ',' && text[i] != ';') ++i;  // skip suffixes like "-real", "a"
    } else {
      ++i;
    }
  }
  return archs;
}
}  // namespace

py::typing::Dict<py::str, py::object> build_info() {
  py::typing::Dict<py::str, py::object> info;
  info["version"] = py::str(PYSERVE_VERSION);
  info["compiler"] = py::str(PYSERVE_COMPILER);
  info["avx2"] = py::bool_(PYSERVE_AVX2 != 0);
  info["avx512_vnni"] = py::bool_(PYSERVE_AVX512 != 0);
  info["avx512_bf16"] = py::bool_(PYSERVE_AVX512_BF16 != 0);
  info["openmp"] = py::bool_(PYSERVE_OPENMP != 0);
  info["cuda"] = py::bool_(PYSERVE_WITH_CUDA != 0);
  info["cuda_archs"] = PYSERVE_WITH_CUDA ? parse_archs(PYSERVE_CUDA_ARCHS) : py::list();
  return info;
}

py::typing::Dict<py::str, bool> cpu_kernels() {
  py::typing::Dict<py::str, bool> paths;
  paths["avx2"] = cpu_has_avx2_fma();
  paths["avx512"] = cpu_has_avx512();
  paths["avx512_vnni"] = cpu_has_avx512_vnni();
  paths["avx512_bf16"] = cpu_has_avx512_bf16();
  return paths;
}

#if !PYSERVE_WITH_CUDA
int cuda_device_count() noexcept { return 0; }
#endif

}  // namespace pyserve
