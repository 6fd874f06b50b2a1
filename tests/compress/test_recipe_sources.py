"""Recipe fields beyond factory + mnist: ``model.export`` (a torch.export file), ``data.loader`` (the
user's loader factory), ``evaluate`` (metric and targets) and ``sparsity: suggested`` (the
sensitivity analysis' per-layer targets). Driven through ``pyserve compress`` and the Python API on
a LeNet-300-100 trained briefly on an MNIST subset (fast tier)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyserve
from pyserve.compress import (DataSpec, EvaluateSpec, HuffmanConfig, ModelSpec, PruneConfig, QuantizeConfig, Recipe,
                              RecipeError, TensorSig, compress, load_recipe)
from pyserve.compress._data import split_tensors
from pyserve.compress._train import weight_layers
from pyserve.compress.pipeline import evaluation
from pyserve.datasets import mnist

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str, cls: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_example_{name}_model", ROOT / f"examples/{name}/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, cls)


LeNet300 = _example("lenet300", "LeNet300")

N_TRAIN, N_TEST = 6000, 2000

# The loader factory the recipes name: a DataLoader of batches for train, a Dataset for test.
DATA_PY = f"""
import torch
from torch.utils.data import DataLoader, TensorDataset
from pyserve.datasets import mnist

def make_loaders():
    d = mnist()
    train = TensorDataset(torch.from_numpy(d.train.images[:{N_TRAIN}]), torch.from_numpy(d.train.labels[:{N_TRAIN}]))
    test = TensorDataset(torch.from_numpy(d.test.images[:{N_TEST}]), torch.from_numpy(d.test.labels[:{N_TEST}]))
    return DataLoader(train, batch_size=500), test

def images_2d():       # [N, 1, 28, 28]: does not fit LeNet-300-100's [N, 784]
    d = mnist()
    x = torch.from_numpy(d.test.images[:100]).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(d.test.labels[:100])
    return (x, y), (x, y)

def not_a_pair():
    return [1, 2, 3]

def float_labels():
    x = torch.zeros(10, 784)
    return (x, torch.zeros(10)), (x, torch.zeros(10, dtype=torch.long))
"""

# the signature lines of a recipe's model section, indented as in the recipes below (dedented there)
SIG = """
          inputs: [{name: images, datatype: FP32, shape: [-1, 784]}]
          outputs: [{name: logits, datatype: FP32, shape: [-1, 10]}]"""


def _subset():
    d = mnist()
    return (torch.from_numpy(d.train.images[:N_TRAIN]), torch.from_numpy(d.train.labels[:N_TRAIN]),
            torch.from_numpy(d.test.images[:N_TEST]), torch.from_numpy(d.test.labels[:N_TEST]))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """data.py and lenet.pt2: LeNet-300-100 trained 2 epochs on the subset, exported with a dynamic
    batch; also lenet_b1.pt2, exported with a fixed batch of 1."""
    d = tmp_path_factory.mktemp("sources")
    (d / "data.py").write_text(DATA_PY)
    torch.manual_seed(0)
    model = LeNet300()
    x, y, _, _ = _subset()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
            opt.step()
    model.eval()
    ep = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, d / "lenet.pt2")
    torch.export.save(torch.export.export(model, (x[:1],)), d / "lenet_b1.pt2")
    return d


def write(d: Path, name: str, body: str) -> Path:
    path = d / name
    path.write_text(textwrap.dedent(body))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyserve", *args], capture_output=True, text=True, timeout=600)


def _accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return int((fn(x).argmax(1) == y).sum()) / len(y)


# --- model.export + data.loader + sparsity: suggested + evaluate, through the CLI -------------------

@pytest.fixture(scope="module")
def cli_run(workdir):
    recipe = write(workdir, "export.yaml", """
        format_version: 1
        name: lenet300x
        model:
          export: lenet.pt2""" + SIG + """
        data: {loader: data.py:make_loaders}
        train: {batch_size: 128}
        stages:
          - {method: prune, sparsity: suggested, retrain_epochs: 1}
          - {method: quantize, bits: 5, finetune_epochs: 1}
          - {method: huffman}
        report: {sensitivity: [0.5, 0.8, 0.9, 0.95], sensitivity_max_drop: 0.02}
        evaluate: {metric: accuracy, max_accuracy_drop: 0.05, min_compression: 10}
    """)
    out = workdir / "export.pyserve"
    proc = run_cli("compress", str(recipe), "-o", str(out), "-q", "--report", str(workdir / "report"))
    return recipe, out, proc


def test_cli_export_loader_suggested_evaluate(workdir, cli_run):
    _, out, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((workdir / "report/report.json").read_text())
    ev = report["evaluation"]
    _, _, tx, ty = _subset()
    # the baseline is the exported program's accuracy on the loader's test split, measured here
    baseline = _accuracy(torch.export.load(workdir / "lenet.pt2").module(), tx, ty)
    loaded = pyserve.load(out)
    compressed = _accuracy(loaded, tx, ty)
    assert ev["metric"] == "accuracy" and ev["met"] is True and ev["missed"] == []
    assert ev["baseline"] == pytest.approx(baseline, abs=1e-9)
    assert ev["compressed"] == pytest.approx(compressed, abs=1e-9)
    assert ev["accuracy_drop"] == pytest.approx(baseline - compressed, abs=1e-9) and ev["accuracy_drop"] <= 0.05
    assert ev["compression"] == pytest.approx(report["compression"]) and ev["compression"] >= 10
    assert (f"evaluate accuracy: fp32 {baseline:.4f}, artifact {compressed:.4f}; target met: "
            f"accuracy drop {baseline - compressed:.4f} <= 0.05, {ev['compression']:.1f}x >= 10x") in proc.stdout
    md = (workdir / "report/report.md").read_text()
    assert "## Evaluation" in md and f"| accuracy | {baseline:.4f} | {compressed:.4f} |" in md and "| yes |" in md


def test_cli_suggested_sparsity_is_applied(workdir, cli_run):
    """Each layer is pruned to the sparsity suggested by the sensitivity curves, and the curves
    themselves match a NumPy re-computation (each layer pruned alone, no retraining)."""
    _, out, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    sens = json.loads((workdir / "report/report.json").read_text())["sensitivity"]
    module = torch.export.load(workdir / "lenet.pt2").module()
    w = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    _, _, tx, ty = _subset()
    x, labels = tx.numpy(), ty.numpy()

    def forward(ws):  # LeNet-300-100 in NumPy
        h = np.maximum(x @ ws["fc1.weight"].T + ws["fc1.bias"], 0)
        h = np.maximum(h @ ws["fc2.weight"].T + ws["fc2.bias"], 0)
        return h @ ws["fc3.weight"].T + ws["fc3.bias"]

    base = float((forward(w).argmax(1) == labels).mean())
    for layer in ("fc1", "fc2", "fc3"):
        for s in (0.5, 0.8, 0.9, 0.95):
            ws = dict(w)
            flat = np.abs(w[f"{layer}.weight"]).ravel()
            keep = int(round((1 - s) * flat.size))
            mask = np.zeros(flat.size, bool)
            mask[np.argsort(-flat, kind="stable")[:keep]] = True
            ws[f"{layer}.weight"] = w[f"{layer}.weight"] * mask.reshape(w[f"{layer}.weight"].shape)
            assert sens["curves"][layer][f"{s:g}"] == pytest.approx(float((forward(ws).argmax(1) == labels).mean()),
                                                                      abs=1.5 / len(labels))
        ok = [s for s in (0.5, 0.8, 0.9, 0.95) if sens["curves"][layer][f"{s:g}"] >= base - 0.02 - 1e-9]
        assert sens["suggested"][layer] == pytest.approx(max(ok, default=0.0))
    stored = {k: v.numpy() for k, v in pyserve.load(out).state_dict().items()}
    for layer, target in sens["suggested"].items():
        wl = next(v for k, v in stored.items() if k.endswith(f"{layer}.weight"))
        assert (wl == 0).mean() == pytest.approx(target, abs=2.0 / wl.size + 1e-3), layer
    assert any(v > 0 for v in sens["suggested"].values())


def test_python_api_export_matches_loaded_artifact(workdir, tmp_path):
    """The Python API mirrors the recipe; the artifact computes what the compressed GraphModule does."""
    recipe = Recipe(
        name="lenet300x",
        model=ModelSpec(export="lenet.pt2", inputs=(TensorSig("images", "FP32", (-1, 784)),),
                        outputs=(TensorSig("logits", "FP32", (-1, 10)),)),
        data=DataSpec(loader="data.py:make_loaders"),
        stages=(PruneConfig(sparsity={"fc1": 0.9, "fc2": 0.9, "fc3": 0.7}, retrain_epochs=1),
                QuantizeConfig(bits=4, finetune_epochs=1), HuffmanConfig()),
        evaluate=EvaluateSpec(metric="top1_error", max_accuracy_drop=0.1),
        base_dir=str(workdir))
    out = tmp_path / "api.pyserve"
    result = compress(recipe, out, verbose=False)
    assert isinstance(result.model, torch.fx.GraphModule)  # the exported program's module, retrained
    _, _, tx, ty = _subset()
    loaded = pyserve.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tx), result.model(tx))
    sd = result.model.state_dict()
    for layer, s in (("fc1", 0.9), ("fc2", 0.9), ("fc3", 0.7)):
        wl = sd[f"{layer}.weight"]
        assert float((wl == 0).float().mean()) == pytest.approx(s, abs=1e-3)  # still zero after retraining
        assert torch.unique(wl[wl != 0]).numel() <= 15                        # 4-bit codebook
        assert result.manifest.tensors[f"{layer}.weight"]["entropy"] == "huffman"
    err = 1 - _accuracy(loaded, tx, ty)
    ev = result.evaluation
    assert ev["metric"] == "top1_error" and ev["compressed"] == pytest.approx(err, abs=1e-9)
    assert ev["met"] is (ev["accuracy_drop"] <= 0.1) and result.target_met is ev["met"]
    assert result.manifest.stats["dataset"] == "data.py:make_loaders"


def test_missed_target_writes_artifact_and_exits_3(workdir, tmp_path):
    recipe = write(tmp_path, "miss.yaml", f"""
        format_version: 1
        name: miss
        model:
          export: {workdir / 'lenet.pt2'}""" + SIG + f"""
        data: {{loader: {workdir / 'data.py'}:make_loaders}}
        stages: [{{method: prune, sparsity: 0.5, retrain_epochs: 0}}]
        evaluate: {{max_accuracy_drop: 0.0, min_compression: 1000}}
    """)
    out = tmp_path / "miss.pyserve"
    proc = run_cli("compress", str(recipe), "-o", str(out), "-q", "--report", str(tmp_path / "rep"))
    assert proc.returncode == 3, proc.stderr
    assert out.is_file()  # nothing lost
    ratio = json.loads((tmp_path / "rep/report.json").read_text())["compression"]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyserve compress: target missed: ")
    assert f"compression {ratio:.1f}x < min_compression 1000x" in lines[0] and str(out) in lines[0]
    ev = json.loads((tmp_path / "rep/report.json").read_text())["evaluation"]
    assert ev["met"] is False and any("min_compression" in m for m in ev["missed"])


def test_evaluation_targets():
    ev = evaluation(EvaluateSpec(max_accuracy_drop=0.001), 0.9836, 0.9826, 40.0)
    assert ev["met"] is True and ev["accuracy_drop"] == pytest.approx(0.001)  # exactly at the limit
    ev = evaluation(EvaluateSpec(metric="top1_error", max_accuracy_drop=0.001), 0.9836, 0.9820, 40.0)
    assert ev["met"] is False and ev["baseline"] == pytest.approx(0.0164) and ev["compressed"] == pytest.approx(0.018)
    assert ev["missed"] == ["accuracy drop 0.0016 > max_accuracy_drop 0.001 (top1_error: fp32 0.0164, artifact 0.0180)"]
    ev = evaluation(EvaluateSpec(min_compression=40), 0.98, 0.99, 39.9)
    assert ev["met"] is False and ev["missed"] == ["compression 39.9x < min_compression 40x"]
    assert evaluation(EvaluateSpec(), 0.98, 0.5, 1.0)["met"] is None  # no target: nothing to miss


# --- refused before any training -----------------------------------------------------------------

@pytest.mark.parametrize("model,data,extra,expect", [
    ("factory: m.py:M\n  export: lenet.pt2", "", "",
     "model: factory: give exactly one of model.factory (with model.checkpoint) or model.export"),
    ("checkpoint: c.pt", "", "", "got neither"),
    ("export: lenet.pt2\n  checkpoint: c.pt", "", "", "model: checkpoint: only with model.factory"),
    ("export: missing.pt2", "", "", "model.export: no such file"),
    ("export: data.py", "", "", "model.export: "),
    ("export: lenet_b1.pt2", "", "", "model.export: input images was exported with a fixed batch size (1)"),
    ("export: lenet.pt2", "data: {loader: data.py:images_2d}", "",
     "data.loader: the data's inputs have shape [-1, 1, 28, 28], the exported program (model.export) takes images [-1, 784]"),
    ("export: lenet.pt2", "data: {loader: data.py:not_a_pair}", "",
     "data.loader: data.py:not_a_pair must return (train, test), got list of length 3"),
    ("export: lenet.pt2", "data: {loader: data.py:float_labels}", "",
     "data.loader: data.py:float_labels: train split: labels must be integer class indices of shape [N], got torch.float32"),
    ("export: lenet.pt2", "data: {loader: data.py:nothing}", "", "data.loader: data.py has no attribute 'nothing'"),
    ("export: lenet.pt2", "data: {loader: data.py:make_loaders, dataset: mnist}", "",
     "data: loader: give either data.dataset (built in) or data.loader"),
    ("export: lenet.pt2", "", "evaluate: {metric: f1}", "evaluate: metric: must be one of accuracy, top1_error, got 'f1'"),
    ("export: lenet.pt2", "", "evaluate: {max_accuracy_drop: 2}", "evaluate: max_accuracy_drop: must be a fraction"),
])
def test_bad_sources_refused(workdir, model, data, extra, expect):
    recipe = write(workdir, "bad.yaml", f"""
        format_version: 1
        name: bad
        model:
          {model.replace(chr(10), chr(10) + " " * 8)}""" + SIG + f"""
        {data}
        {extra}
        stages: [{{method: prune, sparsity: 0.5}}]
    """)
    with pytest.raises(RecipeError) as info:
        compress(load_recipe(recipe), workdir / "bad.pyserve", verbose=False)
    assert expect in str(info.value)
    assert not (workdir / "bad.pyserve").exists()


def test_loader_data_that_does_not_fit_a_factory_model(workdir):
    recipe = write(workdir, "fit.yaml", f"""
        format_version: 1
        name: fit
        model:
          factory: {ROOT / 'examples/lenet300/model.py'}:LeNet300
          checkpoint: never.pt""" + SIG + """
        data: {loader: data.py:images_2d}
        train: {epochs: 50}
        stages: [{method: prune, sparsity: 0.5}]
    """)
    with pytest.raises(RecipeError) as info:
        compress(load_recipe(recipe), workdir / "fit.pyserve", verbose=False)
    assert "model.inputs: images has shape [-1, 784], the data gives [-1, 1, 28, 28]" in str(info.value)
    assert not (workdir / "never.pt").exists()  # no training started


@pytest.mark.parametrize("stage,report,expect", [
    ("{method: prune, sparsity: suggested}", "", "stages[0].sparsity: 'suggested' needs the sensitivity analysis"),
    ("{method: prune, sparsity: sugested}", "report: {sensitivity: [0.5]}",
     "sparsity: a fraction in [0, 1), a mapping layer -> fraction or 'suggested', got 'sugested'"),
])
def test_suggested_refused_through_cli(workdir, stage, report, expect):
    recipe = write(workdir, "sugg.yaml", """
        format_version: 1
        name: sugg
        model:
          export: lenet.pt2""" + SIG + f"""
        data: {{loader: data.py:make_loaders}}
        stages: [{stage}]
        {report}
    """)
    proc = run_cli("compress", str(recipe), "-o", str(workdir / "sugg.pyserve"), "-q")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and expect in proc.stderr and str(recipe) in proc.stderr
    assert not (workdir / "sugg.pyserve").exists()


def test_prune_handler_refuses_unresolved_suggested():
    from pyserve.compress.methods import CompressionState
    from pyserve.compress.prune import prune

    with pytest.raises(ValueError, match="'suggested' is filled in by pyserve.compress.compress"):
        prune(CompressionState(LeNet300()), PruneConfig(sparsity="suggested"), None)


# --- pieces -----------------------------------------------------------------------------------------

def test_weight_layers_of_exported_lenet5():
    """The layers of an exported program are found from its graph (no nn.Linear / nn.Conv2d left)."""
    model = _example("lenet5", "LeNet5")().eval()
    gm = torch.export.export(model, (torch.zeros(2, 784),), dynamic_shapes=({0: torch.export.Dim("b")},)).module()
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in gm.modules())
    found = {name: tuple(m.weight.shape) for name, m in weight_layers(gm).items()}
    assert found == {name: tuple(m.weight.shape) for name, m in weight_layers(model).items()}
    assert found["conv1"] == (20, 1, 5, 5)
    with pytest.raises(ValueError, match="'fc9' is not a Linear/Conv layer"):
        weight_layers(gm, ["fc9"])


def test_split_tensors_contract():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ds = torch.utils.data.TensorDataset(x, y)
    for split in ((x, y), (x.numpy().astype(np.float64), y.numpy()), ds,
                  torch.utils.data.DataLoader(ds, batch_size=4), [(x[i], int(y[i])) for i in range(6)]):
        gx, gy = split_tensors(split, "train split")
        assert torch.equal(gx, x) and gx.dtype == torch.float32 and torch.equal(gy, y) and gy.dtype == torch.int64
    for split, msg in ((3, "expected a Dataset"), ((x, y[:5]), "6 examples but 5 labels"),
                       ((x, -y), "labels must be class indices >= 0"), ([], "the split is empty"),
                       ([(x[0],)], "each item must be an (x, y) pair")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            split_tensors(split, "train split")


def test_pyserve_export_points_an_export_recipe_at_its_pt2(workdir):
    recipe = write(workdir, "exp.yaml", """
        format_version: 1
        name: exp
        model:
          export: lenet.pt2""" + SIG + """
        stages: [{method: huffman}]
    """)
    out = workdir / "exp.pt2"
    proc = run_cli("export", str(recipe), "--to", "torch", "-o", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert "model.export names a torch.export file: export that file itself" in proc.stderr
    assert str(workdir / "lenet.pt2") in proc.stderr
