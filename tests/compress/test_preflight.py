"""Recipes that cannot work on their model or data are refused before any training starts."""

import subprocess
import sys
import textwrap

import pytest

from pyserve.compress import RecipeError, compress, load_recipe

MODELS = """
from torch import nn

class NoWeights(nn.Module):
    def forward(self, images):
        return images[:, :10].relu()

class Narrow(nn.Module):          # expects 100 features, MNIST gives 784
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(100, 10)
    def forward(self, images):
        return self.fc1(images)

class FiveClasses(nn.Module):     # 5 logits for 10 classes
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 5)
    def forward(self, images):
        return self.fc1(images)

class Good(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 10)
    def forward(self, images):
        return self.fc1(images)
"""


def recipe(tmp_path, factory, *, stage="{method: prune, sparsity: 0.5}", shape="[-1, 784]", datatype="FP32"):
    (tmp_path / "models.py").write_text(MODELS)
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        format_version: 1
        name: bad
        model:
          factory: models.py:{factory}
          checkpoint: ckpt.pt
          inputs: [{{name: images, datatype: {datatype}, shape: {shape}}}]
          outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
        train: {{epochs: 50}}
        stages: [{stage}]
    """))
    return path


@pytest.mark.parametrize("factory,kw,expect", [
    ("NoWeights", {}, "model.factory: models.py:NoWeights has no Linear or Conv layer to compress"),
    ("Narrow", {}, "data.dataset: the model cannot take the data's inputs [-1, 784]"),
    ("Good", {"shape": "[-1, 28, 28]"}, "model.inputs: images has shape [-1, 28, 28], the data gives [-1, 784]"),
    ("FiveClasses", {}, "model.outputs: the model returns shape [-1, 5]; classifying mnist needs [-1, 10] logits"),
    ("Good", {"stage": "{method: prune, sparsity: {fc9: 0.5}}"}, "stages[0].sparsity: 'fc9' is not a Linear/Conv layer"),
    ("Good", {"stage": "{method: quantize, bits: {fc2: 4}}"}, "stages[0].bits: 'fc2' is not a Linear/Conv layer"),
    ("Good", {"stage": "{method: prune, sparsity: 0.5, index_bits: {fc0: 4}}"}, "stages[0].index_bits: 'fc0'"),
    ("Good", {"datatype": "FP64"}, "model.inputs[0].datatype: images is declared FP64, the data gives FP32"),
])
def test_refused_before_training(tmp_path, factory, kw, expect):
    path = recipe(tmp_path, factory, **kw)
    with pytest.raises(RecipeError) as info:
        compress(load_recipe(path), tmp_path / "out.pyserve", verbose=False)
    assert expect in str(info.value)
    assert not (tmp_path / "ckpt.pt").exists()  # 50 epochs of training never started
    assert not (tmp_path / "out.pyserve").exists()


def test_unknown_dataset_lists_every_builtin_one(tmp_path):
    path = recipe(tmp_path, "Good")
    path.write_text(path.read_text() + "data: {dataset: cifar}\n")
    with pytest.raises(RecipeError) as info:
        compress(load_recipe(path), tmp_path / "out.pyserve", verbose=False)
    assert "data.dataset: unknown dataset 'cifar'; expected one of mnist, sentence-pairs" in str(info.value)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "out.pyserve").exists()


@pytest.mark.parametrize("stage,expect", [
    ("{method: quantize, bits: 1}", "bits: must be in 2..8, got 1"),
    ("{method: quantize, bits: {fc1: 9}}", "bits: must be in 2..8, got 9"),
    ("{method: prune, sparsity: -0.1}", "sparsity: must be in [0, 1), got -0.1"),
    ("{method: prune, sparsity: {fc1: 1.0}}", "sparsity: must be in [0, 1), got 1.0"),
    ("{method: prune, sparsity: 0.5, index_bits: 9}", "index_bits: must be in 1..8, got 9"),
])
def test_out_of_range_fields_refused_at_load(tmp_path, stage, expect):
    path = recipe(tmp_path, "Good", stage=stage)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and expect in str(info.value)


def test_cli_one_line_exit_2(tmp_path):
    path = recipe(tmp_path, "Narrow")
    proc = subprocess.run([sys.executable, "-m", "pyserve", "compress", str(path), "-o", str(tmp_path / "o.pyserve")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the model cannot take the data's inputs" in lines[0]
    assert not (tmp_path / "ckpt.pt").exists()
