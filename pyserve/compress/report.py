"""The compression report: ``report.json``, ``report.md`` and PNG plots for one :func:`compress` run.

``pyserve compress RECIPE -o OUT --report DIR`` calls :func:`write_report`. The plots follow Deep
Compression (Han, Mao, Dally, ICLR 2016, arXiv 1510.00149): the weight distribution before and after
pruning (figure 5's left panel, per layer), the k-means centroids over the distribution of the
surviving weights (figure 3), and the size after each stage (the paper's Table 1 read as a
waterfall: fp32 -> pruned -> quantized -> Huffman coded).

matplotlib (the ``report`` extra) is imported only by :func:`write_plots`, with the Agg backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["build_report", "render_markdown", "write_plots", "write_report", "STAGE_LABELS"]

STAGE_LABELS = {"prune": "pruned", "quantize": "quantized", "huffman": "Huffman coded"}


def build_report(result) -> dict:
    """A JSON-safe dict of ``result`` (a :class:`~pyserve.compress.CompressionResult`).

    Keys: ``model``, ``artifact`` (path, bytes), ``fp32_bytes``, ``compression`` (fp32 bytes /
    artifact bytes), ``accuracy`` (``fp32``, ``compressed`` in memory, ``loaded`` from the artifact;
    top-1, fractions), ``stages`` (per stage: method, accuracy after it, parameter bytes after it,
    per-layer details the stage reported), ``evaluation`` (the recipe's ``evaluate`` section:
    metric, baseline and compressed values, targets and whether they were met; None for tasks
    other than classification) and ``layers`` (per stored tensor: shape, kept fraction,
    codebook bits (0 = none), encoding, fp32 bytes, stored bytes and stored bytes by part, bits per
    weight before (32) and after, bits per kept weight).
    """
    layers = {}
    for name, info in result.layers.items():
        numel = int(np.prod(info["shape"])) if info["shape"] else 1
        layers[name] = {
            "shape": list(info["shape"]),
            "kept": float(info["kept"]),
            "bits": int(info["bits"]),
            "encoding": info["encoding"],
            "fp32_bytes": int(info["fp32_bytes"]),
            "stored_bytes": int(info["stored_bytes"]),
            "parts_bytes": {k: int(v) for k, v in result.parts.get(name, {}).items()},
            "bits_per_weight_before": 32.0,
            "bits_per_weight_after": 8.0 * info["stored_bytes"] / max(numel, 1),
            "bits_per_kept_weight": float(info["bits_per_kept_weight"]),
        }
    stages = [{"method": "fp32", "accuracy": float(result.accuracy_before), "bytes": int(result.fp32_bytes),
               "layers": {}}]
    for st in result.stages:
        stages.append({"method": st["method"], "accuracy": float(st.get("accuracy", float("nan"))),
                       "bytes": int(st.get("bytes", 0)), "layers": _jsonable(st.get("layers", {}))})
    return {
        "model": result.manifest.model_name,
        "artifact": {"path": str(result.path), "bytes": int(result.artifact_bytes)},
        "fp32_bytes": int(result.fp32_bytes),
        "compression": float(result.compression),
        "accuracy": {"fp32": float(result.accuracy_before), "compressed": float(result.accuracy_after),
                     "loaded": float(result.accuracy_loaded)},
        "stages": stages,
        "layers": layers,
        "sensitivity": _sensitivity_json(result.sensitivity),
        "evaluation": _jsonable(dict(getattr(result, "evaluation", {}) or {})) or None,
    }


def _sensitivity_json(sens):
    if not sens:
        return None
    return {"sparsities": [float(s) for s in sens["sparsities"]], "max_drop": float(sens["max_drop"]),
            "curves": {layer: {f"{s:g}": float(a) for s, a in curve.items()} for layer, curve in sens["curves"].items()},
            "suggested": {layer: float(s) for layer, s in sens["suggested"].items()}}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def render_markdown(report: dict, plots: list[str] = ()) -> str:
    """``report`` (from :func:`build_report`) as Markdown tables; ``plots``: PNG file names to embed."""
    acc = report["accuracy"]
    lines = [f"# Compression report: {report['model']}", "",
             f"fp32 {report['fp32_bytes']} B -> artifact {report['artifact']['bytes']} B "
             f"(`{os.path.basename(report['artifact']['path'])}`, the whole file) = "
             f"**{report['compression']:.1f}x** smaller.", "",
             f"Top-1 test accuracy: fp32 {acc['fp32']:.4f}, compressed {acc['compressed']:.4f}, "
             f"loaded from the artifact {acc['loaded']:.4f}.", "",
             *_evaluation_md(report.get("evaluation")),
             "## Stages", "",
             "| after | test accuracy | parameter bytes | vs fp32 |",
             "| --- | ---: | ---: | ---: |"]
    fp32 = report["fp32_bytes"]
    for st in report["stages"]:
        label = STAGE_LABELS.get(st["method"], st["method"])
        lines.append(f"| {label} | {st['accuracy']:.4f} | {st['bytes']} | {fp32 / max(st['bytes'], 1):.1f}x |")
    lines += ["", "Parameter bytes count the stored tensors only; the artifact adds the graph and manifest.",
              "", "## Layers", "",
              "| tensor | shape | kept | bits | encoding | fp32 B | stored B | parts (B) | bits/weight before | after |"
              " bits/kept weight |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, L in report["layers"].items():
        parts = ", ".join(f"{k} {v}" for k, v in L["parts_bytes"].items())
        lines.append(f"| {name} | {'x'.join(map(str, L['shape']))} | {L['kept']:.1%} | {L['bits'] or '-'} | "
                     f"{L['encoding']} | {L['fp32_bytes']} | {L['stored_bytes']} | {parts} | "
                     f"{L['bits_per_weight_before']:.0f} | {L['bits_per_weight_after']:.2f} | "
                     f"{L['bits_per_kept_weight']:.2f} |")
    dead = [(st["method"], layer, L) for st in report["stages"] for layer, L in st.get("layers", {}).items()
            if L.get("dead_no_input") or L.get("dead_no_output")]
    lines += ["", "## Dead units after pruning (Han et al. 2015, section 3.4)", ""]
    if dead:
        lines += ["Reported, not removed: the graph keeps the model's layer shapes.", "",
                  "| stage | layer | units with no input weights | input units no weight reads |", "| --- | --- | --- | --- |"]
        for method, layer, L in dead:
            lines.append(f"| {method} | {layer} | {_units(L.get('dead_no_input', []))} | "
                         f"{_units(L.get('dead_no_output', []))} |")
    else:
        lines.append("None: every unit of every pruned layer keeps at least one input and one output weight.")
    sens = report.get("sensitivity")
    if sens:
        keys = [f"{s:g}" for s in sens["sparsities"]]
        lines += ["", "## Sensitivity (each layer pruned alone, no retraining; Han et al. 2015, fig. 5)", "",
                  "| layer | " + " | ".join(f"{k}" for k in keys) + f" | suggested (drop <= {sens['max_drop']:g}) |",
                  "| --- | " + " | ".join("---:" for _ in keys) + " | ---: |"]
        for layer, curve in sens["curves"].items():
            lines.append(f"| {layer} | " + " | ".join(f"{curve[k]:.4f}" for k in keys)
                         + f" | {sens['suggested'][layer]:g} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _evaluation_md(ev) -> list[str]:
    if not ev:
        return []
    lines = ["## Evaluation", "", "| metric | fp32 baseline | compressed (artifact) | target | met |",
             "| --- | ---: | ---: | --- | --- |"]
    targets = []
    if ev["max_accuracy_drop"] is not None:
        targets.append(f"accuracy drop <= {ev['max_accuracy_drop']:g} (measured {ev['accuracy_drop']:.4f})")
    if ev["min_compression"] is not None:
        targets.append(f"compression >= {ev['min_compression']:g}x (measured {ev['compression']:.1f}x)")
    met = "-" if ev["met"] is None else "yes" if ev["met"] else "**NO**: " + "; ".join(ev["missed"])
    lines.append(f"| {ev['metric']} | {ev['baseline']:.4f} | {ev['compressed']:.4f} | "
                 f"{', '.join(targets) or 'none'} | {met} |")
    return lines + [""]


def _units(indices: list[int], shown: int = 12) -> str:
    if not indices:
        return "0"
    head = ", ".join(map(str, indices[:shown]))
    return f"{len(indices)}: {head}" + (", ..." if len(indices) > shown else "")


def write_plots(result, report: dict, directory: Path) -> list[str]:
    """Write the PNG plots into ``directory``; returns their file names.

    ``weights_<layer>.png``: weight histogram before pruning and after the last pruning-side stage
    (zeros left out after pruning); ``centroids_<layer>.png``: histogram of the surviving weights
    before quantization with the final codebook's centroids as vertical lines; ``sizes.png``: the
    parameter bytes after each stage (log scale) with the ratio to fp32; ``sensitivity.png``
    (when the recipe asked for it): accuracy vs sparsity per layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, fname: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / fname, dpi=80)
        plt.close(fig)
        names.append(fname)

    before = result.weights.get("fp32", {})
    pruned = result.weights.get("prune")
    pre_quant = pruned if pruned is not None else before
    for key, w0 in before.items():
        stem = key.removesuffix(".weight").replace(".", "_").replace("/", "_")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(w0.ravel(), bins=100, alpha=0.6, label="before pruning")
        if pruned is not None and key in pruned:
            w1 = pruned[key].ravel()
            ax.hist(w1[w1 != 0], bins=100, alpha=0.6, label=f"after pruning (non-zero, {np.mean(w1 != 0):.1%} kept)")
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        ax.set_title(f"{key}: weight distribution")
        ax.legend(fontsize=8)
        save(fig, f"weights_{stem}.png")
        cb = result.codebooks.get(key)
        if cb is not None and key in pre_quant:
            w = pre_quant[key].ravel()
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.hist(w[w != 0], bins=100, alpha=0.7, label="surviving weights (before quantization)")
            for i, c in enumerate(np.sort(cb[1:])):
                ax.axvline(float(c), color="red", lw=0.8, label="centroids (after fine-tuning)" if i == 0 else None)
            ax.set_xlabel("weight value")
            ax.set_ylabel("count")
            ax.set_title(f"{key}: {cb.size - 1} shared weights ({int(np.ceil(np.log2(cb.size)))} bits)")
            ax.legend(fontsize=8)
            save(fig, f"centroids_{stem}.png")
    stages = report["stages"]
    labels = [STAGE_LABELS.get(s["method"], s["method"]) for s in stages] + ["artifact file"]
    sizes = [s["bytes"] for s in stages] + [report["artifact"]["bytes"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, sizes, color=["tab:gray"] + ["tab:blue"] * (len(sizes) - 2) + ["tab:green"])
    ax.set_yscale("log")
    ax.set_ylabel("bytes (log scale)")
    ax.set_title(f"{report['model']}: size after each stage")
    for b, n in zip(bars, sizes):
        ax.annotate(f"{n / 1024:.1f} KiB\n{report['fp32_bytes'] / max(n, 1):.1f}x", (b.get_x() + b.get_width() / 2, n),
                    ha="center", va="bottom", fontsize=7)
    save(fig, "sizes.png")
    sens = report.get("sensitivity")
    if sens:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for layer, curve in sens["curves"].items():
            ax.plot([float(k) for k in curve], list(curve.values()), marker="o", label=layer)
        ax.axhline(report["accuracy"]["fp32"], color="gray", ls="--", lw=0.8, label="fp32")
        ax.set_xlabel("sparsity of the one pruned layer")
        ax.set_ylabel("top-1 test accuracy")
        ax.set_title(f"{report['model']}: pruning sensitivity (no retraining)")
        ax.legend(fontsize=8)
        save(fig, "sensitivity.png")
    return names


def write_report(result, directory: str | os.PathLike) -> dict:
    """Write ``report.json``, PNG plots and ``report.md`` for ``result`` into ``directory``
    (created if needed); returns the report dict.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'pyserve[report]'``).
    OSError
        ``directory`` cannot be created or written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    plots = write_plots(result, report, directory)
    report["plots"] = plots
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(render_markdown(report, plots))
    return report
