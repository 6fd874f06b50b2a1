"""csr_linear (y = x @ W.T + b, W pruned, in CSR) vs torch dense, torch sparse CSR and scipy.sparse.

Shapes from issue 3: W [N, K] in {[3072, 768], [768, 3072]} (BERT-base FFN), sparsity in
{70, 90, 95, 99}%, batch B in {1, 8, 64}; nonzeros placed uniformly at random per row.
Ours, two ways: "raw" = csr_linear(x, indptr, indices, values, b) on the scipy arrays (validated
at each call), "packed" = csr_linear(x, pack_csr_weight(...), bias=b) (validated and packed once,
16-bit column indices, SELL-8 slices: what a loaded artifact runs).
Peers, all with the bias and all in this run:
  dense   torch.nn.functional.linear(x, W, b)              (MKL/oneDNN sgemm)
  tsparse torch.sparse.mm(W.to_sparse_csr(), x.T).T + b    (MKL sparse where available)
  scipy   (scipy.sparse.csr_matrix(W) @ x.T).T + b          (single-threaded always)
Each call is timed in a loop of at least --min-ms milliseconds, the four taking turns within each of
--repeats rounds; the median per call is reported in microseconds. One thread first, then 2 (torch.set_num_threads and
pyserve.ops.set_num_threads together). Ratios are peer time / pyserve packed time (> 1: pyserve
faster); "raw/packed" is raw time / packed time.

    python benchmarks/bench_csr.py [--repeats 7] [--threads 1,2] [--quick] [--clock wall|cpu]

--clock cpu times with time.process_time (CPU time of the process; use it with --threads 1 on a
shared machine: time spent descheduled does not count).
"""

from __future__ import annotations

import argparse
import warnings
import statistics
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from pyserve.ops import build_info, csr_linear, pack_csr_weight, set_num_threads
from pyserve.ops.reference import csr_linear_reference


def make_weight(n: int, k: int, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    keep = rng.random((n, k)) >= sparsity
    return np.where(keep, w, 0.0).astype(np.float32)


CLOCK = time.perf_counter


def time_interleaved(fns: dict, repeats: int, min_ms: float) -> dict:
    """Median microseconds per call of each fn; the fns take turns within every repeat, so a change
    in machine load between repeats hits all of them alike (the machine is shared)."""
    loops = {}
    for name, fn in fns.items():
        fn()
        t0 = CLOCK()
        fn()
        loops[name] = max(1, int(min_ms / 1e3 / max(CLOCK() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            for _ in range(loops[name]):
                fn()
            samples[name].append((CLOCK() - t0) / loops[name] * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=20.0)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="90%% sparsity only, fewer repeats")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--sparsities", default=None, help="comma-separated, e.g. 0.9,0.99 (default: all four)")
    ap.add_argument("--batches", default="1,8,64")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    if args.quick:
        args.repeats = 3
    shapes = [(3072, 768), (768, 3072)]
    sparsities = [0.9] if args.quick else [0.7, 0.9, 0.95, 0.99]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    rng = np.random.default_rng(0)
    print(f"build_info: {build_info()}; torch {torch.__version__}; {args.clock} clock")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        set_num_threads(threads)
        for n, k in shapes:
            for s in sparsities:
                w = make_weight(n, k, s, rng)
                b = rng.standard_normal(n).astype(np.float32)
                csr = sp.csr_matrix(w)
                csr.sort_indices()
                wt, bt = torch.from_numpy(w), torch.from_numpy(b)
                wt_csr = wt.to_sparse_csr()
                indptr, indices, values = csr.indptr, csr.indices, csr.data
                packed = pack_csr_weight(indptr, indices, values, k)
                for bsz in batches:
                    x = rng.standard_normal((bsz, k)).astype(np.float32)
                    xt = torch.from_numpy(x)
                    y = csr_linear(x, indptr, indices, values, b)
                    ref = csr_linear_reference(x, indptr, indices, values, b)
                    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
                    np.testing.assert_allclose(csr_linear(x, packed, bias=b), ref, rtol=1e-4, atol=1e-4)
                    t = time_interleaved({
                        "packed": lambda: csr_linear(x, packed, bias=b),
                        "raw": lambda: csr_linear(x, indptr, indices, values, b),
                        "dense": lambda: F.linear(xt, wt, bt),
                        "tsparse": lambda: torch.sparse.mm(wt_csr, xt.T).T + bt,
                        "scipy": lambda: (csr @ x.T).T + b,
                    }, args.repeats, args.min_ms)
                    rows.append((threads, n, k, s, bsz, t))
                    print(f"t={threads} W[{n},{k}] s={s:.0%} B={bsz}: " +
                          " ".join(f"{name} {us:.1f}us" for name, us in t.items()), flush=True)
    print()
    print("| threads | W [N, K] | sparsity | B | packed us | raw us | dense us | torch sparse us | scipy us "
          "| vs dense | vs torch sparse | vs scipy | raw/packed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for threads, n, k, s, bsz, t in rows:
        p = t["packed"]
        print(f"| {threads} | [{n}, {k}] | {s:.0%} | {bsz} | {p:.1f} | {t['raw']:.1f} | {t['dense']:.1f} | "
              f"{t['tsparse']:.1f} | {t['scipy']:.1f} | {t['dense'] / p:.2f}x | {t['tsparse'] / p:.2f}x | "
              f"{t['scipy'] / p:.2f}x | {t['raw'] / p:.2f}x |")


if __name__ == "__main__":
    main()
