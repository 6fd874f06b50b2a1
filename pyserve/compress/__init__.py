"""Model compression: Deep Compression (pruning, trained quantization, Huffman coding), int8
post-training quantization, knowledge distillation and low-rank factorization.

``pyserve compress RECIPE -o OUT.pyserve`` or :func:`compress`. Each method is a frozen dataclass
config plus a handler registered in :mod:`pyserve.compress.methods`.
"""

from pyserve.compress import distill as _distill  # noqa: F401  (registers "distill")
from pyserve.compress import huffman as _huffman  # noqa: F401  (registers "huffman")
from pyserve.compress import int8 as _int8  # noqa: F401  (registers "int8")
from pyserve.compress import lowrank as _lowrank  # noqa: F401  (registers "lowrank")
from pyserve.compress import prune as _prune  # noqa: F401  (registers "prune")
from pyserve.compress import quantize as _quantize  # noqa: F401  (registers "quantize")
from pyserve.compress.distill import DistillConfig
from pyserve.compress.huffman import HuffmanConfig
from pyserve.compress.int8 import Int8Config
from pyserve.compress.lowrank import LowRankConfig
from pyserve.compress.methods import METHODS, CompressionState
from pyserve.compress.pipeline import CompressionResult, compress
from pyserve.compress.prune import PruneConfig
from pyserve.compress.quantize import QuantizeConfig, kmeans_1d
from pyserve.compress.recipe import (DataSpec, EvaluateSpec, ModelSpec, Recipe, RecipeError, ReportSpec, TensorSig,
                                     TrainSpec, load_recipe)
from pyserve.compress.sensitivity import sensitivity, suggest_sparsity

__all__ = ["METHODS", "CompressionResult", "CompressionState", "DataSpec", "DistillConfig", "EvaluateSpec",
           "HuffmanConfig", "Int8Config", "LowRankConfig", "ModelSpec", "PruneConfig", "QuantizeConfig",
           "Recipe", "RecipeError", "ReportSpec", "TensorSig", "TrainSpec", "compress", "kmeans_1d", "load_recipe",
           "sensitivity", "suggest_sparsity"]
