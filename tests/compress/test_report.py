"""`pyserve compress --report DIR`: report.json against the artifact's manifest, report.md, PNG plots."""

import json
import struct
import zlib

import numpy as np
import pytest

from pyserve.artifact import read_container, read_manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(compressed):
    _, out, stdout = compressed
    d = out.parent / "report"
    return d, json.loads((d / "report.json").read_text()), read_manifest(out), stdout


def test_report_totals_match_manifest(report):
    d, rep, m, stdout = report
    assert rep["model"] == m.model_name == "tinylenet"
    assert rep["artifact"]["bytes"] == m.size_bytes
    assert rep["fp32_bytes"] == m.stats["fp32_bytes"] == 266610 * 4
    assert rep["compression"] == pytest.approx(m.stats["fp32_bytes"] / m.size_bytes)
    assert rep["accuracy"]["fp32"] == pytest.approx(m.stats["accuracy_fp32"], abs=1e-12)
    assert rep["accuracy"]["compressed"] == pytest.approx(m.stats["accuracy_compressed"], abs=1e-12)
    assert f"loaded from artifact {rep['accuracy']['loaded']:.4f}" in stdout
    assert f"wrote report {d / 'report.md'}" in stdout


def test_report_layers_match_manifest(report):
    d, rep, m, _ = report
    _, blobs = read_container(d.parent / "tiny.pyserve")
    assert set(rep["layers"]) == set(m.tensors)
    for name, L in rep["layers"].items():
        t = m.tensors[name]
        numel = int(np.prod(t["shape"]))
        assert L["shape"] == t["shape"]
        assert L["stored_bytes"] == t["size_bytes"]
        # bytes by part: the lengths of the tensor's blobs in the container
        assert L["parts_bytes"] == ({k: len(blobs[b]) for k, b in t["blobs"].items()} if t["encoding"] == "sparse"
                                    else {"raw": t["size_bytes"]})
        assert sum(L["parts_bytes"].values()) == L["stored_bytes"]
        assert L["bits_per_weight_before"] == 32
        assert L["bits_per_weight_after"] == pytest.approx(8 * t["size_bytes"] / numel)
        if t["encoding"] == "sparse":
            assert L["kept"] == pytest.approx(t["nnz"] / numel)
            assert 2 ** L["bits"] == t["codebook_size"] == 16
            assert L["bits_per_weight_after"] < 32 / 5
        else:
            assert L["bits"] == 0 and L["bits_per_weight_after"] == pytest.approx(32)
    kept = {k.split(".")[0]: rep["layers"][f"{k}.weight"]["kept"] for k in ("fc1", "fc2", "fc3")}
    assert kept == pytest.approx({"fc1": 0.1, "fc2": 0.1, "fc3": 0.3}, abs=0.01)


def test_report_stage_sizes_from_manifest_counts(report):
    """Stage sizes recomputed from the manifest's entry counts: uncoded gap and codebook-index
    symbols take one byte each, raw values four, a codebook four per entry."""
    _, rep, m, _ = report
    assert [s["method"] for s in rep["stages"]] == ["fp32", "prune", "quantize", "huffman"]
    raw = sum(t["size_bytes"] for t in m.tensors.values() if t["encoding"] == "raw")
    sparse = [t for t in m.tensors.values() if t["encoding"] == "sparse"]
    expect = {
        "fp32": m.stats["fp32_bytes"],
        "prune": raw + sum(t["entries"] * (1 + 4) for t in sparse),
        "quantize": raw + sum(t["entries"] * 2 + 4 * t["codebook_size"] for t in sparse),
        "huffman": sum(t["size_bytes"] for t in m.tensors.values()),
    }
    assert {s["method"]: s["bytes"] for s in rep["stages"]} == expect
    sizes = [s["bytes"] for s in rep["stages"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < m.size_bytes
    assert rep["stages"][-1]["accuracy"] == pytest.approx(m.stats["accuracy_compressed"], abs=1e-12)
    assert rep["stages"][1]["layers"]["fc1"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert rep["stages"][2]["layers"]["fc1"] == {"bits": 4, "centroids": 15}


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, checking its CRC (PNG spec, section 5.3)."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(kind + body)
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", body[:8])


def test_report_plots_are_png_and_linked_from_markdown(report):
    d, rep, _, _ = report
    expected = {f"weights_{l}.png" for l in ("fc1", "fc2", "fc3")} | {f"centroids_{l}.png" for l in ("fc1", "fc2", "fc3")}
    assert set(rep["plots"]) == expected | {"sizes.png", "sensitivity.png"}
    md = (d / "report.md").read_text()
    for name in rep["plots"]:
        w, h = _png_size((d / name).read_bytes())
        assert w > 100 and h > 100
        assert f"]({name})" in md
    for name, L in rep["layers"].items():
        assert f"| {name} | {'x'.join(map(str, L['shape']))} | {L['kept']:.1%} |" in md
    assert f"**{rep['compression']:.1f}x**" in md


def test_report_sensitivity_against_numpy(report, compressed):
    """The recipe asks for sensitivity at 50/90/99%: each layer of the fp32 checkpoint pruned alone
    by |w| rank in NumPy, the 2-hidden-layer MLP run in NumPy, accuracy compared."""
    import torch

    from pyserve.datasets import mnist

    d, rep, _, _ = report
    recipe, _, _ = compressed
    sens = rep["sensitivity"]
    assert sens["sparsities"] == [0.5, 0.9, 0.99] and list(sens["curves"]) == ["fc1", "fc2", "fc3"]
    sd = {k: v.numpy() for k, v in torch.load(recipe.parent / "ckpt/model.pt", weights_only=True).items()}
    test = mnist().test

    def acc(weights):
        h = test.images
        for i, layer in enumerate(("fc1", "fc2", "fc3")):
            h = h @ weights[layer].T + sd[f"{layer}.bias"]
            if i < 2:
                h = np.maximum(h, 0)
        return float((h.argmax(1) == test.labels).mean())

    base = {layer: sd[f"{layer}.weight"] for layer in ("fc1", "fc2", "fc3")}
    assert acc(base) == pytest.approx(rep["accuracy"]["fp32"], abs=2e-4)
    for layer, curve in sens["curves"].items():
        w = base[layer]
        for key, value in curve.items():
            keep = int(round((1 - float(key)) * w.size))
            order = np.argsort(-np.abs(w).ravel(), kind="stable")[:keep]
            pruned = np.zeros(w.size, np.float32)
            pruned[order] = w.ravel()[order]
            # float32 summation order differs between NumPy and torch: allow two flipped images
            assert value == pytest.approx(acc(dict(base, **{layer: pruned.reshape(w.shape)})), abs=2e-4)
        ok = [float(k) for k, a in curve.items() if a >= rep["accuracy"]["fp32"] - sens["max_drop"]]
        assert sens["suggested"][layer] == max(ok, default=0.0)
    assert sens["curves"]["fc1"]["0.99"] < sens["curves"]["fc1"]["0.5"]  # 99% of fc1 alone hurts
    md = (d / "report.md").read_text()
    assert "## Sensitivity" in md and f"| fc1 | {sens['curves']['fc1']['0.5']:.4f} |" in md


def test_report_dead_units_match_the_stored_weights(report, compressed):
    """The prune stage's dead-unit lists equal the all-zero rows/columns of the loaded weights
    (the later stages keep every zero, so the artifact's zeros are the prune stage's)."""
    import pyserve

    d, rep, _, _ = report
    _, out, _ = compressed
    sd = pyserve.load(out).state_dict()
    prune_stage = next(st for st in rep["stages"] if st["method"] == "prune")
    for layer, L in prune_stage["layers"].items():
        w = next(v for k, v in sd.items() if k.endswith(f"{layer}.weight")).numpy()
        rows = [i for i in range(w.shape[0]) if not any(w[i, j] != 0 for j in range(w.shape[1]))]
        cols = [j for j in range(w.shape[1]) if not any(w[i, j] != 0 for i in range(w.shape[0]))]
        assert L["dead_no_input"] == rows and L["dead_no_output"] == cols
    md = (d / "report.md").read_text()
    assert "## Dead units after pruning" in md
    if any(L["dead_no_output"] for L in prune_stage["layers"].values()):
        layer, L = next((k, v) for k, v in prune_stage["layers"].items() if v["dead_no_output"])
        assert f"| prune | {layer} | " in md and f"{len(L['dead_no_output'])}: {L['dead_no_output'][0]}" in md
