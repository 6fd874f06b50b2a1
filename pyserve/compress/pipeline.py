"""Run a recipe end to end: build or restore the model, run the stages, write the artifact, report."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyserve import artifact
from pyserve._fileio import atomic_output
from pyserve.compress._train import Task, _eval_mode, fit, progress, set_seed, weight_key
from pyserve.compress.methods import CompressionState, handler_for
from pyserve.compress.prune import SUGGESTED
from pyserve.compress.recipe import Recipe, RecipeError, load_recipe

__all__ = ["CompressionResult", "compress", "build_model", "preflight", "prepare_model"]

# Deep Compression, Table 1 (Han, Mao, Dally, ICLR 2016, arXiv 1510.00149): reference and compressed
# top-1 error, parameter bytes before and after, compression rate. Table 2: LeNet-300-100 keeps 8% /
# 9% / 26% of its weights at 6 bits; Table 3: LeNet-5 keeps 66% / 12% / 8% / 19% at 8/8/5/5 bits.
PAPER = {
    "lenet300": {"model": "LeNet-300-100", "top1_error_ref": 0.0164, "top1_error_compressed": 0.0158,
                 "fp32_bytes": 1070e3, "compressed_bytes": 27e3, "compression": 40.0},
    "lenet5": {"model": "LeNet-5", "top1_error_ref": 0.0080, "top1_error_compressed": 0.0074,
               "fp32_bytes": 1720e3, "compressed_bytes": 44e3, "compression": 39.0},
}
PAPER_LENET300 = PAPER["lenet300"]


@dataclass(frozen=True)
class CompressionResult:
    path: Path
    manifest: artifact.Manifest
    fp32_bytes: int
    artifact_bytes: int
    accuracy_before: float
    accuracy_after: float
    accuracy_loaded: float
    layers: dict
    table: str
    model: object = None       # the compressed in-memory torch.nn.Module (pruned, weight-shared)
    stages: tuple = ()         # per-stage reports: {"method", "layers": {...}, "accuracy", "bytes"}
    # For the report (pyserve.compress.report): float32 weight snapshots of every Linear/Conv
    # weight, by point ("fp32", then each stage's method) -> tensor name -> array; the final
    # codebooks (tensor name -> float32 [K], entry 0 == 0); and the stored bytes of each tensor's
    # parts ("gaps", "values", "codes", "codebook", or "raw") in the artifact.
    weights: dict = field(default_factory=dict)
    codebooks: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    # recipe ``report.sensitivity``: {"sparsities": [...], "curves": {layer: {sparsity: accuracy}},
    # "suggested": {layer: sparsity}, "max_drop": fraction} measured on the fp32 model; else None.
    sensitivity: dict | None = None
    # task-specific quality of the loaded artifact (sentence embeddings: Spearman vs the scores and
    # vs the fp32 model, embedding cosine to fp32); empty for classification
    details: dict = field(default_factory=dict)
    # recipe ``evaluate``: {"metric", "baseline", "compressed" (the metric of the fp32 model and of
    # the artifact as loaded), "accuracy_drop" (fraction), "compression", "max_accuracy_drop",
    # "min_compression" (None = no target), "met" (None when no target is set), "missed" (one
    # message per missed target)}; empty for tasks other than classification.
    evaluation: dict = field(default_factory=dict)

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.artifact_bytes

    @property
    def target_met(self) -> bool:
        """False when a target of the recipe's ``evaluate`` section was missed (True when none is set)."""
        return self.evaluation.get("met") is not False


def _import_factory(recipe: Recipe, target: str | None = None, what: str = "model.factory"):
    target = recipe.model.factory if target is None else target
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise RecipeError(f"{what}: expected FILE.py:callable or module:callable, got {target!r}")
    if module_part.endswith(".py"):
        path = recipe.resolve(module_part)
        if not path.is_file():
            raise RecipeError(f"{what}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"_pyserve_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: syntax errors, failing imports, ...
            raise RecipeError(f"{what}: cannot load {path}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise RecipeError(f"{what}: cannot import {module_part!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RecipeError(f"{what}: {module_part} has no attribute {attr!r}") from None


def build_task(recipe: Recipe, *, verbose: bool = True):
    """The recipe's task: a classification :class:`Task` (``mnist``) or a
    :class:`~pyserve.compress._sentence.SentenceTask` (``sentence-pairs``)."""
    d = recipe.data
    if d.dataset == "sentence-pairs":
        from pyserve.compress._sentence import SentenceTask

        if not d.tokenizer:
            raise RecipeError("data.tokenizer: the sentence-pairs dataset needs a tokenizer (FILE.py:callable)")
        factory = _import_factory(recipe, d.tokenizer, "data.tokenizer")
        try:
            tokenizer = factory()
        except Exception as exc:  # the user's code
            raise RecipeError(f"data.tokenizer: {d.tokenizer} raised {type(exc).__name__}: {exc}") from None
        return SentenceTask(tokenizer, max_length=d.max_length, batch_size=recipe.train.batch_size,
                            lr=recipe.train.lr, seed=recipe.seed, verbose=verbose, transfer=d.transfer_sentences,
                            transfer_sets=d.transfer_sets)
    kwargs = dict(batch_size=recipe.train.batch_size, eval_batch_size=recipe.train.eval_batch_size,
                  lr=recipe.train.lr, seed=recipe.seed, verbose=verbose)
    if d.loader is not None:
        return Task(*_loader_splits(recipe), **kwargs)
    from pyserve import datasets

    if d.dataset not in datasets.DATASETS:  # the registry holds the classification sets; the recipe takes one more
        raise RecipeError(f"data.dataset: unknown dataset {d.dataset!r}; expected one of "
                          f"{', '.join([*datasets.DATASETS, 'sentence-pairs'])} (or data.loader for your own data)")
    try:
        return Task.from_dataset(d.dataset, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise RecipeError(f"data.dataset: {exc}") from None


def _loader_splits(recipe: Recipe) -> tuple[torch.Tensor, ...]:
    """``train_x, train_y, test_x, test_y`` from the recipe's ``data.loader`` (contract:
    :class:`~pyserve.compress.recipe.DataSpec`)."""
    from pyserve.compress._data import split_tensors

    target = recipe.data.loader
    factory = _import_factory(recipe, target, "data.loader")
    try:
        splits = factory()
    except Exception as exc:  # the user's code
        raise RecipeError(f"data.loader: {target} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(splits, (tuple, list)) or len(splits) != 2:
        raise RecipeError(f"data.loader: {target} must return (train, test), got {type(splits).__name__}"
                          + (f" of length {len(splits)}" if isinstance(splits, (tuple, list)) else ""))
    try:
        train_x, train_y = split_tensors(splits[0], "train split")
        test_x, test_y = split_tensors(splits[1], "test split")
    except ValueError as exc:
        raise RecipeError(f"data.loader: {target}: {exc}") from None
    if train_x.shape[1:] != test_x.shape[1:] or train_x.dtype != test_x.dtype:
        raise RecipeError(f"data.loader: {target}: train examples are {train_x.dtype} {list(train_x.shape[1:])}, "
                          f"test examples {test_x.dtype} {list(test_x.shape[1:])}")
    return train_x, train_y, test_x, test_y


def build_model(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model: a new (untrained) instance from ``model.factory``, or the trained module
    of the ``model.export`` file (``torch.export.load(...).module()``, a GraphModule)."""
    if recipe.model.export is not None:
        return _load_export(recipe)
    factory = _import_factory(recipe)
    try:
        model = factory()
    except Exception as exc:  # the user's code
        raise RecipeError(f"model.factory: {recipe.model.factory} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"model.factory: {recipe.model.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_export(recipe: Recipe) -> torch.nn.Module:
    path = recipe.resolve(recipe.model.export)
    if not path.is_file():
        raise RecipeError(f"model.export: no such file {path}")
    try:
        ep = torch.export.load(path)
    except Exception as exc:  # torch raises several types for a file that is not an export
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecipeError(f"model.export: {path} is not a torch.export file ({type(exc).__name__}: {first[:200]})") from None
    module = ep.module()
    # The input shapes the program was captured with (dim 0 must be symbolic: the batch), for preflight.
    shapes = []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shapes.append((node.name, [d if isinstance(d, int) else -1 for d in val.shape]))
    module._pyserve_export_inputs = shapes
    return module


def _export_inputs(model) -> list | None:
    """[(name, shape with -1 for symbolic dims)] of a model loaded from ``model.export``, else None."""
    return getattr(model, "_pyserve_export_inputs", None)


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)  # above any progress bar


def prepare_model(recipe: Recipe, task: Task, *, verbose: bool = True,
                  model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The trained model: the ``model.export`` module as loaded; or restored from
    ``model.checkpoint`` when it exists, else trained for ``train.epochs`` epochs and saved there
    (atomically) for the next run.

    ``model``: an untrained instance from :func:`build_model` (built here when None)."""
    set_seed(recipe.seed)
    if model is None:
        model = build_model(recipe)
    if recipe.model.export is not None:
        return model  # trained already; torch.export graphs run as captured (no eval() switch)
    ckpt = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    if ckpt is not None and ckpt.exists() and not ckpt.is_file():
        raise RecipeError(f"model.checkpoint: {ckpt} is a directory (or not a regular file), not a state_dict file")
    if ckpt is not None and ckpt.is_file():
        _log(f"pyserve compress: reusing checkpoint {ckpt}", verbose)
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # torch raises several types for a bad file
            # torch's own message suggests weights_only=False, which pyserve never does: keep its
            # unpickler's reason when it gives one ("WeightsUnpickler error: <reason>"), else its first
            # line, and nothing of that advice.
            text = str(exc).strip()
            reason = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
            reason = (reason.splitlines() or [""])[0].strip() if reason else (text.splitlines() or [""])[0]
            if "weights_only" in reason:
                reason = "not a file torch.load can read as tensors only"
            raise RecipeError(f"model.checkpoint: {ckpt} is not a state_dict of this model "
                              f"({type(exc).__name__}: {reason[:200]})") from None
        return model.eval()
    if ckpt is not None:  # say so: a mistyped path would otherwise retrain without a word
        try:  # and fail now, not after the training, if it cannot be saved there
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecipeError(f"model.checkpoint: cannot create {ckpt.parent} to save the trained model in: "
                              f"{exc.strerror or exc}") from None
        if not os.access(ckpt.parent, os.W_OK):
            raise RecipeError(f"model.checkpoint: {ckpt.parent} is not writable (the trained model is saved there)")
        _log(f"pyserve compress: no checkpoint at {ckpt}: training {recipe.name} from scratch for "
             f"{recipe.train.epochs} epochs, then saving it there", verbose)
    else:
        _log(f"pyserve compress: training {recipe.name} for {recipe.train.epochs} epochs", verbose)
    fit(model, task, recipe.train.epochs, desc="train")
    if ckpt is not None:
        try:
            with atomic_output(ckpt) as tmp:
                torch.save(model.state_dict(), tmp)
        except OSError as exc:  # not the artifact's fault: name the recipe field
            raise RecipeError(f"model.checkpoint: cannot save {ckpt}: {exc.strerror or exc}") from None
        _log(f"pyserve compress: saved checkpoint {ckpt}", verbose)
    return model.eval()


def preflight(recipe: Recipe, model: torch.nn.Module, task: Task) -> None:
    """Check, before any training, that the recipe can run on this model and data.

    Raises
    ------
    RecipeError
        The model has no Linear/Conv layer to compress; a stage names a layer the model does not
        have or fails its config's own ``check(model, task)`` (int8: no Linear selected, empty
        calibration set; distill: student deeper than the teacher; lowrank: rank above
        min(in, out)); the recipe's input signature or the model does not fit the data's shape
        (or, for ``model.export``, the exported program's input shapes); an export whose batch
        dimension is not dynamic; a prune stage with ``sparsity: suggested`` and no sensitivity
        analysis (``report.sensitivity``); an ``evaluate`` section on a task other than
        classification.
    """
    from pyserve.compress._train import weight_layers

    layers = weight_layers(model)
    if not layers:
        raise RecipeError(f"{recipe.model.source}: {recipe.model.factory or recipe.model.export} has no Linear or Conv "
                          "layer to compress")
    for i, cfg in enumerate(recipe.stages):
        for field in ("sparsity", "bits", "index_bits", "layers"):
            value = getattr(cfg, field, None)
            names = value if isinstance(value, (dict, tuple)) else ()
            missing = [n for n in names if n not in layers]
            if missing:
                raise RecipeError(f"stages[{i}].{field}: {missing[0]!r} is not a Linear/Conv layer of the model; "
                                  f"layers: {', '.join(layers)}")
    if not isinstance(task, Task) and recipe.evaluate != type(recipe.evaluate)():
        raise RecipeError(f"evaluate: metrics and targets apply to classifiers (data.dataset mnist or data.loader), "
                          f"not to {recipe.data.label}")
    for i, cfg in enumerate(recipe.stages):
        if getattr(cfg, "sparsity", None) == SUGGESTED and not recipe.report.sensitivity:
            raise RecipeError(f"stages[{i}].sparsity: 'suggested' needs the sensitivity analysis: set "
                              "report.sensitivity (sparsities to try, e.g. [0.5, 0.7, 0.9]) and "
                              "report.sensitivity_max_drop")
    for i, cfg in enumerate(recipe.stages):
        check = getattr(cfg, "check", None)  # a method's own checks (int8, distill, lowrank)
        if check is not None:
            try:
                check(model, task)
            except ValueError as exc:
                raise RecipeError(f"stages[{i}] ({cfg.method}): {exc}") from None
    example = task.example_inputs()
    data = recipe.data.where
    exported = _export_inputs(model)
    if exported is not None:
        if len(exported) != len(example):
            raise RecipeError(f"model.export: the program takes {len(exported)} inputs, the data gives {len(example)}")
        for (name, shape), t in zip(exported, example):
            if not shape or shape[0] != -1:
                raise RecipeError(f"model.export: input {name} was exported with a fixed batch size "
                                  f"({shape[0] if shape else 'scalar'}); export with a dynamic dim 0, e.g. "
                                  "dynamic_shapes=({0: torch.export.Dim('batch')},)")
            if len(shape) != t.dim() or any(d != -1 and d != n for d, n in zip(shape[1:], t.shape[1:])):
                raise RecipeError(f"{data}: the data's inputs have shape [-1, {', '.join(map(str, t.shape[1:]))}], "
                                  f"the exported program (model.export) takes {name} {shape}")
    if len(recipe.model.inputs) != len(example):
        raise RecipeError(f"model.inputs: {len(recipe.model.inputs)} inputs declared, the data gives {len(example)}")
    for sig, t in zip(recipe.model.inputs, example):
        if len(sig.shape) != t.dim() or any(d != -1 and d != n for d, n in zip(sig.shape[1:], t.shape[1:])):
            raise RecipeError(f"model.inputs: {sig.name} has shape {list(sig.shape)}, the data gives "
                              f"[-1, {', '.join(map(str, t.shape[1:]))}]")
    for i, (sig, t) in enumerate(zip(recipe.model.inputs, example)):
        given = _datatype(t)
        if given != sig.datatype:
            raise RecipeError(f"model.inputs[{i}].datatype: {sig.name} is declared {sig.datatype}, the data gives {given}")
    _eval_mode(model)
    try:
        with torch.no_grad():
            out = model(*example)
    except Exception as exc:  # a shape mismatch surfaces as RuntimeError, or anything the model raises
        shapes = ", ".join(str([-1, *t.shape[1:]]) for t in example)
        raise RecipeError(f"{data}: the model cannot take the data's inputs {shapes}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(outs) != len(recipe.model.outputs):
        raise RecipeError(f"model.outputs: {len(recipe.model.outputs)} outputs declared, the model returns {len(outs)}")
    for i, (sig, t) in enumerate(zip(recipe.model.outputs, outs)):
        given = _datatype(t) if isinstance(t, torch.Tensor) else None
        if given is not None and given != sig.datatype:
            raise RecipeError(f"model.outputs[{i}].datatype: {sig.name} is declared {sig.datatype}, "
                              f"the model returns {given}")
    problem = task.check_outputs(outs, len(recipe.model.outputs), recipe.data.label)
    if problem:
        raise RecipeError(f"model.outputs: {problem}")


def _datatype(t: torch.Tensor) -> str:
    from pyserve import dtypes

    try:
        return dtypes.from_torch(t.dtype).name
    except ValueError:
        return str(t.dtype)


def _encodings(state: CompressionState) -> dict[str, artifact.EncodedTensor]:
    params = dict(state.model.named_parameters())
    out = {key: artifact.encode_int8(q, s, input_scale=in_scale) for key, (q, s, in_scale) in state.int8.items()}
    for key in sorted(set(state.masks) | set(state.codebooks)):
        weight = params[key].detach().cpu().numpy()
        out[key] = artifact.encode_sparse(weight, index_bits=state.index_bits.get(key, 5),
                                          codebook=state.codebooks.get(key), entropy=state.entropy)
    return out


def _snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """float32 copies of every Linear/Conv weight, by tensor name."""
    from pyserve.compress._train import weight_layers

    return {weight_key(name): m.weight.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, m in weight_layers(model).items()}


def _stage_bytes(state: CompressionState, method: str, methods_so_far: set[str]) -> int:
    """Parameter bytes if the artifact were written after the stage ``method`` (the final masks and
    codebooks, with only the stages run so far applied to the stored form): sparse tensors with raw
    fp32 values after pruning, codebook indices after quantization, Huffman coded after ``huffman``.
    Tensors with no sparse form count as raw fp32."""
    params = dict(state.model.named_parameters())
    total = 0
    for name, t in state.model.state_dict().items():
        if name in state.int8:
            total += t.numel() + 4 * t.shape[0]
        elif name in state.masks or name in state.codebooks:
            if "prune" not in methods_so_far and "quantize" not in methods_so_far:
                total += t.numel() * t.element_size()
                continue
            weight = params[name].detach().cpu().numpy()
            codebook = state.codebooks.get(name) if "quantize" in methods_so_far else None
            entropy = state.entropy if "huffman" in methods_so_far else "none"
            total += artifact.encode_sparse(weight, index_bits=state.index_bits.get(name, 5), codebook=codebook,
                                            entropy=entropy).size_bytes
        else:
            total += t.numel() * t.element_size()
    return total


def _table(recipe: Recipe, layers: dict, fp32_bytes: int, artifact_bytes: int, acc: dict,
           metric: str = "test accuracy") -> str:
    rows = [f"{'layer':<12}{'shape':>14}{'kept':>8}{'bits':>6}{'fp32 B':>10}{'stored B':>10}{'bits/kept w':>13}",
            "-" * 73]
    for name, info in layers.items():
        rows.append(f"{name:<12}{'x'.join(map(str, info['shape'])):>14}{info['kept']:>8.1%}"
                    f"{info['bits'] if info['bits'] else '-':>6}{info['fp32_bytes']:>10}{info['stored_bytes']:>10}"
                    f"{info['bits_per_kept_weight']:>13.2f}")
    rows += ["-" * 73,
             f"model {recipe.name}: fp32 {fp32_bytes} B -> artifact {artifact_bytes} B "
             f"= {fp32_bytes / artifact_bytes:.1f}x smaller",
             f"{metric}: fp32 {acc['before']:.4f}, compressed {acc['after']:.4f}, "
             f"loaded from artifact {acc['loaded']:.4f}"]
    if recipe.data.dataset == "mnist" and recipe.name in PAPER:
        p = PAPER[recipe.name]
        rows.append(f"paper (Deep Compression, Table 1, {p['model']}): top-1 error {p['top1_error_ref']:.2%} -> "
                    f"{p['top1_error_compressed']:.2%}, {p['compression']:.0f}x; "
                    f"pyserve: {1 - acc['before']:.2%} -> {1 - acc['loaded']:.2%}, {fp32_bytes / artifact_bytes:.1f}x")
    return "\n".join(rows)


def evaluation(spec, accuracy_before: float, accuracy_loaded: float, compression: float) -> dict:
    """The recipe's ``evaluate`` section applied to a run (see :attr:`CompressionResult.evaluation`).

    ``accuracy_before`` / ``accuracy_loaded``: top-1 accuracy (fraction) of the fp32 model and of the
    artifact as loaded back; ``compression``: fp32 parameter bytes / artifact bytes."""
    metric = spec.metric

    def value(acc: float) -> float:
        return acc if metric == "accuracy" else 1.0 - acc

    drop = accuracy_before - accuracy_loaded
    missed = []
    if spec.max_accuracy_drop is not None and drop > spec.max_accuracy_drop + 1e-12:
        missed.append(f"accuracy drop {drop:.4f} > max_accuracy_drop {spec.max_accuracy_drop:g} "
                      f"({metric}: fp32 {value(accuracy_before):.4f}, artifact {value(accuracy_loaded):.4f})")
    if spec.min_compression is not None and compression < spec.min_compression:
        missed.append(f"compression {compression:.1f}x < min_compression {spec.min_compression:g}x")
    return {"metric": metric, "baseline": value(accuracy_before), "compressed": value(accuracy_loaded),
            "accuracy_drop": drop, "compression": compression, "max_accuracy_drop": spec.max_accuracy_drop,
            "min_compression": spec.min_compression, "met": (not missed) if spec.has_targets else None,
            "missed": missed}


def _evaluation_line(ev: dict) -> str:
    head = f"evaluate {ev['metric']}: fp32 {ev['baseline']:.4f}, artifact {ev['compressed']:.4f}"
    if ev["met"] is None:
        return head + " (no targets)"
    if not ev["met"]:
        return head + "; target MISSED: " + "; ".join(ev["missed"])
    met = []
    if ev["max_accuracy_drop"] is not None:
        met.append(f"accuracy drop {ev['accuracy_drop']:.4f} <= {ev['max_accuracy_drop']:g}")
    if ev["min_compression"] is not None:
        met.append(f"{ev['compression']:.1f}x >= {ev['min_compression']:g}x")
    return head + "; target met: " + ", ".join(met)


def compress(recipe: Recipe | str | os.PathLike, output: str | os.PathLike, *, verbose: bool = True) -> CompressionResult:
    """Run ``recipe`` and write the artifact to ``output``.

    The run is reproducible: the same recipe, checkpoint and thread count give the same artifact,
    byte for byte (torch's deterministic algorithms are on for the run; without them the
    scatter-add behind centroid fine-tuning sums gradients in thread-dependent order).

    A missed target of the recipe's ``evaluate`` section does not raise: the artifact is written
    and ``result.target_met`` is False (``result.evaluation["missed"]`` says why).

    Raises
    ------
    RecipeError
        The recipe (or something it names: factory, export, checkpoint, dataset, loader, layer) is
        unusable.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _compress(recipe, output, verbose=verbose)
    finally:
        torch.use_deterministic_algorithms(previous)


def _apply_suggestions(cfg, sens: dict | None, verbose: bool):
    """``cfg`` with ``sparsity: suggested`` replaced by the sensitivity analysis' per-layer targets
    (only for ``cfg.layers`` when given); other configs unchanged."""
    if getattr(cfg, "sparsity", None) != SUGGESTED:
        return cfg
    if sens is None:  # preflight refuses this; kept for direct callers
        raise RecipeError("stages: sparsity 'suggested' needs report.sensitivity")
    names = cfg.layers or tuple(sens["suggested"])
    targets = {name: float(sens["suggested"][name]) for name in names}
    _log("pyserve compress: suggested sparsities " + ", ".join(f"{k} {v:g}" for k, v in targets.items()), verbose)
    return dataclasses.replace(cfg, sparsity=targets)


def _compress(recipe, output, *, verbose: bool) -> CompressionResult:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    output = Path(output)
    task = build_task(recipe, verbose=verbose)
    set_seed(recipe.seed)
    model = build_model(recipe)
    preflight(recipe, model, task)
    model = prepare_model(recipe, task, verbose=verbose, model=model)
    example = task.example_inputs()
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    acc = {"before": task.evaluate(model)}
    task.set_reference(model)
    _log(f"pyserve compress: fp32 {task.metric} {acc['before']:.4f}", verbose)
    sens = None
    if recipe.report.sensitivity:
        from pyserve.compress.sensitivity import sensitivity, suggest_sparsity

        _log("pyserve compress: sensitivity analysis (each layer pruned alone, no retraining)", verbose)
        curves = sensitivity(model, task, sparsities=recipe.report.sensitivity)
        sens = {"sparsities": list(recipe.report.sensitivity), "curves": curves,
                "max_drop": recipe.report.sensitivity_max_drop,
                "suggested": suggest_sparsity(curves, acc["before"], recipe.report.sensitivity_max_drop)}
    stages = tuple(_apply_suggestions(cfg, sens, verbose) for cfg in recipe.stages)

    set_seed(recipe.seed)
    state = CompressionState(model)
    stage_reports = []
    weights = {"fp32": _snapshot(model)}
    stage_bar = progress(stages, desc="stages", verbose=verbose, position=0)
    for cfg in stage_bar:
        stage_bar.set_description(f"stage {cfg.method}")
        _log(f"pyserve compress: stage {cfg.method}", verbose)
        try:
            layer_report = handler_for(cfg)(state, cfg, task)
        except (KeyError, ValueError) as exc:
            raise RecipeError(f"stages ({cfg.method}): {exc}") from None
        model = state.model  # distill / lowrank build a new model
        stage_acc = task.evaluate(model)
        stage_reports.append({"method": cfg.method, "layers": layer_report, "accuracy": stage_acc})
        weights[cfg.method] = _snapshot(model)
        _log(f"pyserve compress: after {cfg.method}: {task.metric} {stage_acc:.4f}", verbose)
    stage_bar.close()
    # The model is unchanged since the last stage was measured.
    acc["after"] = stage_reports[-1]["accuracy"] if stage_reports else task.evaluate(model)
    encodings = _encodings(state)
    # Sizes after each stage, measured on the final masks and codebooks (the stored size of a
    # sparse tensor depends on its mask, index bits and codebook, not on the values).
    done: set[str] = set()
    for rep in stage_reports:
        done.add(rep["method"])
        rep["bytes"] = _stage_bytes(state, rep["method"], done)
    parts, layers = {}, {}
    for name, t in model.state_dict().items():
        enc = encodings.get(name)
        parts[name] = ({k: len(b) for k, b in enc.blobs.items()} if enc
                       else {"raw": t.numel() * t.element_size()})
        stored = enc.size_bytes if enc else t.numel() * t.element_size()
        kept = int((t != 0).sum())
        cb = state.codebooks.get(name)
        bits = int(np.log2(cb.size)) if cb is not None else 8 if name in state.int8 else 0
        layers[name] = {"shape": list(t.shape), "kept": kept / max(t.numel(), 1), "fp32_bytes": t.numel() * 4,
                        "stored_bytes": stored, "bits": bits,
                        "encoding": enc.meta["encoding"] if enc else "raw",
                        "bits_per_kept_weight": 8.0 * stored / max(kept, 1)}
    # The manifest keeps only the headline figures: per-tensor shapes, counts and sizes are in its
    # "tensors" table already, and the full per-stage report is CompressionResult's (report.json).
    # A few hundred bytes of JSON matter when the whole artifact is ~25 KB.
    stats = {"fp32_bytes": fp32_bytes, "accuracy_fp32": acc["before"], "accuracy_compressed": acc["after"],
             "dataset": recipe.data.label}
    if task.metric != Task.metric:
        stats["metric"] = task.metric
    input_names = [s.name for s in recipe.model.inputs]
    # a sentence model's artifact carries its tokenizer (BYTES input of sentences; docs/artifact.md)
    text = task.text_input(input_names) if hasattr(task, "text_input") else None
    manifest = artifact.save(output, model, example, model_name=recipe.name,
                             input_names=input_names,
                             output_names=[s.name for s in recipe.model.outputs],
                             encodings=encodings, stats=stats, dynamic_axes=task.dynamic_axes, text=text)
    # quality as served: the artifact run with the native kernels the pyserve backend uses
    from pyserve.artifact.kernels import native_module

    loaded, _ = native_module(artifact.load_artifact(output))
    acc["loaded"] = task.evaluate(loaded)
    details = task.details(loaded)
    table = _table(recipe, layers, fp32_bytes, manifest.size_bytes, acc, task.metric)
    if details:
        table += "\n" + ", ".join(f"{k} {v:.4f}" for k, v in details.items())
    ev = {}
    if isinstance(task, Task):  # classification: the evaluate section's metrics and targets
        ev = evaluation(recipe.evaluate, acc["before"], acc["loaded"], fp32_bytes / manifest.size_bytes)
        table += "\n" + _evaluation_line(ev)
    return CompressionResult(output, manifest, fp32_bytes, manifest.size_bytes, acc["before"], acc["after"],
                             acc["loaded"], layers, table, model=model, stages=tuple(stage_reports),
                             weights=weights, codebooks=dict(state.codebooks), parts=parts, sensitivity=sens,
                             details=details, evaluation=ev)
