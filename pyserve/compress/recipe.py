"""Recipes: the YAML file that declares model, data, training and compression stages.

A recipe loads into frozen dataclasses; every unknown or ill-typed field is refused with a
:class:`RecipeError` naming the file and the field (``stages[1].bits``). Stage configs come from the
method registry (:mod:`pyserve.compress.methods`), so adding a method never changes this loader.

Example (examples/lenet300/recipe.yaml)::

    format_version: 1
    name: lenet300
    seed: 0
    model:
      factory: model.py:LeNet300          # FILE.py:callable (relative to the recipe) or module:callable
      checkpoint: checkpoint/lenet300.pt  # torch state_dict; trained from scratch when missing
      inputs:  [{name: images, datatype: FP32, shape: [-1, 784]}]
      outputs: [{name: logits, datatype: FP32, shape: [-1, 10]}]
    data: {dataset: mnist}
    train: {batch_size: 128, lr: 0.001, epochs: 10}
    stages:
      - {method: prune, sparsity: {fc1: 0.95, fc2: 0.91, fc3: 0.74}, rounds: 4, schedule: gradual,
         retrain_epochs: 5, index_bits: {fc1: 8, fc2: 6, fc3: 5}}
      - {method: quantize, bits: 5, finetune_epochs: 2, lr: 0.0001}
      - {method: huffman}
    evaluate: {metric: top1_error, max_accuracy_drop: 0.001, min_compression: 40}

Alternatives: ``model: {export: model.pt2, inputs: ..., outputs: ...}`` (a torch.export file instead
of factory + checkpoint, :class:`ModelSpec`); ``data: {loader: data.py:make_loaders}`` (your
(train, test) data instead of a built-in dataset, :class:`DataSpec`); a prune stage's
``sparsity: suggested`` (per-layer targets from ``report.sensitivity``). The Python API takes the
same dataclasses: ``compress(Recipe(name=..., model=ModelSpec(...), stages=(PruneConfig(...), ...)), out)``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["RECIPE_FORMAT_VERSION", "METRICS", "Recipe", "RecipeError", "ModelSpec", "DataSpec", "TrainSpec",
           "ReportSpec", "EvaluateSpec", "TensorSig", "load_recipe", "from_dict"]

RECIPE_FORMAT_VERSION = 1


class RecipeError(ValueError):
    """A recipe file that cannot be used: message is ``FILE: line N: FIELD: problem`` (the line when
    the field is in the file)."""


@dataclass(frozen=True)
class TensorSig:
    """One model input or output: protocol name, KServe v2 datatype (``FP32``, ``INT64``, ...) and
    shape (-1 for a dim that varies, dim 0 being the batch)."""

    name: str
    datatype: str = "FP32"
    shape: tuple[int, ...] = ()

    def __post_init__(self):
        from pyserve import dtypes

        if not self.name:
            raise ValueError("name: must not be empty")
        try:
            dtypes.from_name(self.datatype)
        except ValueError as exc:
            raise ValueError(f"datatype: {exc}") from None
        bad = [d for d in self.shape if d < -1 or d == 0]
        if bad:
            raise ValueError(f"shape: each dim must be -1 (varies) or >= 1, got {bad[0]}")


@dataclass(frozen=True)
class ModelSpec:
    """The model: exactly one of

    * ``factory``: ``FILE.py:callable`` (relative to the recipe) or ``module:callable`` returning an
      untrained ``torch.nn.Module``, with ``checkpoint``, a state_dict file (relative to the
      recipe) restored when it exists, else written after training ``train.epochs`` epochs; or
    * ``export``: a ``torch.export.save`` file (``.pt2``, relative to the recipe) of the trained
      model. Its input dim 0 must be a dynamic batch dimension. Its ``module()`` (a GraphModule whose
      parameters keep the original names, ``fc1.weight``) is what the stages prune, quantize and
      retrain; the graph is retrained as it was captured (an eval-mode export trains with dropout
      off and batch-norm statistics frozen). No ``checkpoint``: the file holds the weights.

    ``inputs`` / ``outputs``: the protocol signature (names, datatypes, shapes with -1 for the batch).
    """

    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    factory: str | None = None
    checkpoint: str | None = None
    export: str | None = None

    def __post_init__(self):
        if (self.factory is None) == (self.export is None):
            raise ValueError("factory: give exactly one of model.factory (with model.checkpoint) or model.export "
                             f"(a torch.export .pt2 file); got {'both' if self.factory else 'neither'}")
        if self.export is not None and self.checkpoint is not None:
            raise ValueError("checkpoint: only with model.factory; the model.export file holds the trained weights")

    @property
    def source(self) -> str:
        """The recipe field that names the model, for messages: ``model.factory`` or ``model.export``."""
        return "model.factory" if self.factory is not None else "model.export"


@dataclass(frozen=True)
class DataSpec:
    """The data: exactly one of ``dataset`` (built in) or ``loader`` (yours); ``mnist`` when neither.

    ``dataset``: ``mnist`` (classification) or ``sentence-pairs`` (sentence embeddings; then
    ``tokenizer`` names a FILE.py:callable or module:callable returning a Hugging Face style
    tokenizer, ``max_length`` caps the tokens per sentence and ``transfer_sentences`` how many
    unlabelled sentences calibration and distillation use, all when omitted, drawn from
    ``transfer_sets`` in order: ``pydoc`` (default) and/or ``everyday``,
    :func:`pyserve.datasets.transfer_sentences`).

    ``loader``: ``FILE.py:callable`` (relative to the recipe) or ``module:callable`` for a
    classification task. It is called with no arguments and returns ``(train, test)``; each is a
    map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)``, a ``DataLoader`` (or any
    iterable) of ``(x, y)`` batches, or a pair of tensors / arrays ``(x [N, ...], y [N])``. ``x``:
    the model's single input, one example per row; ``y``: int class indices in ``[0, classes)``.
    Both splits are read once into memory (a DataLoader's random transforms are applied once).
    Batch sizes: ``train.batch_size`` and ``train.eval_batch_size`` always decide; a DataLoader's own
    batch size only affects how it is read. Training shuffles by ``seed``, as for ``mnist``.
    """

    dataset: str | None = None
    loader: str | None = None
    tokenizer: str | None = None
    max_length: int = 128
    transfer_sentences: int | None = None
    transfer_sets: tuple[str, ...] = ("pydoc",)

    def __post_init__(self):
        if self.dataset is not None and self.loader is not None:
            raise ValueError("loader: give either data.dataset (built in) or data.loader (your loader factory), not both")
        if self.dataset is None and self.loader is None:
            object.__setattr__(self, "dataset", "mnist")
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {self.max_length}")
        if self.transfer_sentences is not None and self.transfer_sentences < 1:
            raise ValueError(f"transfer_sentences: must be >= 1, got {self.transfer_sentences}")
        from pyserve.datasets.sentences import TRANSFER_SETS

        sets = tuple(self.transfer_sets)
        if not sets or len(set(sets)) != len(sets) or any(x not in TRANSFER_SETS for x in sets):
            raise ValueError(f"transfer_sets: expected distinct names from {list(TRANSFER_SETS)}, got {list(sets)}")

    @property
    def where(self) -> str:
        """The recipe field that names the data, for messages: ``data.dataset`` or ``data.loader``."""
        return "data.loader" if self.loader is not None else "data.dataset"

    @property
    def label(self) -> str:
        """The data's name for reports: the dataset name or the loader's import path."""
        return self.loader if self.loader is not None else self.dataset


@dataclass(frozen=True)
class TrainSpec:
    """Training: ``batch_size`` (examples per step), ``lr`` (Adam's learning rate, also the stages'
    default), ``epochs`` (training from scratch when the checkpoint is missing), ``eval_batch_size``
    (examples per evaluation batch)."""

    batch_size: int = 128
    lr: float = 1e-3
    epochs: int = 10
    eval_batch_size: int = 1000

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ReportSpec:
    """What ``pyserve compress --report`` adds beyond the standard report.

    ``sensitivity``: sparsities at which each layer is pruned alone, without retraining, before the
    stages run (Han et al. 2015, figure 5); empty = no sensitivity analysis. ``sensitivity_max_drop``:
    accuracy drop (fraction) allowed when suggesting per-layer sparsity targets from the curves."""

    sensitivity: tuple[float, ...] = ()
    sensitivity_max_drop: float = 0.01

    def __post_init__(self):
        for v in self.sensitivity:
            if not 0.0 <= v < 1.0:
                raise ValueError(f"sensitivity: each sparsity must be in [0, 1), got {v}")
        if self.sensitivity_max_drop < 0:
            raise ValueError(f"sensitivity_max_drop: must be >= 0, got {self.sensitivity_max_drop}")


METRICS = ("accuracy", "top1_error")


@dataclass(frozen=True)
class EvaluateSpec:
    """How the result is judged. ``metric``: ``accuracy`` (top-1 test accuracy, a fraction; higher is
    better) or ``top1_error`` (1 - accuracy; lower is better), for classifiers. Targets, checked on
    the artifact as loaded back (what a server runs): ``max_accuracy_drop``, the largest allowed
    loss of top-1 accuracy against the fp32 baseline, a fraction (0.001 = 0.1 point; the same rise
    of top-1 error); ``min_compression``, the smallest allowed ratio fp32 parameter bytes / artifact
    bytes (the whole file). None = no target. A missed target still writes the artifact and the
    report; ``pyserve compress`` then exits with status 3.
    """

    metric: str = "accuracy"
    max_accuracy_drop: float | None = None
    min_compression: float | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric: must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"max_accuracy_drop: must be a fraction in [0, 1], got {self.max_accuracy_drop}")
        if self.min_compression is not None and not self.min_compression > 0:
            raise ValueError(f"min_compression: must be > 0, got {self.min_compression}")

    @property
    def has_targets(self) -> bool:
        return self.max_accuracy_drop is not None or self.min_compression is not None


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    stages: tuple                        # method configs (frozen dataclasses from the registry)
    format_version: int = RECIPE_FORMAT_VERSION
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 0
    report: ReportSpec = field(default_factory=ReportSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    base_dir: str = "."                  # directory relative paths resolve against (not a YAML field)

    def resolve(self, relative: str) -> Path:
        return (Path(self.base_dir) / relative).resolve()


def _convert(value, annotation, where: str):
    """Convert a YAML value to ``annotation``; raise RecipeError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else typing.Any
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is typing.Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string, so numeric strings are accepted too.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported field type {annotation!r}")


def from_dict(cls, data, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown fields and missing required ones."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields or k == "base_dir"]
    if unknown:
        raise RecipeError(f"{_join(where, unknown[0])}: unknown field; expected one of "
                          f"{', '.join(k for k in fields if k != 'base_dir')}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{_join(where, name)}: required field is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ validation names the field
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _stages(value, where: str) -> tuple:
    from pyserve.compress import methods

    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: expected a non-empty list of stages")
    out = []
    for i, stage in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(stage, dict) or "method" not in stage:
            raise RecipeError(f"{w}.method: required field is missing")
        body = dict(stage)
        name = body.pop("method")
        try:
            cfg_cls = methods.config_class(name)
        except ValueError as exc:
            raise RecipeError(f"{w}.method: {exc}") from None
        out.append(from_dict(cfg_cls, body, w))
    return tuple(out)


def load_recipe(path: str | Path) -> Recipe:
    """Load and check a recipe file.

    Raises
    ------
    RecipeError
        Missing file, malformed YAML, unknown or ill-typed field, unknown method, unsupported
        format_version; the message starts with the file name and the field's line and names the
        field (``recipe.yaml: line 19: stages[1].bits: must be in 2..8, got 12``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    try:
        return recipe_from_mapping(data, base_dir=str(path.resolve().parent))
    except RecipeError as exc:
        line = _field_line(text, str(exc))
        raise RecipeError(f"{path}: {'' if line is None else f'line {line}: '}{exc}") from None


def _field_line(text: str, message: str) -> int | None:
    """The 1-based line of the field a loader message starts with (``stages[1].bits: ...``,
    ``model: factory: ...``): the deepest node of that path found in the YAML, or None."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    head, _, rest = message.partition(": ")
    tokens = [t for part in head.split(".") for t in _split_index(part)]
    second = rest.partition(": ")[0]
    if second.isidentifier():  # "model: factory: ..." names model.factory
        tokens.append(second)
    line = None
    for tok in tokens:
        if isinstance(tok, int) and isinstance(node, yaml.SequenceNode) and tok < len(node.value):
            node = node.value[tok]
            line = node.start_mark.line + 1
        elif isinstance(tok, str) and isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == tok), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        else:
            break
    return line


def _split_index(part: str) -> list:
    """``stages[1]`` -> ["stages", 1]; ``shape[0][1]`` -> ["shape", 0, 1]."""
    name, _, idx = part.partition("[")
    out = [name] if name else []
    for chunk in idx.split("[") if idx else []:
        chunk = chunk.rstrip("]")
        if chunk.isdigit():
            out.append(int(chunk))
    return out


def recipe_from_mapping(data, *, base_dir: str = ".") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a mapping at top level")
    version = data.get("format_version", RECIPE_FORMAT_VERSION)
    if version != RECIPE_FORMAT_VERSION:
        raise RecipeError(f"format_version: unsupported recipe format version {version!r}; expected {RECIPE_FORMAT_VERSION}")
    body = dict(data)
    stages = _stages(body.pop("stages", None), "stages")
    recipe = from_dict(_RecipeBody, body, "")
    return Recipe(name=recipe.name, model=recipe.model, stages=stages, format_version=version,
                  data=recipe.data, train=recipe.train, seed=recipe.seed, report=recipe.report,
                  evaluate=recipe.evaluate, base_dir=base_dir)


@dataclass(frozen=True)
class _RecipeBody:
    """The recipe's fields other than ``stages`` (which come from the method registry)."""

    name: str
    model: ModelSpec
    format_version: int = RECIPE_FORMAT_VERSION
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 0
    report: ReportSpec = field(default_factory=ReportSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
