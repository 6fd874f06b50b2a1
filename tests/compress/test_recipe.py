"""Recipe loading: every bad field is refused with the file and field named."""

import textwrap

import pytest

from pyserve.compress import PruneConfig, QuantizeConfig, RecipeError, load_recipe
from pyserve.compress.huffman import HuffmanConfig

GOOD = """
format_version: 1
name: tiny
model:
  factory: model.py:Net
  inputs: [{name: x, datatype: FP32, shape: [-1, 784]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 10]}]
stages:
  - {method: prune, sparsity: 0.9}
  - {method: quantize, bits: {fc1: 4}, lr: 1e-3}
  - {method: huffman}
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_recipe_loads(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.name == "tiny" and r.train.epochs == 10
    assert r.stages == (PruneConfig(sparsity=0.9), QuantizeConfig(bits={"fc1": 4}, lr=1e-3), HuffmanConfig())
    assert r.resolve("model.py") == (tmp_path / "model.py").resolve()
    assert r.report.sensitivity == ()  # no sensitivity analysis unless asked
    r = load_recipe(write(tmp_path, GOOD + "report: {sensitivity: [0.5, 0.9], sensitivity_max_drop: 0.02}\n"))
    assert r.report.sensitivity == (0.5, 0.9) and r.report.sensitivity_max_drop == 0.02


def test_shipped_recipe_loads():
    r = load_recipe("examples/lenet300/recipe.yaml")
    assert [s.method for s in r.stages] == ["prune", "quantize", "huffman"]


@pytest.mark.parametrize("edit,field", [
    (("name: tiny", "name: tiny\ncolour: red"), "colour: unknown field"),
    (("{method: prune, sparsity: 0.9}", "{method: prune, sparsity: 0.9, sparsty: 1}"), "stages[0].sparsty: unknown field"),
    (("bits: {fc1: 4}", "bits: {fc1: four}"), "stages[1].bits"),
    (("bits: {fc1: 4}", "bits: 12"), "bits: must be in 2..8"),
    (("{method: huffman}", "{method: gzip}"), "stages[2].method: unknown method 'gzip'"),
    (("sparsity: 0.9", "sparsity: 1.5"), "sparsity: must be in [0, 1)"),
    (("format_version: 1", "format_version: 7"), "format_version: unsupported"),
    (("  factory: model.py:Net\n", ""), "model: factory: give exactly one of model.factory (with model.checkpoint) or model.export"),
    (("shape: [-1, 784]", "shape: [-1, wide]"), "model.inputs[0].shape[1]"),
    (("name: tiny", "name: tiny\nreport: {sensitivity: [0.5, 1.0]}"), "report: sensitivity: each sparsity must be in [0, 1)"),
    (("name: tiny", "name: tiny\nreport: {sensitivity: 0.5}"), "report.sensitivity: expected a list"),
    (("name: tiny", "name: tiny\nreport: {sensitivty: [0.5]}"), "report.sensitivty: unknown field"),
    (("datatype: FP32, shape: [-1, 784]", "datatype: FP33, shape: [-1, 784]"),
     "model.inputs[0]: datatype: unknown datatype 'FP33'; expected one of"),
    (("shape: [-1, 784]", "shape: [-1, 0]"), "model.inputs[0]: shape: each dim must be -1 (varies) or >= 1, got 0"),
    (("name: tiny", "name: tiny\ntrain: {batch_size: 0}"), "train: batch_size: must be >= 1, got 0"),
    (("name: tiny", "name: tiny\ntrain: {epochs: -1}"), "train: epochs: must be >= 0, got -1"),
    (("name: tiny", "name: tiny\ntrain: {lr: 0}"), "train: lr: must be > 0, got 0.0"),
])
def test_bad_field_named(tmp_path, edit, field):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path))
    assert field in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="malformed YAML at line 2"):
        load_recipe(write(tmp_path, "name: x\n  bad: [unclosed\n"))


@pytest.mark.parametrize("edit,expect", [
    (("bits: {fc1: 4}", "bits: 12"), "line 10: stages[1]: bits: must be in 2..8, got 12"),
    (("shape: [-1, 784]", "shape: [-1, wide]"), "line 6: model.inputs[0].shape[1]: expected an integer"),
    (("name: tiny", "name: tiny\ncolour: red"), "line 4: colour: unknown field"),
    (("{method: huffman}", "{method: gzip}"), "line 11: stages[2].method: unknown method 'gzip'"),
    (("  factory: model.py:Net\n", "  factory: model.py:Net\n  export: m.pt2\n"),
     "line 5: model: factory: give exactly one of model.factory"),
    (("name: tiny", "name: tiny\nevaluate:\n  metric: f1"), "line 5: evaluate: metric: must be one of accuracy, top1_error"),
])
def test_bad_field_line(tmp_path, edit, expect):
    """The line is the field's in the file (GOOD starts with a blank line: format_version is line 2)."""
    old, new = edit
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {expect}")


def test_evaluate_and_sources_load(tmp_path):
    r = load_recipe(write(tmp_path, GOOD + "evaluate: {metric: top1_error, max_accuracy_drop: 0.001, min_compression: 40}\n"
                                           "data: {loader: data.py:make}\n"))
    assert (r.evaluate.metric, r.evaluate.max_accuracy_drop, r.evaluate.min_compression) == ("top1_error", 0.001, 40.0)
    assert r.data.loader == "data.py:make" and r.data.dataset is None and r.data.where == "data.loader"
    r = load_recipe(write(tmp_path, GOOD.replace("  factory: model.py:Net\n", "  export: m.pt2\n")
                          .replace("sparsity: 0.9", "sparsity: suggested")))
    assert r.model.export == "m.pt2" and r.model.factory is None and r.model.source == "model.export"
    assert r.stages[0] == PruneConfig(sparsity="suggested") and r.data.dataset == "mnist"
    assert r.evaluate.metric == "accuracy" and not r.evaluate.has_targets
