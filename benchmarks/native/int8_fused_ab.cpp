// Before/after of the int8_linear native path (quantization included), one thread, CPU time, fastest of
// N interleaved runs, bit-equality checked ("MISMATCH" otherwise): A = quantize_rows + int8_gemm_packed of
// an older revision REV (957127c: quantize into a fresh buffer, then the packed GEMM copying, splitting
// 32-byte chunks with violating pairs in scalar code, and allocating and zeroing its buffers per call),
// B = the working tree's int8_linear_packed_f32 (quantization fused into the row preparation). Build and
// run from the repository root:
//   REV=957127c; F="-std=c++17 -O3 -Wno-unknown-pragmas -DPYSERVE_AVX2=1 -Icsrc"
//   git show $REV:csrc/quant/int8_kernel.cpp > /tmp/ko.cpp; git show $REV:csrc/quant/int8_packed_kernel.cpp > /tmp/po.cpp
//   for f in ko po; do g++ $F -Dpyserve=pyA -c /tmp/$f.cpp -o /tmp/$f.o; done
//   g++ $F -Dpyserve=pyA -c csrc/common/threads.cpp -o /tmp/ta.o
//   g++ $F benchmarks/native/int8_fused_ab.cpp csrc/quant/int8_kernel.cpp csrc/quant/int8_packed_kernel.cpp \
//       csrc/common/threads.cpp /tmp/ko.o /tmp/po.o /tmp/ta.o -o /tmp/int8_fused_ab && /tmp/int8_fused_ab [rounds]
#include <time.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "quant/int8_kernel.h"
namespace pyA { namespace quant {
bool quantize_rows(const float*, int64_t, int64_t, int8_t*, float*, int64_t*);
void int8_gemm_packed(const int8_t*, const float*, int64_t, int64_t, const uint8_t*, const float*, const float*, int64_t, float*); } }
using namespace pyserve::quant;
static double cpu_us(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec*1e6+t.tv_nsec*1e-3;}
int main(int argc,char**argv){ int rounds=argc>1?atoi(argv[1]):15; std::mt19937 rng(1); std::normal_distribution<float> g;
 const int64_t shapes[][2]={{384,384},{1152,384},{1536,384},{384,1536},{768,768},{3072,768},{768,3072}};
 printf("| [N, K] | B | before us | after us | before GMAC/s | after GMAC/s | speed-up |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
 for(auto&s:shapes){int64_t N=s[0],K=s[1]; std::vector<float> wf(N*K),sw(N),bias(N); for(auto&v:wf)v=g(rng); for(auto&v:bias)v=g(rng);
  std::vector<int8_t> w(N*K); quantize_rows(wf.data(),N,K,w.data(),sw.data(),nullptr); std::vector<uint8_t> wu(int8_pack_wu_bytes(N,K)); int8_pack(w.data(),N,K,wu.data());
  for(int64_t B: {1, 16, 128}){ std::vector<float> x(B*K),y0(B*N),y1(B*N); for(auto&v:x)v=g(rng);
   auto fa=[&]{ std::vector<int8_t> xq(B*K); std::vector<float> sx(B); pyA::quant::quantize_rows(x.data(),B,K,xq.data(),sx.data(),nullptr); pyA::quant::int8_gemm_packed(xq.data(),sx.data(),B,K,wu.data(),sw.data(),bias.data(),N,y0.data());};
   auto fb=[&]{ int64_t bad; int8_linear_packed_f32(x.data(),B,K,wu.data(),sw.data(),bias.data(),N,y1.data(),&bad);};
   fa();fb(); double ta=1e30,tb=1e30; for(int r=0;r<rounds;++r){double t0=cpu_us();fa();double t1=cpu_us();fb();double t2=cpu_us();ta=std::min(ta,t1-t0);tb=std::min(tb,t2-t1);}
   double m=double(B)*N*K; bool same=!memcmp(y0.data(),y1.data(),y0.size()*4);
   printf("| [%ld, %ld] | %ld | %.1f | %.1f | %.1f | %.1f | %.2fx%s |\n",(long)N,(long)K,(long)B,ta,tb,m/ta/1e3,m/tb/1e3,ta/tb,same?"":" MISMATCH");}}}
