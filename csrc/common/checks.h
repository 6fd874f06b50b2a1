// Shared argument checks and typed errors for pyserve launchers.
//
// Framework-free on purpose: kernels and launchers throw standard exceptions, and pybind11's
// built-in translation turns them into the Python types the project promises (STYLE.md rule 3):
//
//   pyserve::ArgumentError (a std::invalid_argument)  ->  ValueError    bad argument / malformed input
//   pyserve::InternalError (a std::runtime_error)     ->  RuntimeError  a bug or resource failure
//
// Messages always name the op and the argument, then say what was expected and what came:
//   "huffman_encode: argument 'symbols': expected a 1-D array, got ndim=2"
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyserve {

class ArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class InternalError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void stream_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void stream_all(std::ostringstream& os, T&& first, Rest&&... rest) {
  os << std::forward<T>(first);
  stream_all(os, std::forward<Rest>(rest)...);
}
}  // namespace detail

// Concatenate any streamable values into one string.
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  detail::stream_all(os, std::forward<Args>(args)...);
  return os.str();
}

[[noreturn]] inline void throw_argument_error(const char* op, const char* arg, const std::string& what) {
  throw ArgumentError(str_cat(op, ": argument '", arg, "': ", what));
}

[[noreturn]] inline void throw_internal_error(const char* op, const std::string& what) {
  throw InternalError(str_cat(op, ": internal error: ", what));
}

}  // namespace pyserve

// PYSERVE_CHECK_ARG(cond, op, arg, expected..., got...) -- raises ValueError when cond is false.
// The variadic tail is streamed, e.g.
//   PYSERVE_CHECK_ARG(a.ndim() == 1, "huffman_encode", "symbols", "expected a 1-D array, got ndim=", a.ndim());
#define PYSERVE_CHECK_ARG(cond, op, arg, ...)                                  \
  do {                                                                         \
    if (!(cond)) ::pyserve::throw_argument_error((op), (arg), ::pyserve::str_cat(__VA_ARGS__)); \
  } while (0)

// PYSERVE_CHECK_INTERNAL(cond, op, message...) -- raises RuntimeError; for invariants that only a
// bug can break (never for user input).
#define PYSERVE_CHECK_INTERNAL(cond, op, ...)                                  \
  do {                                                                         \
    if (!(cond))                                                               \
      ::pyserve::throw_internal_error((op), ::pyserve::str_cat("check '", #cond, "' failed: ", __VA_ARGS__)); \
  } while (0)
