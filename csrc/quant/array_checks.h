// Argument checks shared by the quant launchers (int8 and codebook). Header-only.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/checks.h"

namespace pyserve {
namespace quant_checks {

inline std::string shape_text(const pybind11::array& a) {
  std::string s = "(";
  for (pybind11::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

inline std::string dtype_text(const pybind11::array& a) { return pybind11::str(a.dtype()).cast<std::string>(); }

// Checks dtype (exact, native byte order), ndim and C-contiguity of one argument.
template <typename T>
void check_array(const pybind11::array& a, const char* op, const char* arg, int ndim, const char* dtype_name) {
  PYSERVE_CHECK_ARG(a.dtype().equal(pybind11::dtype::of<T>()), op, arg, "expected dtype ", dtype_name,
                    " (native byte order), got ", dtype_text(a));
  PYSERVE_CHECK_ARG(a.ndim() == ndim, op, arg, "expected a ", ndim, "-D array, got ndim=", a.ndim(), " with shape ",
                    shape_text(a));
  PYSERVE_CHECK_ARG((a.flags() & pybind11::array::c_style) != 0, op, arg,
                    "expected a C-contiguous array, got strides that are not C order for shape ", shape_text(a));
}

}  // namespace quant_checks
}  // namespace pyserve
