"""Where the time of pyserve's int8 MiniLM goes: per-op-kind shares of one forward pass.

    python benchmarks/bert_profile.py --int8 int8.pyserve [--batch 1 --seq 128 --threads 1] [--ort]

The artifact is loaded the way the ``pyserve`` backend loads it (``native_module``: per-layer kernel
choice measured at load; ``--kernels int8`` forces int8_linear everywhere, ``--no-fuse`` keeps Q, K
and V apart). Each graph node is then timed alone while the graph runs node by node (best of
``--reps`` passes per node, to damp other load), and the nodes are grouped by kind:
``int8_linear``, ``fp32 linear`` (torch), attention (``matmul``/``bmm``/``softmax``/scaled dot
product), ``layer_norm``, ``gelu``, elementwise (add, mul, div, ...), shape ops (view, permute,
transpose, slice, expand, contiguous copies) and the rest (embedding lookups, pooling). "graph and
Python overhead" is the median time of a normal call of the module minus the sum of the per-node
times: the FX interpreter's per-node dispatch from Python, argument packing, allocation.
Output: a Markdown table (ms, share of the summed node times and of the best call).

``--ort`` adds onnxruntime int8 (its own ``quantize_dynamic`` of the exported model, the file
``benchmarks/bert_cpu.py`` uses, made when missing) profiled by onnxruntime's own profiler
(``SessionOptions.enable_profiling``: per node, the best kernel time of ``--reps`` runs), and a
side-by-side table of both engines by part: GEMMs (with their activation quantization; pyserve's
``int8_linear`` quantizes inside), attention (scores, softmax, weighted sum), LayerNorm, GELU,
elementwise, shape ops, embeddings (every node before the first GEMM) and pooling (after the last).

The machine is shared: run with nothing else busy, and read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

KINDS = ("int8_linear", "fp32 linear", "attention (matmul, softmax)", "layer_norm", "gelu", "elementwise",
         "shape ops and copies", "other (embedding, pooling, ...)")


def kind_of(node) -> str:
    """The group of an FX ``call_function`` / ``call_method`` node."""
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    name = str(name).lower()
    if "int8" in name:
        return "int8_linear"
    if "linear" in name:
        return "fp32 linear"
    if any(k in name for k in ("matmul", "bmm", "softmax", "scaled_dot_product", "sdpa", "baddbmm", "attention")):
        return "attention (matmul, softmax)"
    if "layer_norm" in name:
        return "layer_norm"
    if "gelu" in name:
        return "gelu"
    if any(k in name for k in ("view", "permute", "transpose", "slice", "expand", "contiguous", "clone",
                               "reshape", "unsqueeze", "squeeze", "getitem", "select", "_to_copy", "to.",
                               "split", "alias", "t.default", "unbind")):
        return "shape ops and copies"
    if any(k in name for k in ("add", "mul", "div", "sub", "rsub", "where", "pow", "sqrt", "neg", "exp", "masked")):
        return "elementwise"
    return "other (embedding, pooling, ...)"


def profile(module, args: tuple, reps: int = 5) -> dict:
    """Per-kind seconds of one forward pass of FX ``module`` on ``args`` (best of ``reps`` per node),
    plus ``total`` (median wall time of a normal call) and ``overhead`` (total minus the node sum)."""
    import torch

    gm = module
    env_template = list(gm.graph.nodes)
    best: dict = {}
    with torch.inference_mode():
        for _ in range(reps):
            env = {}
            arg_iter = iter(args)
            for node in env_template:
                if node.op == "placeholder":
                    env[node] = next(arg_iter)
                    continue
                if node.op == "get_attr":
                    obj = gm
                    for part in node.target.split("."):
                        obj = getattr(obj, part)
                    env[node] = obj
                    continue
                if node.op == "output":
                    break
                a = torch.fx.node.map_arg(node.args, lambda n: env[n])
                kw = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "call_function":
                    t0 = time.perf_counter()
                    env[node] = node.target(*a, **kw)
                    dt = time.perf_counter() - t0
                elif node.op == "call_method":
                    t0 = time.perf_counter()
                    env[node] = getattr(a[0], node.target)(*a[1:], **kw)
                    dt = time.perf_counter() - t0
                else:  # call_module
                    mod = gm.get_submodule(node.target)
                    t0 = time.perf_counter()
                    env[node] = mod(*a, **kw)
                    dt = time.perf_counter() - t0
                best[node] = min(best.get(node, float("inf")), dt)
        calls = []
        for _ in range(max(reps, 5) * 3):
            t0 = time.perf_counter()
            module(*args)
            calls.append(time.perf_counter() - t0)
    # best of the calls against the best per node: both the least disturbed by other load
    by_kind = defaultdict(float)
    counts = defaultdict(int)
    for node, dt in best.items():
        k = kind_of(node) if node.op != "call_module" else "other (embedding, pooling, ...)"
        by_kind[k] += dt
        counts[k] += 1
    total = min(calls)
    return {"by_kind": dict(by_kind), "counts": dict(counts), "total": total, "median": statistics.median(calls),
            "calls": len(calls), "best": best,
            "overhead": total - sum(by_kind.values())}


PARTS = ("GEMMs", "  of which activation quantization", "attention", "LayerNorm", "GELU", "elementwise",
         "shape ops and copies", "embeddings (before the first GEMM)", "pooling (after the last GEMM)", "other")

_PYSERVE_PART = {"int8_linear": "GEMMs", "fp32 linear": "GEMMs", "attention (matmul, softmax)": "attention",
                 "layer_norm": "LayerNorm", "gelu": "GELU", "elementwise": "elementwise",
                 "shape ops and copies": "shape ops and copies", "other (embedding, pooling, ...)": "other"}

_ORT_PART = {"MatMulInteger": "GEMMs", "MatMulIntegerToFloat": "GEMMs", "DynamicQuantizeMatMul": "GEMMs",
             "QGemm": "GEMMs", "Gemm": "GEMMs", "DynamicQuantizeLinear": "  of which activation quantization",
             "MatMul": "attention", "FusedMatMul": "attention", "Softmax": "attention", "Attention": "attention",
             "MultiHeadAttention": "attention", "LayerNormalization": "LayerNorm",
             "SkipLayerNormalization": "LayerNorm", "SimplifiedLayerNormalization": "LayerNorm",
             "Gelu": "GELU", "BiasGelu": "GELU", "FastGelu": "GELU", "Erf": "GELU",
             "Add": "elementwise", "Mul": "elementwise", "Div": "elementwise", "Sub": "elementwise",
             "Where": "elementwise", "Sqrt": "elementwise", "Pow": "elementwise", "Cast": "elementwise",
             "Reshape": "shape ops and copies", "Transpose": "shape ops and copies", "Unsqueeze": "shape ops and copies",
             "Squeeze": "shape ops and copies", "Shape": "shape ops and copies", "Concat": "shape ops and copies",
             "Slice": "shape ops and copies", "Expand": "shape ops and copies", "Gather": "shape ops and copies",
             "Identity": "shape ops and copies", "ConstantOfShape": "shape ops and copies"}


def by_part(nodes: list[tuple[str, float]]) -> dict:
    """``{part: [seconds, node count]}`` of ``nodes`` = ``[(part, seconds), ...]`` in execution order:
    everything before the first GEMM is "embeddings", after the last one "pooling"."""
    gemm_at = [i for i, (part, _) in enumerate(nodes) if part in ("GEMMs", "  of which activation quantization")]
    out = {}
    for i, (part, dt) in enumerate(nodes):
        if gemm_at and i < gemm_at[0]:
            part = "embeddings (before the first GEMM)"
        elif gemm_at and i > gemm_at[-1]:
            part = "pooling (after the last GEMM)"
        acc = out.setdefault(part, [0.0, 0])
        acc[0] += dt
        acc[1] += 1
    return out


def ort_profile(onnx_path: Path, feeds: dict, threads: int, reps: int) -> dict:
    """onnxruntime's own per-node kernel times of ``onnx_path`` on ``feeds`` (best of ``reps`` runs
    per node, after 3 warm-up runs), grouped by :func:`by_part`; plus the best and median call."""
    import json
    import tempfile

    import onnxruntime as ort

    def session(profile: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    plain = session(False)
    for _ in range(3):
        plain.run(None, feeds)
    calls = []
    for _ in range(max(reps, 5) * 3):
        t0 = time.perf_counter()
        plain.run(None, feeds)
        calls.append(time.perf_counter() - t0)
    sess = session(True)
    for _ in range(3 + reps):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    best: dict = {}
    order: list = []
    op_of: dict = {}
    runs = 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs += 1
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time") or runs <= 3:
            continue
        name = ev["name"][: -len("_kernel_time")]
        if name not in best:
            order.append(name)
            op_of[name] = ev.get("args", {}).get("op_name", "?")
        best[name] = min(best.get(name, float("inf")), ev["dur"] * 1e-6)
    nodes = [(_ORT_PART.get(op_of[n], "other"), best[n]) for n in order]
    ops_seen: dict = {}
    for n in order:
        ops_seen[op_of[n]] = ops_seen.get(op_of[n], 0.0) + best[n]
    return {"parts": by_part(nodes), "ops": ops_seen, "total": min(calls), "median": statistics.median(calls),
            "nodes": len(order), "providers": sess.get_providers()}


def pyserve_parts(module, args: tuple, reps: int) -> dict:
    """:func:`profile`'s per-node best times of the FX graph, grouped by :func:`by_part`."""
    res = profile(module, args, reps)
    nodes = [(_PYSERVE_PART[kind_of(n) if n.op != "call_module" else "other (embedding, pooling, ...)"], dt)
             for n, dt in res["best"].items()]
    return {"parts": by_part(nodes), "total": res["total"], "median": res["median"], "nodes": len(nodes)}


def compare_table(py: dict, ort_res: dict) -> str:
    """Markdown: ms per part, pyserve int8 against onnxruntime int8, and their ratio."""
    lines = ["| part | pyserve int8 nodes | ms | onnxruntime int8 nodes | ms | pyserve / ort |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for part in PARTS:
        a, b = py["parts"].get(part), ort_res["parts"].get(part)
        if a is None and b is None:
            continue
        a, b = a or [0.0, 0], b or [0.0, 0]
        ratio = f"{a[0] / b[0]:.2f}x" if b[0] > 0 else "-"
        lines.append(f"| {part} | {a[1]} | {a[0] * 1e3:.2f} | {b[1]} | {b[0] * 1e3:.2f} | {ratio} |")
    sa = sum(v[0] for v in py["parts"].values())
    sb = sum(v[0] for v in ort_res["parts"].values())
    lines.append(f"| sum of the nodes | {py['nodes']} | {sa * 1e3:.2f} | {ort_res['nodes']} | {sb * 1e3:.2f} | "
                 f"{sa / sb:.2f}x |")
    lines.append(f"| one call: best (median) | | {py['total'] * 1e3:.2f} ({py['median'] * 1e3:.2f}) | | "
                 f"{ort_res['total'] * 1e3:.2f} ({ort_res['median'] * 1e3:.2f}) | {py['total'] / ort_res['total']:.2f}x |")
    return "\n".join(lines)


def table(res: dict) -> str:
    total = res["total"]
    nodes = sum(res["by_kind"].values())
    lines = ["| part | nodes | ms | share of the node time | share of the call |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in KINDS:
        if k in res["by_kind"]:
            lines.append(f"| {k} | {res['counts'][k]} | {res['by_kind'][k] * 1e3:.2f} | "
                         f"{100 * res['by_kind'][k] / nodes:.1f}% | {100 * res['by_kind'][k] / total:.1f}% |")
    lines.append(f"| sum of the nodes | | {nodes * 1e3:.2f} | 100% | {100 * nodes / total:.1f}% |")
    lines.append(f"| graph and Python overhead (call - nodes) | | {res['overhead'] * 1e3:.2f} | | "
                 f"{100 * res['overhead'] / total:.1f}% |")
    lines.append(f"| **one call (best of {res.get('calls', 'the')}; median {res['median'] * 1e3:.2f})** | | "
                 f"**{total * 1e3:.2f}** | | 100% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int8", type=Path, required=True, help="artifact of examples/minilm/int8.yaml")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--no-fuse", action="store_true", help="keep Q, K and V as three Linear layers")
    ap.add_argument("--ort", action="store_true", help="also profile onnxruntime int8 and compare by part")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-minilm",
                    help="where the ONNX files are (made when missing)")
    args = ap.parse_args(argv)

    import torch

    from pyserve import artifact, ops
    from pyserve.artifact.kernels import native_module
    from pyserve.datasets import transfer_sentences

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("_minilm_model", ROOT / "examples" / "minilm" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = mod.tokenizer()
    enc = tok(transfer_sentences(args.batch), padding="max_length", truncation=True, max_length=args.seq,
              return_tensors="pt")
    module, choices = native_module(artifact.load_artifact(args.int8), kernels=args.kernels,
                                    fuse=not args.no_fuse)
    used = {k: sum(1 for v in choices.values() if v == k) for k in sorted(set(choices.values()))}
    res = profile(module, (enc["input_ids"], enc["attention_mask"]), args.reps)
    print(f"batch {args.batch}, seq {args.seq}, {args.threads} thread(s), kernels {args.kernels} "
          f"(chosen: {used}), fuse {'off' if args.no_fuse else 'on'}, load average {os.getloadavg()[0]:.1f}")
    print(table(res))
    # The graph's own cost, nearly free of compute: the same module on 2 tokens (best call vs nodes).
    floor = profile(module, (enc["input_ids"][:, :2].contiguous(), enc["attention_mask"][:, :2].contiguous()),
                    args.reps)
    print(f"\nsequence 2 (dispatch floor): best call {floor['total'] * 1e3:.2f} ms, sum of the "
          f"{sum(floor['counts'].values())} nodes {sum(floor['by_kind'].values()) * 1e3:.2f} ms, "
          f"per-node dispatch {1e6 * floor['total'] / max(sum(floor['counts'].values()), 1):.1f} us")
    if args.ort:
        bench = importlib.util.spec_from_file_location("_bert_cpu", ROOT / "benchmarks" / "bert_cpu.py")
        bmod = importlib.util.module_from_spec(bench)
        bench.loader.exec_module(bmod)
        args.workdir.mkdir(parents=True, exist_ok=True)
        _, onnx_int8 = bmod.onnx_models(args.workdir, mod.MiniLM(), tok)
        feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        ort_res = ort_profile(onnx_int8, feeds, args.threads, args.reps)
        py = pyserve_parts(module, (enc["input_ids"], enc["attention_mask"]), args.reps)
        print(f"\npyserve int8 against onnxruntime int8 ({ort_res['providers'][0]}, its profiler), best of "
              f"{args.reps} per node; load average {os.getloadavg()[0]:.1f}")
        print(compare_table(py, ort_res))
        print("\nonnxruntime ops (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in
                                                    sorted(ort_res["ops"].items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
