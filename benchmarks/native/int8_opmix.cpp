// Throughput of the AVX2 op mixes an int8 GEMM inner loop can use, one thread, CPU time: 12
// independent chains per iteration (inline asm, registers only), so only the issue ports limit.
// The "cycles per 32MAC" line compares vpsignb + vpmaddubsw + vpmaddwd + vpaddd (pyserve's row
// kernel) with vpmaddubsw + vpmaddwd + vpaddd (fbgemm's, and pyserve's packed kernel); "madd+add"
// is the int16 vpmaddwd route (16 multiply-adds per vpmaddwd). Build and run:
//   g++ -O2 benchmarks/native/int8_opmix.cpp -o /tmp/int8_opmix && /tmp/int8_opmix
// Measured 2026-11-30 (Zen 3, shared VM): vpmaddwd, vpmaddubsw, vpsignb ~2 per cycle each on shared
// ports, vpaddd ~4; A (4 ops) 1.35-1.38 cycles per 32 MACs, B (3 ops) 0.95-1.08.
#include <time.h>
#include <cstdio>
#include <chrono>
// each asm block: 12 independent ops on ymm0..ymm11, sources ymm12..ymm15
#define R(op) op " %%ymm12, %%ymm0, %%ymm0\n" op " %%ymm12, %%ymm1, %%ymm1\n" op " %%ymm12, %%ymm2, %%ymm2\n" op " %%ymm12, %%ymm3, %%ymm3\n"
double t(const char* name, void(*f)(long)){ long it=50000000; timespec a,b; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&a); f(it); clock_gettime(CLOCK_THREAD_CPUTIME_ID,&b);
 double ns=((b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec))/it; printf("%-30s %.3f ns/iter\n",name,ns); return ns;}
#define BODY(name, ops) static void name(long n){ __asm__ volatile("vpxor %%ymm12,%%ymm12,%%ymm12\n1:\n" ops "dec %0\njnz 1b\n" : "+r"(n) :: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","cc"); }
#define X12(op) op " %%ymm12, %%ymm0, %%ymm0\n" op " %%ymm12, %%ymm1, %%ymm1\n" op " %%ymm12, %%ymm2, %%ymm2\n" op " %%ymm12, %%ymm3, %%ymm3\n" op " %%ymm12, %%ymm4, %%ymm4\n" op " %%ymm12, %%ymm5, %%ymm5\n" op " %%ymm12, %%ymm6, %%ymm6\n" op " %%ymm12, %%ymm7, %%ymm7\n" op " %%ymm12, %%ymm8, %%ymm8\n" op " %%ymm12, %%ymm9, %%ymm9\n" op " %%ymm12, %%ymm10, %%ymm10\n" op " %%ymm12, %%ymm11, %%ymm11\n"
#define X6A(op1, op2) op1 " %%ymm12, %%ymm0, %%ymm0\n" op2 " %%ymm12, %%ymm1, %%ymm1\n" op1 " %%ymm12, %%ymm2, %%ymm2\n" op2 " %%ymm12, %%ymm3, %%ymm3\n" op1 " %%ymm12, %%ymm4, %%ymm4\n" op2 " %%ymm12, %%ymm5, %%ymm5\n" op1 " %%ymm12, %%ymm6, %%ymm6\n" op2 " %%ymm12, %%ymm7, %%ymm7\n" op1 " %%ymm12, %%ymm8, %%ymm8\n" op2 " %%ymm12, %%ymm9, %%ymm9\n" op1 " %%ymm12, %%ymm10, %%ymm10\n" op2 " %%ymm12, %%ymm11, %%ymm11\n"
#define X4B(a,b,c) a " %%ymm12, %%ymm0, %%ymm0\n" b " %%ymm12, %%ymm1, %%ymm1\n" c " %%ymm12, %%ymm2, %%ymm2\n" a " %%ymm12, %%ymm3, %%ymm3\n" b " %%ymm12, %%ymm4, %%ymm4\n" c " %%ymm12, %%ymm5, %%ymm5\n" a " %%ymm12, %%ymm6, %%ymm6\n" b " %%ymm12, %%ymm7, %%ymm7\n" c " %%ymm12, %%ymm8, %%ymm8\n" a " %%ymm12, %%ymm9, %%ymm9\n" b " %%ymm12, %%ymm10, %%ymm10\n" c " %%ymm12, %%ymm11, %%ymm11\n"
BODY(madd, X12("vpmaddwd"))
BODY(maddubs, X12("vpmaddubsw"))
BODY(sign, X12("vpsignb"))
BODY(add, X12("vpaddd"))
BODY(mm, X6A("vpmaddwd","vpmaddubsw"))
BODY(madd_add, X6A("vpmaddwd","vpaddd"))
BODY(mubs_add, X6A("vpmaddubsw","vpaddd"))
BODY(madd_sign, X6A("vpmaddwd","vpsignb"))
BODY(mubs_sign, X6A("vpmaddubsw","vpsignb"))
BODY(m_mu_add, X4B("vpmaddwd","vpmaddubsw","vpaddd"))
BODY(m_mu_sign, X4B("vpmaddwd","vpmaddubsw","vpsignb"))
BODY(m_sign_add, X4B("vpmaddwd","vpsignb","vpaddd"))
BODY(mulld, X12("vpmullw"))
#define CH(op) op " %%ymm12, %%ymm0, %%ymm0\n"
BODY(chain, CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd") CH("vpaddd"))
BODY(bcl, "vpbroadcastd (%%rsp), %%ymm0\n vpbroadcastd 4(%%rsp), %%ymm1\n vpbroadcastd 8(%%rsp), %%ymm2\n vpbroadcastd 12(%%rsp), %%ymm3\n" X4B("vpmaddwd","vpmaddwd","vpaddd"))
BODY(movsx, "vpmovsxbw (%%rsp), %%ymm0\n vpmovsxbw 16(%%rsp), %%ymm1\n vpmovsxbw 32(%%rsp), %%ymm2\n vpmovsxbw 48(%%rsp), %%ymm3\n" X4B("vpmaddwd","vpmaddwd","vpaddd"))
#define X3C(a,b,c,d) a " %%ymm12, %%ymm0, %%ymm0\n" b " %%ymm12, %%ymm1, %%ymm1\n" c " %%ymm12, %%ymm2, %%ymm2\n" d " %%ymm12, %%ymm3, %%ymm3\n" a " %%ymm12, %%ymm4, %%ymm4\n" b " %%ymm12, %%ymm5, %%ymm5\n" c " %%ymm12, %%ymm6, %%ymm6\n" d " %%ymm12, %%ymm7, %%ymm7\n" a " %%ymm12, %%ymm8, %%ymm8\n" b " %%ymm12, %%ymm9, %%ymm9\n" c " %%ymm12, %%ymm10, %%ymm10\n" d " %%ymm12, %%ymm11, %%ymm11\n"
BODY(mixA, X3C("vpsignb","vpmaddubsw","vpmaddwd","vpaddd"))
BODY(base8, X4B("vpmaddwd","vpmaddwd","vpaddd"))
int main(){ t("madd",madd); t("maddubs",maddubs); t("sign",sign); t("add",add); t("madd+maddubs",mm); t("madd+add",madd_add); t("maddubs+add",mubs_add);
 t("madd+sign",madd_sign); t("maddubs+sign",mubs_sign); t("madd+maddubs+add",m_mu_add); t("madd+maddubs+sign",m_mu_sign); t("madd+sign+add", m_sign_add); t("mullw",mulld); double c=t("add chain (12 cycles)",chain); t("8madd+4add",base8); t("+4 bcast",bcl); t("+4 movsx", movsx); double a=t("A sign,mubs,madd,add x3",mixA); double b=t("B mubs,madd,add x4",m_mu_add); printf("cycles per 32MAC: A %.2f  B %.2f\n", a/3*12/c, b/4*12/c); printf("GHz %.2f\n", 12/c);}
