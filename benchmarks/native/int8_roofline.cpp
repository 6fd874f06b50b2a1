// Roofline of this CPU for the int8 linear kernels: the peak rate of the exact instruction sequence
// the packed kernel's inner loop issues (int8_packed_kernel.cpp: per 4 k and 8 channels of one
// activation row, vpmaddubsw + vpmaddwd(.., 1) + vpaddd, i.e. 32 multiply-adds per 3 ops; the same
// sequence fbgemm's AVX2 kernels use), and the fp32 FMA peak, one thread, CPU time, fastest of 15 runs.
//
//   reg   registers only: 4 rows x 16 channels (8 int32 accumulators), w and x in registers;
//         only the issue ports limit it (the roofline's compute roof).
//   l1    the same tile with the kernel's loads: 2 ymm of packed W and 4 vpbroadcastd of x per 4 k,
//         from buffers that stay in L1 (16 KB of W, 4 KB of x): what an L1-resident inner loop can
//         reach; the gap to "reg" is the cost of the loads.
//   vnni  (AVX-512 VNNI CPUs only) the VNNI kernel's tile from L1: per 4 k, 2 zmm of packed W, 8
//         vpbroadcastd of x, 16 vpdpbusd (64 multiply-adds each) into 16 accumulators.
//   fma   12 independent vfmadd231ps chains (fp32 peak: 16 flop per FMA).
//   bf16  (AVX-512 BF16 CPUs only) 12 independent vdpbf16ps zmm chains: 32 multiply-adds each, the
//         rate of the bfloat16 attention kernel's tiles (csrc/quant/attention_kernel.cpp).
//   GHz   from a chain of 12 dependent vpaddd (1 cycle latency each).
// Build and run from the repository root:
//   g++ -O2 benchmarks/native/int8_roofline.cpp -o /tmp/int8_roofline && /tmp/int8_roofline
// Prints GMAC/s (int8) and GFLOP/s (fp32), and cycles per 32 int8 multiply-adds.
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

static double cpu_s() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Fastest of 15 runs, seconds per iteration of f(iters) (a peak: the run least disturbed by other
// processes on a shared machine).
template <class F>
static double per_iter(F f, long iters) {
  f(iters / 10);
  std::vector<double> ts;
  for (int r = 0; r < 15; ++r) {
    const double t0 = cpu_s();
    f(iters);
    ts.push_back((cpu_s() - t0) / iters);
  }
  std::sort(ts.begin(), ts.end());
  return ts[0];
}

#define CHAIN "vpaddd %%ymm1, %%ymm0, %%ymm0\n"
static void chain(long n) {
  __asm__ volatile(
      "vpxor %%ymm1, %%ymm1, %%ymm1\n"
      "1:\n" CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN CHAIN
      "dec %0\n jnz 1b\n"
      : "+r"(n)::"xmm0", "xmm1", "cc");
}

// One row x 16 channels for 4 k: x in X, W halves in ymm8/ymm9, accumulators A0/A1, ones in ymm12.
#define ROW(X, A0, A1)                                         \
  "vpmaddubsw %%" X ", %%ymm8, %%ymm13\n"                      \
  "vpmaddwd %%ymm12, %%ymm13, %%ymm13\n"                       \
  "vpaddd %%ymm13, %%" A0 ", %%" A0 "\n"                       \
  "vpmaddubsw %%" X ", %%ymm9, %%ymm14\n"                      \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm14\n"                       \
  "vpaddd %%ymm14, %%" A1 ", %%" A1 "\n"
#define TILE ROW("ymm10", "ymm0", "ymm1") ROW("ymm11", "ymm2", "ymm3") ROW("ymm10", "ymm4", "ymm5") ROW("ymm11", "ymm6", "ymm7")
#define CLOBBER                                                                                                       \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
      "xmm14", "xmm15", "cc", "memory"

// 2 tiles per iteration: 512 multiply-adds.
static void int8_reg(long n) {
  __asm__ volatile(
      "vpcmpeqd %%ymm12, %%ymm12, %%ymm12\n vpsrlw $15, %%ymm12, %%ymm12\n"  // int16 ones
      "vpxor %%ymm8, %%ymm8, %%ymm8\n vpxor %%ymm9, %%ymm9, %%ymm9\n"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n vpxor %%ymm11, %%ymm11, %%ymm11\n"
      "1:\n" TILE TILE "dec %0\n jnz 1b\n"
      : "+r"(n)::CLOBBER);
}

// As int8_reg with the packed kernel's loads: per tile 2 W loads (64 B) and 4 x broadcasts, walking
// 16 KB of W and 4 x 1 KB of x (L1-resident), 256 tiles per pass.
alignas(64) static uint8_t g_w[16384];
alignas(64) static int8_t g_x[4][1024];
#define LTILE                                                                                            \
  "vmovdqu (%1), %%ymm8\n vmovdqu 32(%1), %%ymm9\n"                                                      \
  "vpbroadcastd (%2), %%ymm10\n vpbroadcastd 1024(%2), %%ymm11\n"                                          \
  ROW("ymm10", "ymm0", "ymm1") ROW("ymm11", "ymm2", "ymm3")                                                \
  "vpbroadcastd 2048(%2), %%ymm10\n vpbroadcastd 3072(%2), %%ymm11\n"                                      \
  ROW("ymm10", "ymm0", "ymm1") ROW("ymm11", "ymm2", "ymm3")                                                \
  "add $64, %1\n add $4, %2\n"
static void int8_l1(long n) {
  for (long i = 0; i < n; ++i) {
    const uint8_t* w = g_w;
    const int8_t* x = &g_x[0][0];
    long kq = 128;  // 2 tiles per asm iteration, 256 per pass
    __asm__ volatile(
        "vpcmpeqd %%ymm12, %%ymm12, %%ymm12\n vpsrlw $15, %%ymm12, %%ymm12\n"
        "1:\n" LTILE LTILE "dec %0\n jnz 1b\n"
        : "+r"(kq), "+r"(w), "+r"(x)::CLOBBER);
  }
}

// 6 rows x 16 channels (12 accumulators), the int16 ones read from memory by vpmaddwd (16 ymm: 12
// accumulators, 2 W, 1 x, 1 temporary): per 4 k, 2 W loads, 6 broadcasts and 12 loads of the ones.
alignas(32) static const int16_t g_ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
#define ROWM(XOFF, A0, A1)                                     \
  "vpbroadcastd " XOFF "(%2), %%ymm14\n"                       \
  "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n"                     \
  "vpmaddwd (%3), %%ymm15, %%ymm15\n"                          \
  "vpaddd %%ymm15, %%" A0 ", %%" A0 "\n"                       \
  "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n"                     \
  "vpmaddwd (%3), %%ymm15, %%ymm15\n"                          \
  "vpaddd %%ymm15, %%" A1 ", %%" A1 "\n"
#define LTILE6                                                                                  \
  "vmovdqu (%1), %%ymm12\n vmovdqu 32(%1), %%ymm13\n"                                           \
  ROWM("0", "ymm0", "ymm1") ROWM("1024", "ymm2", "ymm3") ROWM("2048", "ymm4", "ymm5")             \
  ROWM("3072", "ymm6", "ymm7") ROWM("4096", "ymm8", "ymm9") ROWM("5120", "ymm10", "ymm11")        \
  "add $64, %1\n add $4, %2\n"
alignas(64) static int8_t g_x6[6][1024 + 64];
static void int8_l1_6x16(long n) {
  for (long i = 0; i < n; ++i) {
    const uint8_t* w = g_w;
    const int8_t* x = &g_x6[0][0];
    long kq = 128;  // 2 steps per asm iteration, 256 per pass
    __asm__ volatile("1:\n" LTILE6 LTILE6 "dec %0\n jnz 1b\n"
                     : "+r"(kq), "+r"(w), "+r"(x)
                     : "r"(g_ones)
                     : CLOBBER);
  }
}

// The AVX-512 VNNI tile (int8_packed_kernel.cpp, tile_vnni<8, 2>): 8 rows x 32 channels, from L1
// (2 x 8 KB of W, 8 rows of x 1 KB + 64 B apart: a 4 KB stride would alias in L1).
alignas(64) static int8_t g_x8[8][1088];
#define VROW(XOFF, A, B)                                 \
  "vpbroadcastd " XOFF "(%2), %%zmm20\n"                 \
  "vpdpbusd %%zmm20, %%zmm16, %%zmm" A "\n"              \
  "vpdpbusd %%zmm20, %%zmm17, %%zmm" B "\n"
#define VSTEP                                                                                      \
  "vmovdqu64 (%1), %%zmm16\n vmovdqu64 8192(%1), %%zmm17\n"                                       \
  VROW("0", "0", "1") VROW("1088", "2", "3") VROW("2176", "4", "5") VROW("3264", "6", "7")        \
  VROW("4352", "8", "9") VROW("5440", "10", "11") VROW("6528", "12", "13") VROW("7616", "14", "15") \
  "add $64, %1\n add $4, %2\n"
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void int8_vnni(long n) {
  for (long i = 0; i < n; ++i) {
    const uint8_t* w = g_w;
    const int8_t* x = &g_x8[0][0];
    long kq = 64;  // 2 steps per asm iteration, 128 per pass (8 KB of each W block)
    __asm__ volatile("1:\n" VSTEP VSTEP "dec %0\n jnz 1b\n"
                     : "+r"(kq), "+r"(w), "+r"(x)
                     :
                     : CLOBBER, "xmm16", "xmm17", "xmm20");
  }
}

#define BF12                                                                                                        \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm0\n vdpbf16ps %%zmm20, %%zmm21, %%zmm1\n"                                    \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm2\n vdpbf16ps %%zmm20, %%zmm21, %%zmm3\n"                                    \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm4\n vdpbf16ps %%zmm20, %%zmm21, %%zmm5\n"                                    \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm6\n vdpbf16ps %%zmm20, %%zmm21, %%zmm7\n"                                    \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm8\n vdpbf16ps %%zmm20, %%zmm21, %%zmm9\n"                                    \
  "vdpbf16ps %%zmm20, %%zmm21, %%zmm10\n vdpbf16ps %%zmm20, %%zmm21, %%zmm11\n"
__attribute__((target("avx512f,avx512bf16"))) static void bf16_dp(long n) {
  __asm__ volatile(
      "vpxord %%zmm20, %%zmm20, %%zmm20\n vpxord %%zmm21, %%zmm21, %%zmm21\n"
      "1:\n" BF12 "dec %0\n jnz 1b\n"
      : "+r"(n)::CLOBBER, "xmm20", "xmm21");
}

#define FMA12                                                                                                       \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm0\n vfmadd231ps %%ymm12, %%ymm13, %%ymm1\n"                                    \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm2\n vfmadd231ps %%ymm12, %%ymm13, %%ymm3\n"                                    \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm4\n vfmadd231ps %%ymm12, %%ymm13, %%ymm5\n"                                    \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm6\n vfmadd231ps %%ymm12, %%ymm13, %%ymm7\n"                                    \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm8\n vfmadd231ps %%ymm12, %%ymm13, %%ymm9\n"                                    \
  "vfmadd231ps %%ymm12, %%ymm13, %%ymm10\n vfmadd231ps %%ymm12, %%ymm13, %%ymm11\n"
static void fma(long n) {
  __asm__ volatile(
      "vxorps %%ymm12, %%ymm12, %%ymm12\n vxorps %%ymm13, %%ymm13, %%ymm13\n"
      "1:\n" FMA12 "dec %0\n jnz 1b\n"
      : "+r"(n)::CLOBBER);
}

int main() {
  const double t_chain = per_iter(chain, 20000000);  // 12 cycles per iteration
  const double ghz = 12 / t_chain / 1e9;
  const double t_reg = per_iter(int8_reg, 10000000);     // 512 MACs
  const double t_l1 = per_iter(int8_l1, 40000);          // 256 tiles x 256 MACs
  const double t_l16 = per_iter(int8_l1_6x16, 40000);  // 256 steps x 384 MACs
  const double t_fma = per_iter(fma, 20000000);          // 12 x 16 flop
  const double reg_gmacs = 512 / t_reg / 1e9, l1_gmacs = 256.0 * 256 / t_l1 / 1e9;
  std::printf("clock (vpaddd chain)        %6.2f GHz\n", ghz);
  std::printf("int8 reg  (maddubs,madd,add) %6.1f GMAC/s  %.2f cycles per 32 MAC  %.1f MAC/cycle\n", reg_gmacs,
              32 / reg_gmacs * ghz, reg_gmacs / ghz);
  std::printf("int8 l1   (+ kernel's loads) %6.1f GMAC/s  %.2f cycles per 32 MAC  %.1f MAC/cycle\n", l1_gmacs,
              32 / l1_gmacs * ghz, l1_gmacs / ghz);
  const double l16_gmacs = 256.0 * 384 / t_l16 / 1e9;
  std::printf("int8 l1 6x16 (ones in memory) %5.1f GMAC/s  %.2f cycles per 32 MAC  %.1f MAC/cycle\n", l16_gmacs,
              32 / l16_gmacs * ghz, l16_gmacs / ghz);
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    const double t_vnni = per_iter(int8_vnni, 40000);  // 128 steps x 1024 MACs
    const double vnni_gmacs = 128.0 * 1024 / t_vnni / 1e9;
    std::printf("int8 vnni 8x32 (vpdpbusd)    %6.1f GMAC/s  %.2f cycles per 32 MAC  %.1f MAC/cycle\n", vnni_gmacs,
                32 / vnni_gmacs * ghz, vnni_gmacs / ghz);
  } else {
    std::printf("int8 vnni: this CPU has no AVX-512 VNNI\n");
  }
  std::printf("fp32 FMA                     %6.1f GFLOP/s %.1f flop/cycle\n", 192 / t_fma / 1e9, 192 / t_fma / 1e9 / ghz);
  if (__builtin_cpu_supports("avx512bf16")) {
    const double t_bf = per_iter(bf16_dp, 10000000);  // 12 x 32 multiply-adds
    std::printf("bf16 vdpbf16ps               %6.1f GMAC/s  (fp32 FMA: %.1f GMAC/s)\n", 384 / t_bf / 1e9,
                96 / t_fma / 1e9);
  } else {
    std::printf("bf16: this CPU has no AVX-512 BF16\n");
  }
}
