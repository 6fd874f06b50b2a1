"""Interleaved A/B of all-MiniLM-L6-v2 engines at one shape: the fp32 teacher against pyserve artifacts.

    python benchmarks/bert_ab.py --distilled distill.pyserve [--int8 int8.pyserve] [--batch 1 --seq 128]
        [--threads 1] [--rounds 30] [--calls 3] [--kernels auto|int8] [--baseline] [--graph] [--ort] [--bf16-attention]

Issue 7's goal "distilled 3 layers + int8 >= 4x faster than the fp32 teacher" (batch 1, sequence 128,
one thread) on a shared machine: ``benchmarks/bert_cpu.py`` times each engine in its own block of
calls, so a burst of other load lands on one engine and not the other. Here every round calls each
engine ``--calls`` times in turn (torch fp32 = the teacher in eager mode under ``inference_mode``,
the ``examples/minilm`` model; pyserve artifacts loaded and run as the ``pyserve`` backend does:
``native_module``, then the graph's straight-line plan, ``bert_cpu.served``), and each call is timed twice: thread CPU time (``time.thread_time``: what the
call cost this thread, robust to being descheduled; with more than one thread it misses the other
threads' work, so it is printed for 1 thread only) and wall time. Printed per engine: least and
median per call, and the teacher's time over the engine's (the speed-up) from both, plus the load
average before and after. The inputs are real sentences padded/truncated to ``--seq`` tokens.

``--baseline`` adds, for each artifact, the same artifact loaded with ``native_module(attention=False,
fold_norm=False, pool=False, mask=False)``: the graph rewrites of before the native attention, the add &
LayerNorm epilogue, the pooling node and the additive-mask node (torch's SDPA with its head views and
copies, torch's add and layer_norm, the exported pooling and mask ops), timed in the same rounds: an A/B
of those rewrites on the same int8 kernels.

``--graph`` adds, for each artifact, the same ``native_module`` graph called as a ``GraphModule``
(the backend's ``PYSERVE_GRAPH_EXECUTOR=graph``): an A/B of the plan against the graph.

``--bf16-attention`` adds, for each artifact, the same artifact with the attention's products in
bfloat16 (``native_module(attention="bf16")``; fp32 on CPUs without AVX-512 BF16).

``--ort`` adds onnxruntime int8 (its own ``quantize_dynamic`` of the exported model: the file
``benchmarks/bert_cpu.py`` uses, made in ``--workdir`` when missing; CPUExecutionProvider, intra-op
threads = ``--threads``) to the rounds, and prints each pyserve engine's speed-up over it: issue 7's
"int8 >= 1.2x onnxruntime int8" measured interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("_minilm_model", ROOT / "examples" / "minilm" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distilled", type=Path, help="artifact of examples/minilm/distill.yaml")
    ap.add_argument("--int8", type=Path, help="artifact of examples/minilm/int8.yaml")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=3, help="calls of each engine per round")
    ap.add_argument("--kernels", default="auto", help="native_module's kernel choice (auto: measured at load)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time each artifact without the native attention and add & LayerNorm epilogue")
    ap.add_argument("--bf16-attention", action="store_true",
                    help="also time each artifact with the attention's products in bfloat16")
    ap.add_argument("--graph", action="store_true", help="also time each artifact's graph without the plan")
    ap.add_argument("--ort", action="store_true", help="also time onnxruntime int8 (quantize_dynamic) in the rounds")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-minilm",
                    help="where the ONNX files are (made when missing; with --ort)")
    args = ap.parse_args(argv)
    if args.distilled is None and args.int8 is None:
        ap.error("give --distilled and/or --int8")
    for name in ("batch", "seq", "threads", "rounds", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pyserve import artifact, ops
    from pyserve.artifact.kernels import native_module
    from pyserve.datasets import transfer_sentences

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    ex = _example()
    tok = ex.tokenizer()
    teacher = ex.MiniLM().eval()
    spec = importlib.util.spec_from_file_location("_bert_cpu", ROOT / "benchmarks" / "bert_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    engines = {"torch fp32 (teacher)": teacher}
    kernels = {}
    for name, path in (("pyserve int8", args.int8), ("pyserve distill3+int8", args.distilled)):
        if path is not None:
            module, choices = native_module(artifact.load_artifact(path), kernels=args.kernels)
            engines[name], executor = bench.served(module)
            kernels[name] = {k: sum(1 for v in choices.values() if v == k) for k in sorted(set(choices.values()))}
            kernels[name]["executor"] = executor
            if args.graph:
                engines[f"{name} (graph)"] = module
            if args.bf16_attention:
                engines[f"{name} bf16-attn"], _ = bench.served(native_module(
                    artifact.load_artifact(path), kernels=args.kernels, attention="bf16")[0])
            if args.baseline:
                engines[f"{name} (main's rewrites)"], _ = native_module(
                    artifact.load_artifact(path), kernels=args.kernels, attention=False, fold_norm=False, pool=False,
                    mask=False)

    if args.ort:
        import onnxruntime as ort

        args.workdir.mkdir(parents=True, exist_ok=True)
        _, onnx_int8 = bench.onnx_models(args.workdir, ex.MiniLM(), tok)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_int8), so, providers=["CPUExecutionProvider"])

        def ort_int8(ids, mask):
            return sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

        engines["ort int8"] = ort_int8

    enc = tok(transfer_sentences(max(args.batch, 8))[: args.batch], padding="max_length", truncation=True,
              max_length=args.seq, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cpu = {n: [] for n in engines}
    wall = {n: [] for n in engines}
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        for fn in engines.values():
            fn(ids, mask)
            fn(ids, mask)
        for _ in range(args.rounds):
            for name, fn in engines.items():
                for _ in range(args.calls):
                    c0, w0 = time.thread_time(), time.perf_counter()
                    fn(ids, mask)
                    c1, w1 = time.thread_time(), time.perf_counter()
                    cpu[name].append((c1 - c0) * 1e3)
                    wall[name].append((w1 - w0) * 1e3)
    load1 = os.getloadavg()[0]
    ref = "torch fp32 (teacher)"
    print(f"batch {args.batch}, seq {args.seq}, {args.threads} thread(s), {args.rounds} rounds x {args.calls} calls "
          f"interleaved, load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs; kernels {kernels}\n")
    clocks = [("thread CPU", cpu), ("wall", wall)] if args.threads == 1 else [("wall", wall)]
    head = "| engine |" + "".join(f" {c} least ms | {c} median ms | speed-up (least) | speed-up (median) |"
                                  for c, _ in clocks)
    print(head)
    print("| --- |" + " ---: |" * (4 * len(clocks)))
    for name in engines:
        row = f"| {name} |"
        for _, t in clocks:
            lo, med = min(t[name]), statistics.median(t[name])
            row += (f" {lo:.2f} | {med:.2f} | {min(t[ref]) / lo:.2f}x | {statistics.median(t[ref]) / med:.2f}x |")
        print(row)
    if args.ort:
        print()
        for name in engines:
            if name.startswith("pyserve"):
                parts = [f"{c} {min(t['ort int8']) / min(t[name]):.2f}x least / "
                         f"{statistics.median(t['ort int8']) / statistics.median(t[name]):.2f}x median" for c, t in clocks]
                print(f"{name} vs ort int8: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
