"""The artifact's text input: a `tokenizers` tokenizer stored as JSON in the artifact, the module
pyserve.load returns for it, and the errors for bad sections and bad sentences. Uses a small
WordLevel tokenizer built here (the MiniLM tokenizer is tested in tests/test_minilm.py)."""

import json
import zlib

import numpy as np
import pytest
import torch
from torch import nn

tokenizers = pytest.importorskip("tokenizers")

import pyserve  # noqa: E402
from pyserve import artifact  # noqa: E402
from pyserve.artifact import TextInput  # noqa: E402
from pyserve.artifact._container import read_container, write_container  # noqa: E402

VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8, "a": 9}


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


class Bag(nn.Module):
    """Mean of token embeddings over the mask: int64 [B, S] x2 -> float32 [B, 4]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(len(VOCAB), 4)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)


def _text(**kw):
    args = dict(tokenizer_json=_tokenizer_json(), feeds={"input_ids": "ids", "attention_mask": "attention_mask"},
                max_length=5)
    args.update(kw)
    return TextInput(**args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "bag.pyserve"
    ex = (torch.tensor([[2, 4, 5, 3], [2, 9, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    artifact.save(path, Bag().eval(), ex, model_name="bag", input_names=["input_ids", "attention_mask"],
                  output_names=["embedding"], dynamic_axes=((0, 1), (0, 1)), text=_text())
    return path


def test_manifest_and_tokens(saved):
    m = artifact.read_manifest(saved)
    assert m.text_input == artifact.TensorSpec("text", "BYTES", (-1,))
    assert [s.name for s in m.inputs] == ["input_ids", "attention_mask"]  # the graph's inputs stay
    raw, blobs = read_container(saved)
    assert json.loads(zlib.decompress(blobs[raw["text"]["tokenizer"]["blob"]])) == json.loads(_tokenizer_json())
    model = pyserve.load(saved)
    ids, mask = model.token_inputs(["the cat sat on the mat", "a cat", "dog"])
    # [CLS] ... [SEP], truncated to max_length 5 (special tokens included), padded with [PAD] = 0
    assert ids.tolist() == [[2, 4, 5, 6, 3], [2, 9, 5, 3, 0], [2, 1, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert ids.dtype == torch.int64


def test_sentences_in_embeddings_out(saved):
    model = pyserve.load(saved)
    bag = Bag().eval()
    with torch.inference_mode():
        got = model(["a cat", "the mat"])
        want = torch.stack([bag.emb.weight[[2, 9, 5, 3]].mean(0), bag.emb.weight[[2, 4, 8, 3]].mean(0)])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(model("a cat"), want[:1])
        torch.testing.assert_close(model(np.array([b"a cat", b"the mat"], dtype=object)), want)
        ids, mask = model.token_inputs(["a cat"])
        torch.testing.assert_close(model(ids, mask), want[:1])  # token ids still go straight in
    with pytest.raises(ValueError, match="element 0 is not valid UTF-8"):
        model([b"\xff"])
    with pytest.raises(ValueError, match="element 1 is int"):
        model.token_inputs(np.array([b"a", 3], dtype=object))
    with pytest.raises(ValueError, match="expected a 1-D array"):
        model.token_inputs(np.array([[b"a"]], dtype=object))


def test_save_refuses_bad_text_inputs(tmp_path):
    ex = (torch.tensor([[2, 4, 3]]).repeat(2, 1), torch.ones(2, 3, dtype=torch.int64))
    kw = dict(model_name="bag", input_names=["input_ids", "attention_mask"], dynamic_axes=((0, 1), (0, 1)))
    with pytest.raises(ValueError, match="feeds .* must name exactly the graph inputs"):
        artifact.save(tmp_path / "a.pyserve", Bag(), ex, text=_text(feeds={"input_ids": "ids"}), **kw)
    with pytest.raises(ValueError, match="is a graph input name"):
        artifact.save(tmp_path / "a.pyserve", Bag(), ex, text=_text(name="input_ids"), **kw)
    with pytest.raises(ValueError, match="'feeds'.*must be one of"):
        _text(feeds={"input_ids": "tokens"})
    with pytest.raises(ValueError, match="'max_length' must be an int >= 2"):
        _text(max_length=1)
    with pytest.raises(ValueError, match="must be a pyserve.artifact.TextInput"):
        artifact.save(tmp_path / "a.pyserve", Bag(), ex, text={"tokenizer": "x"}, **kw)
    assert not (tmp_path / "a.pyserve").exists()


def _rewrite(src, dst, edit):
    raw, blobs = read_container(src)
    raw.pop("blobs")
    edit(raw, blobs)
    write_container(dst, raw, blobs)


@pytest.mark.parametrize("edit,match", [
    (lambda raw, blobs: raw["text"]["tokenizer"].update(format="sentencepiece"), "unknown tokenizer format"),
    (lambda raw, blobs: raw["text"]["tokenizer"].update(blob="nope"), "KeyError"),
    (lambda raw, blobs: raw["text"].update(feeds={"input_ids": "ids"}), "text section feeds"),
    (lambda raw, blobs: blobs.update(tokenizer=zlib.compress(b"not json")), "JSONDecodeError"),
    (lambda raw, blobs: raw["text"]["input"].update(datatype="INT64"), "must be BYTES"),
])
def test_load_refuses_a_bad_text_section(saved, tmp_path, edit, match):
    bad = tmp_path / "bad.pyserve"
    _rewrite(saved, bad, edit)
    with pytest.raises(artifact.ArtifactError, match=match):
        artifact.load_artifact(bad)


def test_inspect_shows_the_text_input(saved, capsys):
    from pyserve.cli.main import main

    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "text   text            BYTES [-1]  tokenizer inside (max_length 5; feeds input_ids, attention_mask" in out


def test_pyserve_backend_serves_text_or_token_ids(saved, tmp_path):
    import asyncio

    from pyserve.backends.pyserve_backend import PyserveBackend
    from pyserve.protocol.errors import InvalidArgument

    async def run():
        be = PyserveBackend(saved)
        await be.load()
        assert [(s.name, s.datatype, s.shape) for s in be.signature.inputs] == [("text", "BYTES", (-1,))]
        good = {"text": np.array([b"a cat", b"the mat"], dtype=object)}
        bad = {"text": np.array([b"\xc3\x28"], dtype=object)}
        empty = {"text": np.array([], dtype=object)}
        res = await be.infer([good, bad, empty, good])
        want = pyserve.load(saved)(["a cat", "the mat"]).numpy()
        np.testing.assert_allclose(res[0]["embedding"], want, atol=1e-6)
        np.testing.assert_allclose(res[3]["embedding"], want, atol=1e-6)
        assert isinstance(res[1], InvalidArgument) and "element 0 is not valid UTF-8" in str(res[1])
        assert isinstance(res[2], InvalidArgument) and "no sentences" in str(res[2])
        ids = PyserveBackend(saved, inputs="token_ids")
        await ids.load()
        assert [s.name for s in ids.signature.inputs] == ["input_ids", "attention_mask"]

    asyncio.run(run())
    with pytest.raises(ValueError, match="PYSERVE_INPUTS.*expected one of"):
        PyserveBackend(saved, inputs="words")
    plain = tmp_path / "plain.pyserve"
    artifact.save(plain, Bag().eval(), (torch.tensor([[2, 4, 3]] * 2), torch.ones(2, 3, dtype=torch.int64)),
                  model_name="plain", dynamic_axes=((0, 1), (0, 1)))
    with pytest.raises(ValueError, match="PYSERVE_INPUTS=text, but the artifact holds no tokenizer"):
        asyncio.run(PyserveBackend(plain, inputs="text").load())
