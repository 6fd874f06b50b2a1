// Drives the int8 and codebook kernels over many shapes with exactly sized heap buffers, so that
// AddressSanitizer flags any read or write past an input or output (tests/ops/test_quant_native_asan.py).
// Also checks results against naive loops. Usage: quant_asan [trials] [seed]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>

#include "quant/codebook_kernel.h"
#include "quant/int8_kernel.h"

using namespace pyserve::quant;

template <typename T>
std::unique_ptr<T[]> buf(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n > 0 ? n : 0)]);  // exact size: ASan sees overruns
}

static int failures = 0;
#define EXPECT(cond, ...)          \
  do {                             \
    if (!(cond)) {                 \
      std::printf(__VA_ARGS__);    \
      std::printf("\n");           \
      ++failures;                  \
    }                              \
  } while (0)

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  std::normal_distribution<float> gauss;
  for (int t = 0; t < trials; ++t) {
    const int64_t B = rng() % 6, N = rng() % 9, K = (t % 3 == 0) ? rng() % 400 : rng() % 80;
    const int bits = 2 + static_cast<int>(rng() % 7);
    const int64_t rb = packed_row_bytes(K, bits), C = int64_t{1} << bits;
    // codebook path
    auto idx = buf<uint8_t>(N * K);
    for (int64_t i = 0; i < N * K; ++i) idx[i] = static_cast<uint8_t>(rng() % C);
    EXPECT(first_code_out_of_range(idx.get(), N * K, bits) == -1, "range check");
    auto packed = buf<uint8_t>(N * rb);
    pack_indices(idx.get(), N, K, bits, packed.get());
    auto back = buf<uint8_t>(N * K);
    unpack_indices(packed.get(), N, K, bits, back.get());
    for (int64_t i = 0; i < N * K; ++i) EXPECT(back[i] == idx[i], "roundtrip bits=%d K=%lld", bits, (long long)K);
    auto x = buf<float>(B * K);
    for (int64_t i = 0; i < B * K; ++i) x[i] = gauss(rng);
    const bool per_channel = rng() % 2;
    auto cb = buf<float>(per_channel ? N * C : C);
    for (int64_t i = 0; i < (per_channel ? N * C : C); ++i) cb[i] = gauss(rng);
    auto bias = buf<float>(N);
    for (int64_t i = 0; i < N; ++i) bias[i] = gauss(rng);
    auto y = buf<float>(B * N);
    codebook_linear(x.get(), B, K, packed.get(), N, bits, cb.get(), per_channel, bias.get(), y.get());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias[n], mag = std::fabs(bias[n]);
        for (int64_t k = 0; k < K; ++k) {
          const double w = cb[(per_channel ? n * C : 0) + idx[n * K + k]];
          s += x[b * K + k] * w;
          mag += std::fabs(x[b * K + k] * w);
        }
        EXPECT(std::fabs(y[b * N + n] - s) <= 1e-5 * (mag + 1), "codebook bits=%d B=%lld K=%lld", bits, (long long)B,
               (long long)K);
      }
    // unpacking arbitrary bytes never leaves the row
    for (int64_t i = 0; i < N * rb; ++i) packed[i] = static_cast<uint8_t>(rng());
    unpack_indices(packed.get(), N, K, bits, back.get());
    codebook_linear(x.get(), B, K, packed.get(), N, bits, cb.get(), per_channel, nullptr, y.get());
    // int8 path
    auto w = buf<float>(N * K);
    for (int64_t i = 0; i < N * K; ++i) w[i] = gauss(rng);
    auto wq = buf<int8_t>(N * K);
    auto ws = buf<float>(N);
    int64_t bad = -1;
    EXPECT(quantize_rows(w.get(), N, K, wq.get(), ws.get(), &bad), "quantize");
    auto xq = buf<int8_t>(B * K);
    auto xs = buf<float>(B);
    EXPECT(quantize_rows(x.get(), B, K, xq.get(), xs.get(), &bad), "quantize x");
    if (t % 5 == 0)
      for (int64_t i = 0; i < N * K; ++i) wq[i] = static_cast<int8_t>(rng());  // full range incl. -128
    int8_gemm(xq.get(), xs.get(), B, K, wq.get(), ws.get(), bias.get(), N, y.get());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n) {
        int64_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += int64_t{xq[b * K + k]} * wq[n * K + k];
        const double ref = double(acc) * xs[b] * ws[n] + bias[n];
        EXPECT(std::fabs(y[b * N + n] - ref) <= 1e-5 * (std::fabs(ref) + 1), "int8 B=%lld N=%lld K=%lld", (long long)B,
               (long long)N, (long long)K);
      }
    if (N * K > 0) {
      w[(N * K) / 2] = NAN;
      EXPECT(!quantize_rows(w.get(), N, K, wq.get(), ws.get(), &bad) && bad == ((N * K) / 2) / K, "nan row");
    }
  }
  std::printf(failures ? "%d failures\n" : "no memory errors, results match\n", failures);
  return failures ? 1 : 0;
}
