// B = 1 CSR SpMV, one thread, CPU time (10th percentile of 201 calls): pyserve's kernels as built from csrc/ (raw
// CSR: validation fused, AVX2 gathers; packed: SELL-8 slices, 16-bit indices, x read by scalar
// loads) against plain loops on the same arrays: scipy's csr_matvec loop (one accumulator,
// sparsetools/csr.h), the same with 4 accumulators, the gather loop without the validation, and
// the packed layout read with vgatherdps instead of scalar loads. Separates the kernels' cost from
// the Python/pybind call around them, and gives bytes moved per nonzero and the achieved GB/s.
// Build and run from the repository root:
//   g++ -std=c++17 -O3 -Wno-unknown-pragmas -Icsrc benchmarks/native/csr_spmv.cpp csrc/sparse/csr_kernel.cpp
//       csrc/sparse/csr_packed_kernel.cpp -o /tmp/csr_spmv && /tmp/csr_spmv   (one line)
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "sparse/csr_kernel.h"
#include "sparse/csr_packed_kernel.h"

static double cpu_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}
// 10th percentile of the CPU time per call: on a shared, oversubscribed VM the median still moves
// by +-30% between runs (cache and core sharing), the low percentiles much less.
template <class F>
static double median_us(F f, int reps = 201) {
  std::vector<double> ts;
  f();
  for (int r = 0; r < reps; ++r) {
    double t0 = cpu_us();
    f();
    ts.push_back(cpu_us() - t0);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 10];
}

// scipy/sparse/sparsetools/csr.h csr_matvec, with int32 indices.
__attribute__((noinline)) static void scipy_loop(const int64_t* ip, const int32_t* ix, const float* v, const float* x,
                                                 int64_t N, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    float s = y[n];
    for (int64_t j = ip[n]; j < ip[n + 1]; ++j) s += v[j] * x[ix[j]];
    y[n] = s;
  }
}

__attribute__((noinline)) static void scalar4(const int64_t* ip, const int32_t* ix, const float* v, const float* x,
                                              int64_t N, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = ip[n], e = ip[n + 1];
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t j = b;
    for (; j + 4 <= e; j += 4) {
      s0 += v[j] * x[ix[j]];
      s1 += v[j + 1] * x[ix[j + 1]];
      s2 += v[j + 2] * x[ix[j + 2]];
      s3 += v[j + 3] * x[ix[j + 3]];
    }
    for (; j < e; ++j) s0 += v[j] * x[ix[j]];
    y[n] = (s0 + s1) + (s2 + s3);
  }
}

__attribute__((target("avx2,fma"), noinline)) static void gather_only(const int64_t* ip, const int32_t* ix,
                                                                       const float* v, const float* x, int64_t N,
                                                                       float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = ip[n], e = ip[n + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t j = b;
    for (; j + 16 <= e; j += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i*)(ix + j)), 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8),
                           _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i*)(ix + j + 8)), 4), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    alignas(32) float t[8];
    _mm256_store_ps(t, a0);
    float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (; j < e; ++j) s += v[j] * x[ix[j]];
    y[n] = s;
  }
}

// The packed (SELL-8) layout with 16-bit indices, x read by vgatherdps (what the packed kernel
// does with scalar loads), no ragged-end masking (finite x only), y in slice order.
__attribute__((target("avx2,fma"), noinline)) static void sell_gather(const pyserve::sparse::CsrPacked& w,
                                                                       const float* x, float* y) {
  for (int64_t s = 0; s < w.slices; ++s) {
    const int64_t base = w.slice_ptr[s], width = (w.slice_ptr[s + 1] - base) / 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t j = 0;
    for (; j + 2 <= width; j += 2) {
      const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w.idx16.data() + base + 8 * j)));
      const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w.idx16.data() + base + 8 * j + 8)));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val.data() + base + 8 * j), _mm256_i32gather_ps(x, i0, 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val.data() + base + 8 * j + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    if (j < width) {
      const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w.idx16.data() + base + 8 * j)));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val.data() + base + 8 * j), _mm256_i32gather_ps(x, i0, 4), a0);
    }
    _mm256_storeu_ps(y + 8 * s, _mm256_add_ps(a0, a1));
  }
}

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  std::uniform_real_distribution<float> u(0, 1);
  for (auto NK : {std::pair<int64_t, int64_t>{3072, 768}, {768, 3072}}) {
    const int64_t N = NK.first, K = NK.second;
    for (double sp : {0.7, 0.9, 0.95, 0.99}) {
      std::vector<int64_t> ip{0};
      std::vector<int32_t> ix;
      std::vector<float> v;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k)
          if (u(rng) >= sp) ix.push_back(static_cast<int32_t>(k)), v.push_back(g(rng));
        ip.push_back(static_cast<int64_t>(ix.size()));
      }
      std::vector<float> x(K), y(N), y0(N);
      for (auto& e : x) e = g(rng);
      const double t_py = median_us([&] {
        pyserve::sparse::csr_linear_cpu<int32_t>(x.data(), 1, K, ip.data(), ix.data(), v.data(), nullptr, N, y.data(),
                                                 nullptr, 1, false);
      });
      const double t_sc = median_us([&] {
        std::fill(y0.begin(), y0.end(), 0.f);
        scipy_loop(ip.data(), ix.data(), v.data(), x.data(), N, y0.data());
      });
      const double t_s4 = median_us([&] { scalar4(ip.data(), ix.data(), v.data(), x.data(), N, y.data()); });
      const double t_g = median_us([&] { gather_only(ip.data(), ix.data(), v.data(), x.data(), N, y.data()); });
      const auto packed = pyserve::sparse::csr_pack<int32_t>(ip.data(), N, ix.data(), v.data(), K, -1);
      std::vector<float> yp(((N + 7) / 8) * 8);
      const double t_pk = median_us([&] {
        pyserve::sparse::csr_packed_linear_cpu(x.data(), 1, packed, nullptr, yp.data(), nullptr, 1, false);
      });
      const double t_pg = median_us([&] { sell_gather(packed, x.data(), yp.data()); });
      // Bytes the SpMV must read per call: CSR 8 per nonzero + 8 per row (indptr); packed: stored
      // entries x 6 (uint16 + fp32) + 16 per row (slice tables); x and y are small and in L1.
      const double csr_bytes = 8.0 * ix.size() + 8.0 * N, pk_bytes = 6.0 * packed.val.size() + 16.0 * N;
      std::printf("[%lld,%lld] %2.0f%% nnz=%zu: raw kernel %.1f us | scipy loop %.1f (raw/scipy %.2fx) | "
                  "scalar x4 %.1f | gather, no checks %.1f | packed %.1f (vs scipy loop %.2fx, %.1f B/nnz, "
                  "%.1f GB/s; scipy loop %.1f GB/s) | packed layout with gathers %.1f\n",
                  (long long)N, (long long)K, sp * 100, ix.size(), t_py, t_sc, t_sc / t_py, t_s4, t_g, t_pk,
                  t_sc / t_pk, pk_bytes / ix.size(), pk_bytes / t_pk * 1e-3, csr_bytes / t_sc * 1e-3, t_pg);
    }
  }
}
