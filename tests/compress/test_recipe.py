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
    (("  factory: model.py:Net\n", ""), "model.factory: required field is missing"),
    (("shape: [-1, 784]", "shape: [-1, wide]"), "model.inputs[0].shape[1]"),
    (("name: tiny", "name: tiny\nreport: {sensitivity: [0.5, 1.0]}"), "report: sensitivity: each sparsity must be in [0, 1)"),
    (("name: tiny", "name: tiny\nreport: {sensitivity: 0.5}"), "report.sensitivity: expected a list"),
    (("name: tiny", "name: tiny\nreport: {sensitivty: [0.5]}"), "report.sensitivty: unknown field"),
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
