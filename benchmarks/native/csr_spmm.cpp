// B > 1 CSR SpMM kernels alone, one thread, CPU time (10th percentile and median of `reps` calls):
// pyserve's packed (SELL-8) and raw CSR kernels as built from csrc/, on the cells of issue 3's
// table, with the bytes each call must move and the time the slowest of those moves takes on this
// CPU. Separates the kernels from the Python call (output allocation, argument checks) and gives
// the roofline terms of the 99%-sparse B = 64 cell:
//   xt fills   nnz x B x 4 bytes of xt rows read per call (one xt row per nonzero; xt [K, Bp] is
//              K x Bp x 4 bytes, above the 32 KiB L1 for K = 768, B = 64, so they come from L2:
//              at most one 64-byte line per cycle)
//   y          B x N x 4 bytes written (beyond L2 for [3072, 768], B = 64: goes to L3)
//   flops      2 x nnz x B
// Build and run from the repository root:
//   g++ -std=c++17 -O3 -fopenmp -Icsrc benchmarks/native/csr_spmm.cpp csrc/sparse/csr_kernel.cpp
//       csrc/sparse/csr_packed_kernel.cpp -o /tmp/csr_spmm && /tmp/csr_spmm [reps]   (one line)
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sparse/csr_kernel.h"
#include "sparse/csr_packed_kernel.h"

namespace {

double cpu_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

struct Stat {
  double p10, median;
};

template <class F>
Stat time_us(F f, int reps) {
  std::vector<double> ts;
  f();
  for (int r = 0; r < reps; ++r) {
    const double t0 = cpu_us();
    f();
    ts.push_back(cpu_us() - t0);
  }
  std::sort(ts.begin(), ts.end());
  return {ts[ts.size() / 10], ts[ts.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 201;
  std::mt19937_64 rng(0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uni;
  std::printf("one thread, CPU time per call in us (p10 / median of %d)\n", reps);
  for (auto [N, K] : {std::pair<int64_t, int64_t>{3072, 768}, {768, 3072}}) {
    for (double sparsity : {0.9, 0.99}) {
      std::vector<int64_t> ip{0};
      std::vector<int32_t> ix;
      std::vector<float> v;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k)
          if (uni(rng) >= sparsity) {
            ix.push_back(static_cast<int32_t>(k));
            v.push_back(normal(rng));
          }
        ip.push_back(static_cast<int64_t>(ix.size()));
      }
      const int64_t nnz = ip.back();
      const auto packed = pyserve::sparse::csr_pack<int32_t>(ip.data(), N, ix.data(), v.data(), K, -1);
      for (int64_t B : {8, 64}) {
        std::vector<float> x(B * K), y(B * N), y2(B * N), bias(N);
        for (auto& e : x) e = normal(rng);
        for (auto& e : bias) e = normal(rng);
        std::vector<float> xt(std::max<int64_t>(pyserve::sparse::csr_packed_scratch_floats(B, K),
                                                pyserve::sparse::csr_scratch_floats(B, K)));
        const Stat pk = time_us([&] {
          pyserve::sparse::csr_packed_linear_cpu(x.data(), B, packed, bias.data(), y.data(), xt.data(), 1, false);
        }, reps);
        const Stat raw = time_us([&] {
          pyserve::sparse::csr_linear_cpu<int32_t>(x.data(), B, K, ip.data(), ix.data(), v.data(), bias.data(), N,
                                                   y2.data(), xt.data(), 1, false);
        }, reps);
        const int64_t Bp = (B + 7) / 8 * 8;
        const Stat tr = time_us([&] { pyserve::sparse::transpose_pad(x.data(), B, K, Bp, xt.data(), true); }, reps);
        double diff = 0;
        for (int64_t i = 0; i < B * N; ++i) diff = std::max<double>(diff, std::abs(y[i] - y2[i]));
        const double fills_mb = nnz * Bp * 4 / 1e6, y_mb = B * N * 4 / 1e6;
        std::printf("[%lld,%lld] %.0f%% B=%lld nnz=%lld (%.1f/row): packed %.1f / %.1f | raw %.1f / %.1f | "
                    "transpose_pad %.1f / %.1f | xt fills %.2f MB (%.1f GB/s at packed p10) | y %.2f MB | "
                    "%.2f GFLOP/s | max |packed - raw| %.2g\n",
                    (long long)N, (long long)K, 100 * sparsity, (long long)B, (long long)nnz, double(nnz) / N,
                    pk.p10, pk.median, raw.p10, raw.median, tr.p10, tr.median, fills_mb, fills_mb * 1e3 / pk.p10,
                    y_mb, 2.0 * nnz * B / pk.p10 / 1e3, diff);
      }
    }
  }
  return 0;
}
