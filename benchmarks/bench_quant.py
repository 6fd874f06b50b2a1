"""int8_linear and codebook_linear vs torch peers, one thread then two.

int8_linear on BERT-base shapes ([N, K] = [768, 768], [3072, 768], [768, 3072]; B = 1, 8, 64, 128)
against torch fp32 ``F.linear`` and torch's dynamic int8 Linear (``quantize_dynamic``, fbgemm), with
the weights packed once (``pack_int8_weight``, as a loaded model runs) and as a plain int8 array (the
row kernel below 16 rows; from 16 rows ``int8_linear`` packs plain weights for each call); the four
candidates are timed in interleaved rounds.
codebook_linear with 4- and 5-bit per-layer codebooks (B = 1, 8) against dense fp32 ``F.linear`` of
the decoded weights, both "hot" (the same layer again and again, weights resident in the L3: 32 MB
on the project's machines)
and "cold" (cycling through distinct copies of the layer totalling 96 MB of fp32 weights, so each
call streams its weights from DRAM, as a model larger than the cache does). Every call includes its Python overhead; pyserve gets numpy inputs, torch its
tensors. Each timing is the median of --repeats runs of a loop sized to ~20 ms; the thread counts
run in separate processes (OMP_NUM_THREADS for pyserve's OpenMP, torch.set_num_threads for torch).
Ratios > 1 mean pyserve is faster. Goals (issue 3): int8 >= 1.0x fbgemm everywhere; codebook >= 5x
dense fp32 at B = 1.

    python benchmarks/bench_quant.py [--threads 1,2] [--repeats 7] [--clock wall|cpu] [--only int8|codebook]
        [--int8-shapes bert|minilm] [--peak-gmacs G]

The int8 table also gives each int8 kernel's rate, GMAC/s (B * N * K multiply-adds per call, the
activation quantization and the Python call included), and with --peak-gmacs G (this CPU's per-thread
peak for the instruction sequence pyserve's kernels use here, from benchmarks/native/int8_roofline.cpp:
"int8 reg" for AVX2's vpmaddubsw + vpmaddwd + vpaddd, "int8 vnni" where ``cpu_kernels()`` reports
avx512_vnni) its fraction of the roof, G x threads. The header line gives build_info() and the
cpu_kernels() in use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

INT8_SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # [N, K]
INT8_BATCHES = [1, 8, 64, 128]
# --int8-shapes minilm: all-MiniLM-L6-v2's Linear layers (hidden 384, fused QKV 1152, FFN 1536), B = tokens
MINILM_SHAPES = [(384, 384), (1152, 384), (1536, 384), (384, 1536)]
MINILM_BATCHES = [16, 64, 128]
CB_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
CB_BITS = [4, 5]
CB_BATCHES = [1, 8]
COLD_BYTES = 96 << 20


def _cycle(items):
    while True:
        yield from items


CLOCK = time.perf_counter


def median_us(fn, repeats: int) -> float:
    fn()
    t0 = CLOCK()
    fn()
    once = max(CLOCK() - t0, 1e-6)
    inner = max(1, int(0.02 / once))
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        times.append((CLOCK() - t0) / inner)
    return statistics.median(times) * 1e6


def interleaved_medians_us(fns: dict, repeats: int) -> dict:
    """Per name, the median over ``repeats`` rounds of the time per call of ``fns[name]``; each round
    times every candidate once, in turn (a loop sized to ~20 ms each), so bursts of load from other
    processes fall on all of them alike."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = CLOCK()
        fn()
        inner[name] = max(1, int(0.02 / max(CLOCK() - t0, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            for _ in range(inner[name]):
                fn()
            times[name].append((CLOCK() - t0) / inner[name])
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def child(threads: int, repeats: int, only: str = "", int8_shapes: str = "bert") -> dict:
    import torch
    import torch.nn.functional as F

    from pyserve.ops import codebook_linear, int8_linear, pack_indices, pack_int8_weight, quantize_per_channel

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        from torch.ao.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    rows = {"int8": [], "codebook": []}
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        shapes, batches = (MINILM_SHAPES, MINILM_BATCHES) if int8_shapes == "minilm" else (INT8_SHAPES, INT8_BATCHES)
        for N, K in shapes if only != "codebook" else []:
            w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
            b = rng.standard_normal(N).astype(np.float32)
            lin = torch.nn.Linear(K, N)
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qlin = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
            q, s = quantize_per_channel(w)
            packed = pack_int8_weight(q)  # once, as a loaded model does (int8_linear caches it for torch weights)
            wt, bt = torch.from_numpy(w), torch.from_numpy(b)
            for B in batches:
                x = rng.standard_normal((B, K)).astype(np.float32)
                xt = torch.from_numpy(x)
                t = interleaved_medians_us({
                    "fp32_us": lambda: F.linear(xt, wt, bt),
                    "fbgemm_us": lambda: qlin(xt),
                    "pyserve_us": lambda: int8_linear(x, q, s, b),
                    "packed_us": lambda: int8_linear(x, packed, s, b),
                }, repeats)
                rows["int8"].append({"N": N, "K": K, "B": B, **t})
        for N, K in CB_SHAPES if only != "int8" else []:
            b = rng.standard_normal(N).astype(np.float32)
            for bits in CB_BITS:
                idx = rng.integers(0, 2**bits, (N, K)).astype(np.uint8)
                cb = np.sort(rng.standard_normal(2**bits)).astype(np.float32) * np.float32(0.05)
                packed = pack_indices(idx, bits)
                wt, bt = torch.from_numpy(cb[idx]), torch.from_numpy(b)
                # "cold": cycle through enough distinct copies (> COLD_BYTES of fp32 weights, more
                # than this CPU's 32 MB L3) that every call reads its weights from DRAM, as a model
                # larger than the cache does; "hot": the same layer again and again (cache-resident).
                copies = max(1, COLD_BYTES // (N * K * 4))
                cold_w = [wt.clone() for _ in range(copies)]
                cold_p = [packed.copy() for _ in range(copies)]
                for B in CB_BATCHES:
                    x = rng.standard_normal((B, K)).astype(np.float32)
                    xt = torch.from_numpy(x)
                    it_w, it_p = _cycle(cold_w), _cycle(cold_p)
                    rows["codebook"].append({
                        "N": N, "K": K, "bits": bits, "B": B,
                        "fp32_us": median_us(lambda: F.linear(xt, wt, bt), repeats),
                        "pyserve_us": median_us(lambda: codebook_linear(x, packed, cb, bits, b), repeats),
                        "fp32_cold_us": median_us(lambda: F.linear(xt, next(it_w), bt), repeats),
                        "pyserve_cold_us": median_us(lambda: codebook_linear(x, next(it_p), cb, bits, b), repeats),
                    })
                del cold_w, cold_p
    rows["load"] = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    return rows


def print_tables(threads: int, rows: dict, peak_gmacs: float = 0.0) -> None:
    print(f"\n### int8_linear, {threads} thread(s) (median us per call; ratio = peer time / pyserve time; "
          f"load average {rows.get('load', '?')})\n")
    roof = peak_gmacs * threads
    print("| W [N, K] | B | torch fp32 µs | torch int8 (fbgemm) µs | pyserve int8 packed µs | pyserve int8 rows µs "
          "| packed vs fbgemm | rows vs fbgemm | packed vs fp32 | fbgemm GMAC/s | packed GMAC/s |"
          + (f" fbgemm % of {roof:.0f} | packed % of {roof:.0f} |" if roof else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if roof else ""))
    for r in rows["int8"]:
        macs = r["B"] * r["N"] * r["K"] / 1e3  # per us -> GMAC/s
        rates = (macs / r["fbgemm_us"], macs / r["packed_us"])
        print(f"| [{r['N']}, {r['K']}] | {r['B']} | {r['fp32_us']:.1f} | {r['fbgemm_us']:.1f} | {r['packed_us']:.1f} "
              f"| {r['pyserve_us']:.1f} | {r['fbgemm_us'] / r['packed_us']:.2f}x | {r['fbgemm_us'] / r['pyserve_us']:.2f}x "
              f"| {r['fp32_us'] / r['packed_us']:.2f}x | {rates[0]:.1f} | {rates[1]:.1f} |"
              + (f" {100 * rates[0] / roof:.0f}% | {100 * rates[1] / roof:.0f}% |" if roof else ""))
    print(f"\n### codebook_linear, {threads} thread(s) (median us per call; ratio = dense time / pyserve time)\n")
    print("| W [N, K] | bits | B | dense fp32 hot | pyserve hot | vs dense hot | dense fp32 cold | pyserve cold "
          "| vs dense cold |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows["codebook"]:
        print(f"| [{r['N']}, {r['K']}] | {r['bits']} | {r['B']} | {r['fp32_us']:.1f} | {r['pyserve_us']:.1f} "
              f"| {r['fp32_us'] / r['pyserve_us']:.2f}x | {r['fp32_cold_us']:.1f} | {r['pyserve_cold_us']:.1f} "
              f"| {r['fp32_cold_us'] / r['pyserve_cold_us']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each in its own process")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (CPU time of the process, "
                        "robust to being descheduled on a shared machine; meaningful for 1 thread only)")
    parser.add_argument("--only", choices=["int8", "codebook"], default="", help="run one of the two tables")
    parser.add_argument("--int8-shapes", choices=["bert", "minilm"], default="bert",
                        help="int8 layer shapes: BERT-base (B 1/8/64/128) or all-MiniLM-L6-v2 (B 16/64/128 tokens)")
    parser.add_argument("--peak-gmacs", type=float, default=0.0,
                        help="per-thread int8 peak, GMAC/s (benchmarks/native/int8_roofline.cpp: 'int8 reg', or "
                             "'int8 vnni' on AVX-512 VNNI CPUs): adds %% of roof columns")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.only, args.int8_shapes)))
        return
    from pyserve.ops import build_info, cpu_kernels

    print(f"pyserve {build_info()}; in use {cpu_kernels()}; os.cpu_count() = {os.cpu_count()}")
    for threads in [int(t) for t in args.threads.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        print(f"\n({args.clock} clock)")
        out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats),
                              "--clock", args.clock, "--int8-shapes", args.int8_shapes]
                             + (["--only", args.only] if args.only else []),
                             env=env, capture_output=True, text=True, check=True)
        print_tables(threads, json.loads(out.stdout.strip().splitlines()[-1]), args.peak_gmacs)


if __name__ == "__main__":
    main()
