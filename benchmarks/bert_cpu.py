"""all-MiniLM-L6-v2 on the CPU: pyserve's int8 and distilled artifacts against torch and onnxruntime.

    pip install -e ".[bert,bench]"
    python benchmarks/bert_cpu.py [--int8 A.pyserve] [--distilled B.pyserve] [--out results.json]

Engines, all on the same token ids (real sentences padded/truncated to S tokens) in one run:

* ``torch fp32``: the model in eager mode, ``torch.inference_mode()``;
* ``torch dyn int8``: ``torch.ao.quantization.quantize_dynamic`` of every nn.Linear (fbgemm);
* ``ort fp32``: ``torch.onnx.export`` (dynamic batch and sequence) run by onnxruntime;
* ``ort int8``: onnxruntime's own ``quantize_dynamic`` (QInt8 weights) of that file;
* ``pyserve int8``: the artifact of ``examples/minilm/int8.yaml`` loaded and run the way the
  ``pyserve`` backend does (per-layer kernel choice measured at load; the graph run as a
  straight-line plan of native calls on NumPy arrays, ``pyserve.artifact.plan``);
* ``pyserve distill3+int8``: the artifact of ``examples/minilm/distill.yaml`` (3 layers + int8);
* ``pyserve int8 bf16-attn``, ``pyserve distill3+int8 bf16-attn``: the same artifacts with the
  attention's products in bfloat16 (``native_module(attention="bf16")``, the backend's
  ``PYSERVE_ATTENTION=bf16``; on CPUs without AVX-512 BF16 this is the fp32 attention again);
* ``pyserve int8 unfused`` (only with ``--engines``): the int8 artifact without native_module's graph
  rewrites (Q, K, V as one Linear; attention as one scaled_dot_product_attention).

Grid: batch 1 and 8, sequence 16, 64 and 128, 1 and 2 threads (torch, pyserve.ops and
onnxruntime's intra-op threads set alike). Per cell: p50 and p99 latency of repeated calls (at least
``--min-reps`` calls and ``--min-time-s`` seconds), throughput (sentences/s from the mean). Per
engine: stored size and quality on the project's sentence-pair set (Spearman of the cosine
similarities against the pair scores and against the fp32 model's, and the embedding cosine to
fp32). Missing artifacts are built from the recipes first (minutes).

Run it on an otherwise idle machine; on a shared one, compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "minilm"


def _example():
    spec = importlib.util.spec_from_file_location("_minilm_model", EXAMPLE / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _artifact(path: Path | None, recipe: str, workdir: Path) -> Path:
    if path is not None:
        return path
    out = workdir / f"{recipe}.pyserve"
    if not out.exists():
        from pyserve.compress import compress

        print(f"building {out} from examples/minilm/{recipe}.yaml ...", file=sys.stderr)
        compress(EXAMPLE / f"{recipe}.yaml", out, verbose=True)
    return out


def _timeit(fn, min_reps: int, min_time_s: float) -> np.ndarray:
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    return np.asarray(times)


ENGINES = ("torch fp32", "torch dyn int8", "ort fp32", "ort int8", "pyserve int8", "pyserve int8 bf16-attn",
           "pyserve distill3+int8", "pyserve distill3+int8 bf16-attn", "pyserve int8 unfused")
#: measured unless --engines says otherwise; "pyserve int8 unfused" (native_module(fuse=False): Q, K, V
#: apart, eager attention) shows what the graph rewrites change
DEFAULT_ENGINES = ENGINES[:-1]


def served(module):
    """``(fn(ids, mask) -> tensor, executor)``: a ``native_module`` graph the way the ``pyserve``
    backend runs it: its straight-line plan (``pyserve.artifact.plan.compile_plan``, checked against
    the graph on a sample of ones, as the backend does at load) where one compiles, else the graph."""
    import torch

    from pyserve.artifact.plan import compile_plan

    ones = np.ones((2, 2), np.int64)
    plan = compile_plan(module, (ones, ones))
    if plan is None:
        return module, "graph"

    def run(ids, mask):
        return torch.from_numpy(plan(ids.numpy(), mask.numpy())[0])

    return run, "plan"


def onnx_models(workdir: Path, model, tok) -> tuple[Path, Path]:
    """``(fp32, int8)`` ONNX files of ``model`` in ``workdir`` (made when missing): ``torch.onnx.export``
    (opset 17, dynamic batch and sequence) and onnxruntime's own ``quantize_dynamic`` (QInt8 weights)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_fp32 = workdir / "minilm.onnx"
    onnx_int8 = workdir / "minilm-int8.onnx"
    if not onnx_fp32.exists():
        ids = tok(["a sentence", "another one here"], padding=True, return_tensors="pt")
        torch.onnx.export(model, (ids["input_ids"], ids["attention_mask"]), str(onnx_fp32), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "embedding": {0: "b"}})
    if not onnx_int8.exists():
        quantize_dynamic(str(onnx_fp32), str(onnx_int8), weight_type=QuantType.QInt8)
    return onnx_fp32, onnx_int8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int8", type=Path, help="artifact of examples/minilm/int8.yaml (built when omitted)")
    ap.add_argument("--distilled", type=Path, help="artifact of examples/minilm/distill.yaml (built when omitted)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-minilm")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seqs", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--min-time-s", type=float, default=1.0)
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(DEFAULT_ENGINES),
                    help="engines to measure (default: all but 'pyserve int8 unfused'; torch fp32 always runs, as the reference)")
    args = ap.parse_args(argv)
    args.engines = ["torch fp32"] + [e for e in args.engines if e != "torch fp32"]

    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    import torch

    from pyserve import artifact, ops
    from pyserve.artifact.kernels import native_module
    from pyserve.compress._sentence import SentenceTask
    from pyserve.datasets import transfer_sentences

    args.workdir.mkdir(parents=True, exist_ok=True)
    int8_path = (_artifact(args.int8, "int8", args.workdir)
                 if {"pyserve int8", "pyserve int8 bf16-attn", "pyserve int8 unfused"} & set(args.engines) else None)
    distilled_path = (_artifact(args.distilled, "distill", args.workdir)
                      if {"pyserve distill3+int8", "pyserve distill3+int8 bf16-attn"} & set(args.engines) else None)
    ex = _example()
    tok = ex.tokenizer()
    model = ex.MiniLM()

    # the ONNX files are exported (and quantized) only when an onnxruntime engine runs
    onnx_fp32, onnx_int8 = (onnx_models(args.workdir, model, tok) if {"ort fp32", "ort int8"} & set(args.engines)
                            else (None, None))

    def torch_size(m) -> int:
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.getbuffer().nbytes

    dyn = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def ort_engine(path: Path, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(ids, mask):
            return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])

        return run

    def pyserve_engine(path: Path, fuse: bool = True, attention: str = "fp32"):
        module, choices = native_module(artifact.load_artifact(path), fuse=fuse, attention=attention)
        return served(module)[0], choices

    sizes = {"torch fp32": torch_size(model), "torch dyn int8": torch_size(dyn),
             **({"ort fp32": onnx_fp32.stat().st_size, "ort int8": onnx_int8.stat().st_size} if onnx_fp32 else {})}
    sizes.update({name: p.stat().st_size for name, p in (
        ("pyserve int8", int8_path), ("pyserve int8 bf16-attn", int8_path), ("pyserve int8 unfused", int8_path),
        ("pyserve distill3+int8", distilled_path), ("pyserve distill3+int8 bf16-attn", distilled_path))
        if p is not None})

    task = SentenceTask(tok, max_length=128, transfer=4)
    task.set_reference(model)
    sentences = transfer_sentences(64)
    results = {"cells": [], "quality": {}, "sizes": sizes, "kernels": {},
               "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        ops.set_num_threads(threads)
        engines = {"torch fp32": model, "torch dyn int8": dyn}
        if onnx_fp32 is not None:
            engines.update({"ort fp32": ort_engine(onnx_fp32, threads), "ort int8": ort_engine(onnx_int8, threads)})
        engines = {k: v for k, v in engines.items() if k in args.engines}
        for name, path, fuse, attention in (
                ("pyserve int8", int8_path, True, "fp32"), ("pyserve int8 bf16-attn", int8_path, True, "bf16"),
                ("pyserve distill3+int8", distilled_path, True, "fp32"),
                ("pyserve distill3+int8 bf16-attn", distilled_path, True, "bf16"),
                ("pyserve int8 unfused", int8_path, False, "fp32")):
            if path is None or name not in args.engines:
                continue
            engines[name], choices = pyserve_engine(path, fuse, attention)
            results["kernels"][f"{name} threads={threads}"] = {k: sum(1 for v in choices.values() if v == k)
                                                               for k in sorted(set(choices.values()))}
        if threads == args.threads[0]:
            for name, fn in engines.items():
                results["quality"][name] = task.details(fn)
        for batch in args.batches:
            for seq in args.seqs:
                enc = tok(sentences[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
                ids, mask = enc["input_ids"], enc["attention_mask"]
                for name, fn in engines.items():
                    with torch.inference_mode():
                        t = _timeit(lambda: fn(ids, mask), args.min_reps, args.min_time_s)
                    cell = {"engine": name, "threads": threads, "batch": batch, "seq": seq,
                            "p50_ms": float(np.percentile(t, 50) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3),
                            "throughput_per_s": float(batch / t.mean()), "reps": int(t.size)}
                    results["cells"].append(cell)
                    print(f"threads={threads} batch={batch} seq={seq:>3} {name:<32} p50 {cell['p50_ms']:8.2f} ms  "
                          f"p99 {cell['p99_ms']:8.2f} ms  {cell['throughput_per_s']:8.1f}/s", file=sys.stderr)
    results["machine"]["load_avg_end"] = os.getloadavg()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def table(results: dict) -> str:
    """Markdown: per engine its size and quality, then p50 / p99 / throughput per cell, with the
    speed-up of the p50 over torch fp32 in the same cell."""
    lines = ["| engine | size MB | Spearman vs scores | Spearman vs fp32 | cosine to fp32 (mean / min) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, q in results["quality"].items():
        lines.append(f"| {name} | {results['sizes'][name] / 1e6:.1f} | {q['spearman_scores']:.4f} | "
                     f"{q.get('spearman_teacher', float('nan')):.4f} | {q.get('cosine_to_fp32_mean', float('nan')):.4f} / "
                     f"{q.get('cosine_to_fp32_min', float('nan')):.4f} |")
    lines += ["", "| threads | batch | seq | engine | p50 ms | p99 ms | sentences/s | p50 speed-up vs torch fp32 |",
              "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    base = {(c["threads"], c["batch"], c["seq"]): c["p50_ms"] for c in results["cells"] if c["engine"] == "torch fp32"}
    for c in results["cells"]:
        ref = base.get((c["threads"], c["batch"], c["seq"]))
        lines.append(f"| {c['threads']} | {c['batch']} | {c['seq']} | {c['engine']} | {c['p50_ms']:.2f} | "
                     f"{c['p99_ms']:.2f} | {c['throughput_per_s']:.1f} | {ref / c['p50_ms']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
