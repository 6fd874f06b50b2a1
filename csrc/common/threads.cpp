// Process-wide kernel thread count (see threads.h).
#include "common/threads.h"

#include <atomic>

#include "common/checks.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyserve {

namespace {
int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
std::atomic<int>& setting() {
  static std::atomic<int> value{default_threads()};
  return value;
}
}  // namespace

int num_threads() noexcept { return setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  PYSERVE_CHECK_ARG(n >= 1, "set_num_threads", "n", "expected an integer >= 1, got ", n);
  setting().store(n, std::memory_order_relaxed);
}

int get_num_threads() { return num_threads(); }

}  // namespace pyserve
