"""The bound on int8 MiniLM speed-ups on this CPU (AVX2 + FMA, no AVX-512, no VNNI): a roofline.

    pip install -e ".[bert]"
    python benchmarks/bert_roofline.py [--seq 128] [--threads 1] [--out roofline.json]

Four measurements, one thread, CPU-time clocks (``CLOCK_THREAD_CPUTIME_ID`` / ``time.thread_time``)
and the least of repeated runs, so other load on a shared machine costs as little as it can
(descheduling not at all; a busy sibling hyperthread still does, hence the minimum):

1. **Peak instruction rates** (a small C++ program compiled here with the system ``g++``; skipped with
   a note when there is none): 12 independent chains of ``vfmadd231ps ymm`` (8 lanes x 2 flops) give
   the fp32 FMA peak; ``vpmaddubsw + vpmaddwd + vpaddd`` (32 u8 x s8 products summed into int32 per
   three instructions: fbgemm's AVX2 sequence, and pyserve's packed kernel's) and the 4-op
   ``vpsignb`` variant (pyserve's unpacked row kernel) give the int8 peak; a chain of dependent
   ``vpaddd`` (1 cycle each) gives the clock. Registers only: no loads, no stores, the ceiling no
   real GEMM reaches.
2. **What torch fp32 reaches on MiniLM's GEMMs** at ``--seq`` tokens, batch 1 (``M = seq`` rows):
   Q/K/V/output ``[M,384] x [384,384]``, fused QKV ``x [384,1152]``, FFN ``x [384,1536]`` and
   ``[M,1536] x [1536,384]`` — GFLOP/s of ``torch.nn.functional.linear``, and beside it torch's
   dynamic int8 Linear (fbgemm) and ``pyserve.ops.int8_linear`` (packed weights) on the same shapes.
3. **Where torch fp32's forward time goes**: the model at batch 1, ``--seq`` tokens = the model with
   no encoder layers (embeddings, mask, pooling) + 6 x one layer (each timed alone), and its GEMM
   share = the per-layer GEMM times of (2) x 6 layers (attention's two batched matmuls counted as
   non-GEMM here: they stay fp32 in every engine).
4. **Ceilings** (Amdahl's law, Hennessy & Patterson; the roofline of Williams et al. 2009 with the
   compute roof only — MiniLM's weights, 21 MB fp32 / 5 MB int8 per pass, take < 2 ms at the
   measured ~13 GB/s, well under the compute time at 128 tokens):

   * int8 GEMMs at the int8 *peak* (1) with the non-GEMM time unchanged:
     ``T_fp32 / (T_other + T_gemm * fp32_rate / int8_peak)``;
   * the same with the non-GEMM time cut to zero (no engine can beat it);
   * "3 layers + int8 vs 6 layers fp32": the same with half the layers (the embeddings and pooling,
     measured separately, stay).

Output: the figures as a Markdown table and, with ``--out``, JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

#: one thread, registers only: 12 independent accumulators per loop iteration (enough to cover the
#: FMA / vpmadd latencies on two pipes), CPU time of 2e8 iterations; prints one "name value" per line
PEAK_SRC = r"""
#include <time.h>
#include <cstdio>
static double cpu_ns() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
#define OPS12(op, src) \
  op " %%ymm" src ", %%ymm13, %%ymm0\n" op " %%ymm" src ", %%ymm13, %%ymm1\n" op " %%ymm" src ", %%ymm13, %%ymm2\n" \
  op " %%ymm" src ", %%ymm13, %%ymm3\n" op " %%ymm" src ", %%ymm13, %%ymm4\n" op " %%ymm" src ", %%ymm13, %%ymm5\n" \
  op " %%ymm" src ", %%ymm13, %%ymm6\n" op " %%ymm" src ", %%ymm13, %%ymm7\n" op " %%ymm" src ", %%ymm13, %%ymm8\n" \
  op " %%ymm" src ", %%ymm13, %%ymm9\n" op " %%ymm" src ", %%ymm13, %%ymm10\n" op " %%ymm" src ", %%ymm13, %%ymm11\n"
// three-op int8 step on 4 independent accumulators: t = maddubs(a, b); t = madd(t, ones); acc += t
#define I8(i, t) "vpmaddubsw %%ymm12, %%ymm13, %%ymm" t "\nvpmaddwd %%ymm14, %%ymm" t ", %%ymm" t "\nvpaddd %%ymm" t ", %%ymm" i ", %%ymm" i "\n"
#define I8S(i, t) "vpsignb %%ymm12, %%ymm13, %%ymm" t "\nvpmaddubsw %%ymm" t ", %%ymm15, %%ymm" t "\nvpmaddwd %%ymm14, %%ymm" t ", %%ymm" t "\nvpaddd %%ymm" t ", %%ymm" i ", %%ymm" i "\n"
#define CLOBBER "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13","xmm14","xmm15","cc"
#define LOOP(name, body) static void name(long n) { __asm__ volatile( \
  "vxorps %%ymm12, %%ymm12, %%ymm12\nvxorps %%ymm13, %%ymm13, %%ymm13\nvxorps %%ymm14, %%ymm14, %%ymm14\n" \
  "vxorps %%ymm15, %%ymm15, %%ymm15\n1:\n" body "dec %0\njnz 1b\n" : "+r"(n) :: CLOBBER); }
LOOP(fma12, OPS12("vfmadd231ps", "12"))
LOOP(int8_3op, I8("0", "6") I8("1", "7") I8("2", "8") I8("3", "9") I8("4", "10") I8("5", "11"))
LOOP(int8_4op, I8S("0", "6") I8S("1", "7") I8S("2", "8") I8S("3", "9") I8S("4", "10") I8S("5", "11"))
LOOP(addchain, "vpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\n"
               "vpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\n"
               "vpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\n"
               "vpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\nvpaddd %%ymm12, %%ymm0, %%ymm0\n")
static double ns_per_iter(void (*f)(long)) {
  const long n = 20000000; double best = 1e30;
  for (int r = 0; r < 5; ++r) { double t0 = cpu_ns(); f(n); double dt = (cpu_ns() - t0) / n; if (dt < best) best = dt; }
  return best;
}
int main() {
  const double chain = ns_per_iter(addchain);             // 12 dependent 1-cycle adds
  const double ghz = 12.0 / chain;
  const double fma = ns_per_iter(fma12);                   // 12 FMAs x 8 lanes = 96 MACs
  const double i3 = ns_per_iter(int8_3op);                 // 6 x 32 = 192 MACs
  const double i4 = ns_per_iter(int8_4op);                 // 6 x 32 = 192 MACs
  std::printf("ghz %.4f\nfp32_gmacs %.4f\nint8_3op_gmacs %.4f\nint8_4op_gmacs %.4f\n", ghz, 96.0 / fma, 192.0 / i3,
              192.0 / i4);
  std::printf("fp32_macs_per_cycle %.3f\nint8_3op_macs_per_cycle %.3f\nint8_4op_macs_per_cycle %.3f\n",
              96.0 / fma / ghz, 192.0 / i3 / ghz, 192.0 / i4 / ghz);
}
"""


def native_peaks() -> dict | None:
    """Peak rates of (1) from the compiled program, or None (with a message) without g++."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        print("bert_roofline: no C++ compiler (g++ or $CXX): peak instruction rates skipped", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(PEAK_SRC)
        subprocess.run([cxx, "-O2", str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def cpu_best(fn, reps: int = 15, min_time_s: float = 0.3) -> float:
    """The least thread CPU seconds of ``fn()`` over at least ``reps`` calls and ``min_time_s``.
    The minimum, not the median: on a 2-vCPU machine whose vCPUs are one core's two hyperthreads,
    work on the sibling slows a thread even in CPU time; the least disturbed call is the one to
    compare with peak rates (and what bert_profile.py's per-node times take too)."""
    fn()
    fn()
    ts = []
    start = time.thread_time()
    while len(ts) < reps or time.thread_time() - start < min_time_s:
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return min(ts)


#: MiniLM's Linear shapes per layer (N, K) and how many of each one layer has
LAYER_GEMMS = {"q/k/v/attn-out [384,384]": ((384, 384), 4), "fused qkv [1152,384]": ((1152, 384), 0),
               "ffn in [1536,384]": ((1536, 384), 1), "ffn out [384,1536]": ((384, 1536), 1)}


def gemm_rates(M: int) -> dict:
    """Per shape: seconds and GFLOP/s of torch fp32, fbgemm dynamic int8 and pyserve int8_linear."""
    import torch

    from pyserve import ops
    from pyserve.ops.quant import _pin_packed

    torch.manual_seed(0)
    out = {}
    for name, ((N, K), _count) in LAYER_GEMMS.items():
        x = torch.randn(M, K)
        lin = torch.nn.Linear(K, N)
        w, b = lin.weight.detach(), lin.bias.detach()
        dyn = torch.ao.nn.quantized.dynamic.Linear(K, N, dtype=torch.qint8)
        dyn.set_weight_bias(torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(N, dtype=torch.long), 0,
                                                       torch.qint8), b)
        wq, ws = ops.quantize_per_channel(w)
        wq = wq.contiguous()
        _pin_packed(wq)
        flop = 2.0 * M * N * K
        with torch.inference_mode():
            t = {"torch fp32": cpu_best(lambda: torch.nn.functional.linear(x, w, b)),
                 "fbgemm int8": cpu_best(lambda: dyn(x)),
                 "pyserve int8_linear": cpu_best(lambda: ops.int8_linear(x, wq, ws, b))}
        out[name] = {k: {"s": v, "gflops": flop / v / 1e9} for k, v in t.items()}
        out[name]["flop"] = flop
    return out


def big_sgemm() -> float:
    """GFLOP/s of torch's fp32 1024^3 GEMM (the practical fp32 peak of the BLAS)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / cpu_best(lambda: a @ b, reps=5) / 1e9


def model_times(seq: int) -> dict:
    """torch fp32 MiniLM at batch 1, ``seq`` tokens: one encoder layer alone (its inputs captured from
    a real forward), the model with no encoder layers (embeddings, mask and pooling only), and the
    whole forward. ``est_s`` = no layers + 6 x one layer: pieces of a few ms, each timed by its least
    CPU time, resist other load better than a whole 50 ms call, which a busy machine rarely leaves
    undisturbed (``whole_s`` is given beside it)."""
    import copy

    import torch

    spec = importlib.util.spec_from_file_location("_minilm_model", ROOT / "examples" / "minilm" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from pyserve.datasets import transfer_sentences

    tok = mod.tokenizer()
    model = mod.MiniLM()
    enc = tok(transfer_sentences(1), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    layers = model.encoder.encoder.layer
    captured = {}

    def grab(_mod, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    none = copy.deepcopy(model)
    none.encoder.encoder.layer = torch.nn.ModuleList([])
    with torch.inference_mode():
        hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        model(ids, mask)
        hook.remove()
        args, kwargs = captured["call"]
        one = cpu_best(lambda: layers[0](*args, **kwargs), reps=30)
        base = cpu_best(lambda: none(ids, mask), reps=30)
        whole = cpu_best(lambda: model(ids, mask))
    L = len(layers)
    return {"layer_s": one, "no_layers_s": base, "whole_s": whole, "est_s": base + L * one,
            "three_layers_s": base + 3 * one, "layers": L}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128, help="tokens (batch 1): GEMM rows M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.seq < 1 or args.threads < 1:
        print("bert_roofline: --seq and --threads must be >= 1", file=sys.stderr)
        return 2

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pyserve import ops

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    peaks = native_peaks()
    sgemm = big_sgemm()
    gemms = gemm_rates(args.seq)
    times = model_times(args.seq)
    load1 = os.getloadavg()[0]

    L = times["layers"]
    engines = ("torch fp32", "fbgemm int8", "pyserve int8_linear")
    per_layer = {e: sum(gemms[n][e]["s"] * c for n, ((_, _), c) in LAYER_GEMMS.items()) for e in engines}
    flop_layer = sum(gemms[n]["flop"] * c for n, ((_, _), c) in LAYER_GEMMS.items())
    t_gemm = per_layer["torch fp32"] * L
    t_whole = times["est_s"]
    t_other = max(t_whole - t_gemm, 0.0)
    fp32_rate = flop_layer * L / t_gemm  # flop/s torch reaches on these GEMMs
    res = {"seq": args.seq, "threads": args.threads, "load_avg": [load0, load1], "peaks": peaks,
           "sgemm_1024_gflops": sgemm, "gemms": gemms, "model": times, "gemm_s": t_gemm, "other_s": t_other,
           "fp32_gemm_gflops": fp32_rate / 1e9, "per_layer_gemm_s": per_layer}
    ceil = {}
    if peaks:
        int8_peak = 2 * peaks["int8_3op_gmacs"] * 1e9  # ops/s, 2 per MAC
        fp32_peak = 2 * peaks["fp32_gmacs"] * 1e9
        r = int8_peak / fp32_rate  # the most int8 GEMMs can gain over torch's fp32 GEMMs
        res.update(fp32_peak_gflops=fp32_peak / 1e9, int8_peak_gops=int8_peak / 1e9, gemm_gain_ceiling=r)
        t_other_layers = t_other - times["no_layers_s"]  # attention, LayerNorm, GELU, residual adds, ...
        ceil["int8 vs fp32, non-GEMM as torch"] = t_whole / (t_other + t_gemm / r)
        ceil["int8 vs fp32, non-GEMM free"] = t_whole / (t_gemm / r)
        ceil["int8 vs fp32, int8 GEMMs at fbgemm's measured rate, non-GEMM as torch"] = \
            t_whole / (t_other + per_layer["fbgemm int8"] * L)
        half = L // 2
        ceil["3 layers + int8 vs 6 fp32, non-GEMM as torch"] = \
            t_whole / (times["no_layers_s"] + t_other_layers * half / L + t_gemm * half / L / r)
        ceil["3 layers + int8 vs 6 fp32, non-GEMM of the layers free"] = \
            t_whole / (times["no_layers_s"] + t_gemm * half / L / r)
        ceil["3 layers fp32 vs 6 fp32 (depth alone)"] = t_whole / times["three_layers_s"]
    res["ceilings"] = ceil
    print(report(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> str:
    p = res["peaks"]
    lines = [f"batch 1, sequence {res['seq']}, {res['threads']} thread(s); load average {res['load_avg'][0]:.1f} -> "
             f"{res['load_avg'][1]:.1f}; CPU time, least of repeated runs", ""]
    if p:
        lines += ["| peak (registers only, 1 thread) | rate | per cycle |", "| --- | ---: | ---: |",
                  f"| clock (dependent vpaddd chain) | {p['ghz']:.2f} GHz | |",
                  f"| fp32 vfmadd231ps ymm | {2 * p['fp32_gmacs']:.1f} GFLOP/s | {p['fp32_macs_per_cycle']:.1f} MAC |",
                  f"| int8 vpmaddubsw+vpmaddwd+vpaddd | {2 * p['int8_3op_gmacs']:.1f} GOP/s | "
                  f"{p['int8_3op_macs_per_cycle']:.1f} MAC |",
                  f"| int8 vpsignb+vpmaddubsw+vpmaddwd+vpaddd | {2 * p['int8_4op_gmacs']:.1f} GOP/s | "
                  f"{p['int8_4op_macs_per_cycle']:.1f} MAC |",
                  f"| int8 peak / fp32 peak | {p['int8_3op_gmacs'] / p['fp32_gmacs']:.2f}x | |", ""]
    lines += [f"torch fp32 1024^3 GEMM: {res['sgemm_1024_gflops']:.1f} GFLOP/s", "",
              f"| GEMM at M = {res['seq']} | torch fp32 us | GFLOP/s | fbgemm int8 us | GOP/s | "
              "pyserve int8_linear us | GOP/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, g in res["gemms"].items():
        lines.append(f"| {name} | " + " | ".join(f"{g[e]['s'] * 1e6:.0f} | {g[e]['gflops']:.1f}"
                                               for e in ("torch fp32", "fbgemm int8", "pyserve int8_linear")) + " |")
    m = res["model"]
    lines += ["", f"torch fp32 MiniLM forward: {m['est_s'] * 1e3:.2f} ms (embeddings, mask and pooling "
              f"{m['no_layers_s'] * 1e3:.2f} ms + {m['layers']} x one layer {m['layer_s'] * 1e3:.2f} ms; the whole "
              f"call's least time {m['whole_s'] * 1e3:.2f} ms) = GEMMs {res['gemm_s'] * 1e3:.2f} ms "
              f"({100 * res['gemm_s'] / m['est_s']:.0f}%, {res['fp32_gemm_gflops']:.1f} GFLOP/s) + the rest "
              f"{res['other_s'] * 1e3:.2f} ms; 3 layers: {m['three_layers_s'] * 1e3:.2f} ms"]
    if p:
        lines += [f"int8 peak / torch's fp32 GEMM rate here = {res['gemm_gain_ceiling']:.2f}x (the most int8 GEMMs can gain)",
                  "", "| ceiling of the speed-up over torch fp32 (6 layers) | x |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in res["ceilings"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
