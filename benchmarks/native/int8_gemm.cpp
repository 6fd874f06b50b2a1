// int8 GEMM kernels alone, one thread, CPU-time medians, GMAC/s: int8_gemm (unpacked rows, vpsignb
// path) vs int8_gemm_packed (pre-packed weights, 3-op split path; int8_kernel.h) on BERT shapes, x
// Gaussian quantized per row by quantize_rows (as int8_linear does). Checks the two outputs are
// equal bit for bit. Build and run from the repository root:
//   g++ -std=c++17 -O3 -Wno-unknown-pragmas -DPYSERVE_AVX2=1 -Icsrc benchmarks/native/int8_gemm.cpp \
//       csrc/quant/int8_kernel.cpp csrc/quant/int8_packed_kernel.cpp csrc/common/threads.cpp -o /tmp/int8_gemm
//   /tmp/int8_gemm [dist]     (dist: gauss (default), uniform, laplace)
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "quant/int8_kernel.h"
using namespace pyserve::quant;

static double cpu_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

template <class F>
static double median_us(F f, int reps = 11) {
  f();
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    const double t0 = cpu_us();
    f();
    ts.push_back(cpu_us() - t0);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main(int argc, char** argv) {
  const std::string dist = argc > 1 ? argv[1] : "gauss";
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::exponential_distribution<float> e(1.0f);
  auto draw = [&] {
    if (dist == "uniform") return u(rng);
    if (dist == "laplace") return (rng() & 1 ? 1.0f : -1.0f) * e(rng);
    return g(rng);
  };
  const int64_t shapes[3][2] = {{768, 768}, {3072, 768}, {768, 3072}};
  std::printf("x: %s\n%-12s %4s %9s %9s %9s %9s %7s\n", dist.c_str(), "[N,K]", "B", "rows us", "packed us",
              "rows GMAC", "pack GMAC", "ratio");
  for (auto& s : shapes) {
    const int64_t N = s[0], K = s[1];
    std::vector<float> wf(N * K);
    for (auto& v : wf) v = g(rng);
    std::vector<int8_t> w(N * K);
    std::vector<float> sw(N), bias(N);
    quantize_rows(wf.data(), N, K, w.data(), sw.data(), nullptr);
    for (auto& v : bias) v = g(rng);
    std::vector<uint8_t> wu(int8_pack_wu_bytes(N, K));
    int8_pack(w.data(), N, K, wu.data());
    for (int64_t B : {1, 8, 16, 64, 128}) {
      std::vector<float> xf(B * K), sx(B), y0(B * N), y1(B * N);
      for (auto& v : xf) v = draw();
      std::vector<int8_t> xq(B * K);
      quantize_rows(xf.data(), B, K, xq.data(), sx.data(), nullptr);
      const double t0 = median_us([&] { int8_gemm(xq.data(), sx.data(), B, K, w.data(), sw.data(), bias.data(), N, y0.data()); });
      const double t1 = median_us([&] {
        int8_gemm_packed(xq.data(), sx.data(), B, K, wu.data(), sw.data(), bias.data(), N, y1.data());
      });
      const bool same = std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) == 0;
      const double macs = double(B) * N * K;
      std::printf("[%4ld,%4ld] %4ld %9.1f %9.1f %9.1f %9.1f %6.2fx%s\n", (long)N, (long)K, (long)B, t0, t1, macs / t0 / 1e3,
                  macs / t1 / 1e3, t0 / t1, same ? "" : "  MISMATCH");
    }
  }
}
