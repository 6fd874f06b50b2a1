"""GPU benchmarks of csr_linear, int8_linear and codebook_linear against torch on the same device.

Peers, all measured in this run on the same CUDA device, medians of --repeats timings of a loop of
calls (CUDA events, after warm-up):
  csr_linear       vs dense fp32 ``F.linear`` (cuBLAS), dense fp16 ``F.linear`` (cuBLAS, tensor
                   cores), and ``torch.sparse.mm(W_csr, x.T).T + b`` (cuSPARSE SpMM).
                   W [N, K] in {[3072, 768], [768, 3072]}, sparsity {90, 99}%, B {1, 8, 64}.
  int8_linear      vs fp32 and fp16 ``F.linear`` and ``torch._int_mm`` (cuBLASLt int8 GEMM, int32
                   out; where torch accepts the shape: B > 16 and multiples of 8), BERT-base shapes
                   [768, 768], [3072, 768], [768, 3072], B {1, 8, 64, 128}.
  codebook_linear  4 and 5 bits, per-layer codebook, vs fp32 and fp16 ``F.linear`` of the decoded
                   weights, the same shapes, B {1, 8}.
  huffman_decode   chunked streams (1024, 4096 and 16384 symbols per chunk) of 5- and 8-bit quantized indices, 1, 16
                   and 64 MiB decoded, vs the host decoder, the host decoder + copy to the GPU, and
                   the copy alone of the decoded symbols ("err" is the count of wrong symbols).
Each pyserve call goes through its Python face with CUDA tensors (including its argument checks;
csr_linear validates indptr/indices inside its kernel and reads back one 8-byte word, a sync of the
current stream; int8/codebook are queued on the current stream without a sync), as a user would
call it. Every pyserve result is also checked against the fp32 torch peer (max relative
error in the results). Ratios are peer time / pyserve time (> 1: pyserve faster).

    python benchmarks/bench_gpu.py [--out results.json] [--repeats 7] [--quick] [--device cuda:0]

Exits with status 2 and a message when no CUDA device is present or pyserve was built without CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

CSR_SHAPES = [(3072, 768), (768, 3072)]  # [N, K]
CSR_SPARSITY = [0.90, 0.99]
CSR_BATCHES = [1, 8, 64]
INT8_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
INT8_BATCHES = [1, 8, 64, 128]
CB_BITS = [4, 5]
CB_BATCHES = [1, 8]
HUFFMAN_MB = [1, 16, 64]  # decoded size, MiB of uint8 symbols
HUFFMAN_CHUNKS = [1024, 4096, 16384]  # symbols per chunk (format version 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_results.json", help="results file (JSON); default %(default)s")
    p.add_argument("--repeats", type=_positive_int, default=7, help="timings per case; median reported")
    p.add_argument("--min-ms", type=float, default=20.0, help="GPU time per timing loop, ms")
    p.add_argument("--device", default="cuda:0", help="torch device string; default %(default)s")
    p.add_argument("--quick", action="store_true", help="one shape per op, 3 repeats (smoke run)")
    p.add_argument("--ops", default="csr,int8,codebook,huffman",
                   help="comma-separated subset of csr,int8,codebook,huffman; default %(default)s")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - {"csr", "int8", "codebook", "huffman"})
    if unknown or not ops:
        p.error(f"--ops: expected a subset of csr,int8,codebook,huffman, got {args.ops!r}")
    args.ops = ops
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args


def gpu_problem(device: str) -> Optional[str]:
    """Why the benchmark cannot run here (a one-line message), or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    from pyserve.ops import build_info, cuda_device_count

    if not build_info()["cuda"]:
        return "pyserve._C was built without CUDA (rebuild with PYSERVE_CUDA=ON in a fresh build dir)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if cuda_device_count() == 0:
        return "the CUDA runtime in pyserve._C sees no device"
    try:
        torch.device(device)
    except RuntimeError as exc:
        return f"--device {device!r}: {exc}"
    return None


def time_gpu(fn: Callable[[], object], repeats: int, min_ms: float) -> float:
    """Median microseconds per call of ``fn`` on the current CUDA stream (CUDA events)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    loops = max(1, min(10_000, int(min_ms / once_ms)))
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / loops)
    return statistics.median(samples)


def _rel_err(y, ref) -> float:
    import torch

    y, ref = y.float(), ref.float()
    return float(torch.linalg.vector_norm(y - ref) / max(float(torch.linalg.vector_norm(ref)), 1e-30))


def bench_csr(args, dev, rows: list) -> None:
    import torch
    import torch.nn.functional as F

    from pyserve.ops import csr_linear

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = CSR_SHAPES[:1] if args.quick else CSR_SHAPES
    for (n, k) in shapes:
        for sparsity in CSR_SPARSITY:
            w = torch.randn(n, k, generator=gen)
            w[torch.rand(n, k, generator=gen) < sparsity] = 0
            w = w.to(dev)
            b = torch.randn(n, generator=gen).to(dev)
            w_csr = w.to_sparse_csr()
            indptr, indices, values = w_csr.crow_indices(), w_csr.col_indices(), w_csr.values()
            w16, b16 = w.half(), b.half()
            for batch in CSR_BATCHES:
                x = torch.randn(batch, k, generator=gen).to(dev)
                x16 = x.half()
                ref = F.linear(x, w, b)
                err = _rel_err(csr_linear(x, indptr, indices, values, b), ref)
                fns = {
                    "pyserve": lambda: csr_linear(x, indptr, indices, values, b),
                    "dense_fp32": lambda: F.linear(x, w, b),
                    "dense_fp16": lambda: F.linear(x16, w16, b16),
                    "cusparse": lambda: torch.sparse.mm(w_csr, x.T).T + b,
                }
                rows.append(_row("csr_linear", {"N": n, "K": k, "sparsity": sparsity, "B": batch}, fns, err, args))


def bench_int8(args, dev, rows: list) -> None:
    import torch
    import torch.nn.functional as F

    from pyserve.ops import int8_linear, quantize_per_channel

    gen = torch.Generator(device="cpu").manual_seed(1)
    shapes = INT8_SHAPES[:1] if args.quick else INT8_SHAPES
    for (n, k) in shapes:
        w = torch.randn(n, k, generator=gen) * 0.05
        q, s = quantize_per_channel(w)  # on the CPU, then moved
        w, q, s = w.to(dev), q.to(dev), s.to(dev)
        b = torch.randn(n, generator=gen).to(dev)
        w16, b16 = w.half(), b.half()
        for batch in INT8_BATCHES:
            x = torch.randn(batch, k, generator=gen).to(dev)
            x16 = x.half()
            ref = F.linear(x, w, b)
            err = _rel_err(int8_linear(x, q, s, b), ref)
            fns = {
                "pyserve": lambda: int8_linear(x, q, s, b),
                "dense_fp32": lambda: F.linear(x, w, b),
                "dense_fp16": lambda: F.linear(x16, w16, b16),
            }
            xq = torch.randint(-127, 128, (batch, k), dtype=torch.int8, generator=gen).to(dev)
            # int8 x int8 -> int32 GEMM alone (no activation quantization, no rescale): a lower bound
            # for any int8 linear built on torch; torch accepts only some shapes and layouts.
            for q_kn in (q.T, q.T.contiguous()):
                try:
                    torch._int_mm(xq, q_kn)
                except (RuntimeError, AttributeError):
                    continue
                fns["torch_int_mm"] = lambda q_kn=q_kn: torch._int_mm(xq, q_kn)
                break
            rows.append(_row("int8_linear", {"N": n, "K": k, "B": batch}, fns, err, args))


def bench_codebook(args, dev, rows: list) -> None:
    import torch
    import torch.nn.functional as F

    from pyserve.ops import codebook_linear, pack_indices

    rng = np.random.default_rng(2)
    shapes = INT8_SHAPES[:1] if args.quick else INT8_SHAPES
    for (n, k) in shapes:
        for bits in CB_BITS:
            idx = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
            codebook = np.sort(rng.standard_normal(1 << bits).astype(np.float32)) * 0.05
            packed = torch.from_numpy(pack_indices(idx, bits)).to(dev)
            cb = torch.from_numpy(codebook).to(dev)
            w = torch.from_numpy(codebook[idx]).to(dev)
            b = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dev)
            w16, b16 = w.half(), b.half()
            for batch in CB_BATCHES:
                x = torch.from_numpy(rng.standard_normal((batch, k)).astype(np.float32)).to(dev)
                x16 = x.half()
                ref = F.linear(x, w, b)
                err = _rel_err(codebook_linear(x, packed, cb, bits, b), ref)
                fns = {
                    "pyserve": lambda: codebook_linear(x, packed, cb, bits, b),
                    "dense_fp32": lambda: F.linear(x, w, b),
                    "dense_fp16": lambda: F.linear(x16, w16, b16),
                }
                rows.append(_row("codebook_linear", {"N": n, "K": k, "bits": bits, "B": batch}, fns, err, args))


def bench_huffman(args, dev, rows: list) -> None:
    """GPU Huffman decode of chunked (format version 2) streams of quantized indices.

    Peers, in the same run: the host decoder (one thread) into a numpy array; the host decoder
    followed by the copy of its output to the GPU (what a user without a GPU decoder does); and
    the copy alone of the already-decoded symbols (pageable memory), the floor of that route.
    The pyserve call includes the copy of the compressed stream to the GPU and its checks."""
    rng = np.random.default_rng(3)
    sizes = HUFFMAN_MB[1:2] if args.quick else HUFFMAN_MB
    for bits, scale in ((5, 3.0), (8, 24.0)):
        half = 1 << (bits - 1)
        for mb in sizes:
            n = mb << 20
            x = (np.clip(np.round(rng.laplace(0.0, scale, n)), -half, half - 1) + half).astype(np.uint8)
            for chunk in HUFFMAN_CHUNKS:
                _bench_huffman_case(args, dev, rows, x, bits, mb, chunk)


def _bench_huffman_case(args, dev, rows: list, x: np.ndarray, bits: int, mb: int, chunk: int) -> None:
    import torch

    from pyserve.ops import huffman_decode, huffman_encode

    stream = huffman_encode(x, chunk_symbols=chunk)
    mismatches = float(np.count_nonzero(huffman_decode(stream, device=dev).cpu().numpy() != x))
    fns = {
        "pyserve": lambda: huffman_decode(stream, device=dev),
        "host_decode": lambda: huffman_decode(stream),
        "host_decode+h2d": lambda: torch.from_numpy(huffman_decode(stream)).to(dev),
        "h2d_decoded": lambda: torch.from_numpy(x).to(dev),
    }
    case = {"bits": bits, "MB": mb, "stream_MB": round(len(stream) / 2**20, 2), "chunk": chunk}
    row = _row("huffman_decode", case, fns, mismatches, args)
    row["decoded_GB_per_s"] = {k: x.size / (v * 1e-6) / 1e9 for k, v in row["us"].items()}
    print(f"{'':16s} decoded GB/s: " + " ".join(f"{k}={v:.2f}" for k, v in row["decoded_GB_per_s"].items()), flush=True)
    rows.append(row)


def _row(op: str, case: dict, fns: dict, rel_err: float, args) -> dict:
    us = {name: time_gpu(fn, args.repeats, args.min_ms) for name, fn in fns.items()}
    ratios = {f"{name}/pyserve": us[name] / us["pyserve"] for name in us if name != "pyserve"}
    row = {"op": op, **case, "us": us, "ratio": ratios, "rel_err_vs_fp32": rel_err}
    shown = " ".join(f"{k}={v:.2f}x" for k, v in ratios.items())
    print(f"{op:16s} {case}  pyserve {us['pyserve']:.1f} us  {shown}  err {rel_err:.1e}", flush=True)
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = gpu_problem(args.device)
    if problem is not None:
        print(f"bench_gpu: no usable GPU: {problem}", file=sys.stderr)
        return 2
    import torch

    from pyserve.ops import build_info

    dev = torch.device(args.device)
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 peers are true fp32
    rows: list = []
    t0 = time.perf_counter()
    for op in args.ops:
        {"csr": bench_csr, "int8": bench_int8, "codebook": bench_codebook, "huffman": bench_huffman}[op](args, dev, rows)
    result = {
        "device": torch.cuda.get_device_name(dev),
        "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "pyserve_build": build_info(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "min_ms": args.min_ms,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"bench_gpu: {len(rows)} cases in {result['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
