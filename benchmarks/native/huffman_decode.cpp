// Huffman decode kernel alone, one thread: pyserve's decode_symbols as built from csrc/ against
// libzstd's ZSTD_decompress (levels 3 and 19) on the same symbols, in one binary, so that neither
// side pays Python, allocation or page faults (both write into a pre-touched buffer). Reports the
// 10th-percentile CPU time per call (on a shared VM the median moves by +-30% between runs, the
// low percentiles much less), MB/s of symbols, and cycles per symbol from rdtsc (TSC cycles, not
// core cycles: the TSC ticks at the nominal frequency whatever the boost clock; wall clock, so
// preemption inflates them). Also: the core clock (a chain of dependent adds), and our decoder on
// the same symbols written as ONE bitstream ("1 lane": no lanes to overlap, so its time per table
// lookup is the latency of the lookup chain).
//
// Streams (uint8, the same shapes as benchmarks/bench_huffman.py, generated with std::mt19937_64):
//   kmeans32  Laplacian(scale 2.5) rounded, clipped to [-16, 15], + 16
//   gaps90    geometric(p = 0.1) capped at 255
// Build and run from the repository root (libzstd.so.1 from the system; no header needed):
//   g++ -std=c++17 -O3 -Icsrc benchmarks/native/huffman_decode.cpp csrc/huffman/huffman_kernel.cpp
//       -o /tmp/huffman_decode -l:libzstd.so.1 && /tmp/huffman_decode [symbols] [reps]   (one line)
// Add -DNO_ZSTD (and drop -l:libzstd.so.1) where libzstd is not installed.
#include <time.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "huffman/huffman_kernel.h"

#ifndef NO_ZSTD
extern "C" {
std::size_t ZSTD_compress(void* dst, std::size_t cap, const void* src, std::size_t n, int level);
std::size_t ZSTD_decompress(void* dst, std::size_t cap, const void* src, std::size_t n);
std::size_t ZSTD_compressBound(std::size_t n);
unsigned ZSTD_isError(std::size_t code);
}
#endif

using namespace pyserve::huffman;

namespace {

double cpu_s() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

struct Timing {
  double s;       // 10th percentile CPU seconds per call
  double cycles;  // 10th percentile TSC cycles per call (wall clock: preemption inflates it)
};

template <class F>
Timing time_it(F f, int reps) {
  f();
  std::vector<double> ts, cs;
  for (int r = 0; r < reps; ++r) {
    const double t0 = cpu_s();
    const uint64_t c0 = __rdtsc();
    f();
    const uint64_t c1 = __rdtsc();
    ts.push_back(cpu_s() - t0);
    cs.push_back(double(c1 - c0));
  }
  std::sort(ts.begin(), ts.end());
  std::sort(cs.begin(), cs.end());
  return {ts[ts.size() / 10], cs[cs.size() / 10]};
}

std::vector<uint8_t> make(const std::string& kind, std::size_t n) {
  std::mt19937_64 rng(0);
  std::vector<uint8_t> x(n);
  if (kind == "kmeans32") {
    std::exponential_distribution<double> ex(1.0 / 2.5);
    std::bernoulli_distribution sign(0.5);
    for (auto& v : x) {
      double d = ex(rng) * (sign(rng) ? 1 : -1);
      d = std::min(15.0, std::max(-16.0, std::nearbyint(d)));
      v = static_cast<uint8_t>(d + 16);
    }
  } else {
    std::geometric_distribution<int> geo(0.1);
    for (auto& v : x) v = static_cast<uint8_t>(std::min(geo(rng) + 1, 255));
  }
  return x;
}

// Core clock in GHz from a chain of dependent adds (one per cycle on any x86 core): the TSC ticks
// at the nominal rate, the core may boost above it.
double core_ghz() {
  const uint64_t iters = 200000000;
  const Timing t = time_it(
      [&] {
        uint64_t x = 0;
        for (uint64_t i = 0; i < iters; ++i) __asm__ volatile("add $1, %0" : "+r"(x));
      },
      5);
  return iters / t.s / 1e9;
}

// The same symbols in ONE bitstream: the decoder then runs a single lane, so its time per table
// lookup is the latency of the lookup chain (shift -> table load -> shift), with nothing to overlap.
std::vector<uint8_t> one_bitstream(const std::vector<uint8_t>& x, EncodePlan plan) {
  uint64_t bits = 0;
  for (uint64_t b : plan.stream_bits) bits += b;
  plan.total_bytes += 8 * (1 - plan.num_streams);
  for (uint64_t b : plan.stream_bits) plan.total_bytes -= (b + 7) / 8;
  plan.total_bytes += (bits + 7) / 8;
  plan.num_streams = 1;
  plan.stream_bits = {bits};
  std::vector<uint8_t> enc(plan.total_bytes);
  if (!write_encoded(x.data(), plan, enc.data(), enc.size())) std::abort();
  return enc;
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 10000000;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 31;
  std::printf("%zu uint8 symbols, %d reps, 10th-percentile CPU time; cyc/sym in TSC cycles\n", n, reps);
  std::printf("core clock (dependent adds): %.2f GHz\n", core_ghz());
  std::printf("%-9s %-10s %12s %9s %9s %9s\n", "stream", "codec", "bytes", "bits/sym", "dec MB/s", "cyc/sym");
  for (const std::string kind : {"kmeans32", "gaps90"}) {
    const std::vector<uint8_t> x = make(kind, n);
    std::vector<uint8_t> out(n + 64, 1);
    EncodePlan plan;
    plan_encode(x.data(), n, SymbolType::kUint8, &plan);
    std::vector<uint8_t> enc(plan.total_bytes);
    if (!write_encoded(x.data(), plan, enc.data(), enc.size())) return 1;
    std::string err;
    bool ok = true;
    const Timing t = time_it(
        [&] {
          StreamInfo info;
          ok &= parse_stream(enc.data(), enc.size(), &info, &err);
          ok &= decode_symbols(enc.data(), enc.size(), info, out.data(), &err);
        },
        reps);
    if (!ok || !std::equal(x.begin(), x.end(), out.begin())) {
      std::printf("pyserve decode failed: %s\n", err.c_str());
      return 1;
    }
    std::printf("%-9s %-10s %12zu %9.3f %9.0f %9.3f\n", kind.c_str(), "pyserve", enc.size(), 8.0 * enc.size() / n,
                n / t.s / 1e6, t.cycles / n);
    const std::vector<uint8_t> enc1 = one_bitstream(x, plan);
    const Timing t1 = time_it(
        [&] {
          StreamInfo info;
          ok &= parse_stream(enc1.data(), enc1.size(), &info, &err);
          ok &= decode_symbols(enc1.data(), enc1.size(), info, out.data(), &err);
        },
        reps);
    if (!ok || !std::equal(x.begin(), x.end(), out.begin())) return 1;
    std::printf("%-9s %-10s %12zu %9.3f %9.0f %9.3f\n", kind.c_str(), "1 lane", enc1.size(), 8.0 * enc1.size() / n,
                n / t1.s / 1e6, t1.cycles / n);
#ifndef NO_ZSTD
    for (int level : {3, 19}) {
      std::vector<uint8_t> z(ZSTD_compressBound(n));
      const std::size_t zn = ZSTD_compress(z.data(), z.size(), x.data(), n, level);
      if (ZSTD_isError(zn)) return 1;
      std::size_t got = 0;
      const Timing tz = time_it([&] { got = ZSTD_decompress(out.data(), out.size(), z.data(), zn); }, reps);
      if (got != n || !std::equal(x.begin(), x.end(), out.begin())) return 1;
      std::printf("%-9s zstd -%-4d %12zu %9.3f %9.0f %9.3f\n", kind.c_str(), level, zn, 8.0 * zn / n, n / tz.s / 1e6,
                  tz.cycles / n);
    }
#endif
  }
  return 0;
}
