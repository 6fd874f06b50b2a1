"""pyserve.datasets sentence sources: the everyday transfer sentences are disjoint from the pair set
(no sentence shared, none sharing more than half its words with a pair sentence), and
transfer_sentences draws from the named sets in order."""

import re

import pytest

from pyserve.datasets import TRANSFER_SETS, everyday_sentences, sentence_pairs, transfer_sentences


def _words(s: str) -> set[str]:
    return {w for w in re.sub(r"[^a-z0-9 ]", "", s.lower()).split()}


def test_everyday_sentences_are_distinct_and_disjoint_from_the_pairs():
    ev = everyday_sentences()
    assert len(ev) == 258 and len(set(ev)) == len(ev)
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 5 for s in ev)
    pairs = sentence_pairs()
    pair_sents = set(pairs.first) | set(pairs.second)
    assert not set(ev) & pair_sents
    worst = max(len(_words(a) & _words(b)) / len(_words(a) | _words(b)) for a in ev for b in pair_sents)
    assert worst <= 0.5, worst


def test_transfer_sentences_draw_from_the_named_sets_in_order():
    pydoc = transfer_sentences()
    assert pydoc == transfer_sentences(sets=("pydoc",)) and len(pydoc) > 500
    both = transfer_sentences(sets=("everyday", "pydoc"))
    ev = everyday_sentences()
    assert both[:len(ev)] == ev and both[len(ev):] == [s for s in pydoc if s not in set(ev)]
    assert transfer_sentences(5, sets=("everyday", "pydoc")) == ev[:5]
    assert transfer_sentences(3) == pydoc[:3]
    assert set(TRANSFER_SETS) == {"pydoc", "everyday"}


@pytest.mark.parametrize("sets", [("wiki",), (), ("pydoc", "pydoc")])
def test_bad_transfer_sets_are_refused(sets):
    with pytest.raises(ValueError, match="transfer_sets"):
        transfer_sentences(sets=sets)


def test_recipe_data_transfer_sets_reach_the_task(tmp_path):
    from pyserve.compress.pipeline import build_task
    from pyserve.compress.recipe import DataSpec, RecipeError, from_dict, recipe_from_mapping

    assert from_dict(DataSpec, {"dataset": "sentence-pairs"}, "data").transfer_sets == ("pydoc",)
    with pytest.raises(RecipeError, match="data: transfer_sets: expected distinct names"):
        from_dict(DataSpec, {"dataset": "sentence-pairs", "transfer_sets": ["pydoc", "wiki"]}, "data")
    (tmp_path / "tok.py").write_text("def tokenizer():\n    return None\n")
    recipe = recipe_from_mapping({"format_version": 1, "name": "t", "model": {
        "factory": "tok.py:tokenizer", "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]},
                                  "data": {"dataset": "sentence-pairs", "tokenizer": "tok.py:tokenizer",
                                           "transfer_sentences": 300, "transfer_sets": ["everyday", "pydoc"]},
                                  "stages": [{"method": "int8"}]}, base_dir=str(tmp_path))
    task = build_task(recipe, verbose=False)
    assert task.train_sentences == transfer_sentences(300, sets=("everyday", "pydoc"))
    assert task.train_sentences[:258] == everyday_sentences()
