// What this build of pyserve._C compiled in (pyserve._C.build_info()).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/typing.h>

namespace pyserve {

// {"version": str, "compiler": str, "avx2": bool, "openmp": bool, "cuda": bool,
//  "cuda_archs": list[int] (empty without CUDA)}.
pybind11::typing::Dict<pybind11::str, pybind11::object> build_info();

// The CPU code paths this process runs (compiled in, supported by the CPU, not turned off by
// PYSERVE_DISABLE_AVX2 / PYSERVE_DISABLE_AVX512): {"avx2": bool, "avx512_vnni": bool, "avx512_bf16": bool}.
pybind11::typing::Dict<pybind11::str, bool> cpu_kernels();

}  // namespace pyserve
