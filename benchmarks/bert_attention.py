"""pyserve's native attention (``pyserve.ops.attention_qkv``) against torch's
``scaled_dot_product_attention`` at transformer shapes, one or more threads.

    python benchmarks/bert_attention.py [--batch 1] [--seqs 16 64 128] [--heads 12] [--head-size 32]
        [--threads 1] [--repeats 200] [--rounds 5]

Both compute softmax(Q K^T * scale + mask) V for every head from the same fused Q|K|V projection
``[B, S, 3 E]`` (MiniLM: H = 12, D = 32, E = 384) with HF transformers' additive key mask (the last
quarter of the keys masked). torch's call includes what the exported graph does around SDPA to get
there: the three slice -> view -> transpose chains and the transpose -> reshape of the output
(``contiguous``), as ``native_module`` replaced them. Each figure is the least thread CPU time per
call over ``--rounds`` interleaved rounds of ``--repeats`` calls (the least disturbed by other load);
the outputs are compared (max abs difference) before timing. Prints a Markdown table: µs per call,
GFLOP/s (4 S^2 E flops: the two matrix products) and the ratio torch / pyserve.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqs", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from pyserve import ops

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    B, H, D = args.batch, args.heads, args.head_size
    E = H * D
    print(f"batch {B}, heads {H}, head size {D}, {args.threads} thread(s); native kernel: "
          f"{ops.attention_qkv_fast(D)}; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| seq | torch SDPA µs | pyserve µs | torch GFLOP/s | pyserve GFLOP/s | torch / pyserve | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    gen = torch.Generator().manual_seed(0)
    for S in args.seqs:
        qkv = torch.randn(B, S, 3 * E, generator=gen)
        keep = torch.ones(B, S)
        keep[:, S - S // 4:] = 0
        mask = (1.0 - keep)[:, None, None, :] * torch.finfo(torch.float32).min  # [B, 1, 1, S]
        mask = mask.expand(B, 1, S, S)

        def torch_attention(qkv=qkv, mask=mask, S=S):
            q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in qkv.split(E, dim=-1))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return o.transpose(1, 2).contiguous().reshape(B, S, E)

        def pyserve_attention(qkv=qkv, mask=mask):
            return ops.attention_qkv(qkv, H, mask)

        with torch.inference_mode():
            diff = float((torch_attention() - pyserve_attention()).abs().max())
            best = {"torch": float("inf"), "pyserve": float("inf")}
            for _ in range(args.rounds):
                for name, fn in (("torch", torch_attention), ("pyserve", pyserve_attention)):
                    t0 = time.thread_time()
                    for _ in range(args.repeats):
                        fn()
                    best[name] = min(best[name], (time.thread_time() - t0) / args.repeats)
        flops = 4.0 * B * S * S * E
        print(f"| {S} | {best['torch'] * 1e6:.1f} | {best['pyserve'] * 1e6:.1f} | {flops / best['torch'] / 1e9:.1f} | "
              f"{flops / best['pyserve'] / 1e9:.1f} | {best['torch'] / best['pyserve']:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
