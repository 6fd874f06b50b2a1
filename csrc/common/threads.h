// The one thread-count setting shared by every OpenMP kernel of pyserve._C.
//
// A process-wide value rather than OpenMP's per-thread nthreads ICV: omp_set_num_threads() only
// affects the calling thread, so a kernel called from another Python thread (a server executor)
// would ignore it. Kernels pass num_threads() to their `omp parallel` clauses instead.
#pragma once

namespace pyserve {

// Threads the kernels use; defaults to omp_get_max_threads() (1 without OpenMP).
int num_threads() noexcept;

// Python entry points (ValueError for n < 1). Without OpenMP the value is recorded but kernels run
// on one thread.
void set_num_threads(int n);
int get_num_threads();

}  // namespace pyserve
