"""What ``pyserve export`` reads: a ``.pyserve`` artifact, a torch.export ``.pt2`` or a recipe's model.

:func:`identify` checks the SOURCE argument without loading anything (so a bad argument fails
before any work); :func:`load_source` loads it into a :class:`Source`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyserve.backends.base import ModelSignature, TensorSpec

__all__ = ["ExportError", "Source", "identify", "load_source", "example_inputs", "SOURCE_KINDS"]

#: file suffix -> source kind
SOURCE_KINDS = {".pyserve": "artifact", ".pt2": "pt2", ".yaml": "recipe", ".yml": "recipe"}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says why and, where it can, what to do."""


@dataclass
class Source:
    """A loaded model to export.

    module : torch.nn.Module taking one tensor per ``signature.inputs`` entry (in order), returning a
        tensor or a tuple in ``signature.outputs`` order.
    signature : protocol names, datatypes, shapes (-1 = batch / dynamic dimension).
    int8 : state-dict tensor name -> :class:`pyserve.artifact.Int8Parts` for int8-encoded weights
        (artifacts only; empty otherwise).
    """

    kind: str
    path: Path
    name: str
    module: object
    signature: ModelSignature
    int8: dict = field(default_factory=dict)
    exported_program: object = None


def identify(path: str | Path) -> str:
    """The source kind of ``path`` (``artifact``, ``pt2`` or ``recipe``); ExportError when the file is
    missing or of a kind pyserve cannot export."""
    path = Path(path)
    kind = SOURCE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ExportError(f"unsupported source {str(path)!r}: expected a pyserve artifact (.pyserve), a "
                          f"torch.export program (.pt2) or a recipe (.yaml/.yml)")
    if not path.is_file():
        raise ExportError(f"source {str(path)!r} does not exist or is not a file")
    return kind


def load_source(path: str | Path) -> Source:
    """Load SOURCE; ExportError for anything that cannot be read (the loader's message kept)."""
    path = Path(path)
    kind = identify(path)
    if kind == "artifact":
        from pyserve.artifact import ArtifactError, load_artifact

        try:
            art = load_artifact(path)
        except ArtifactError as exc:
            raise ExportError(str(exc)) from None

        def specs(items):
            return tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in items)

        sig = ModelSignature(inputs=specs(art.manifest.inputs), outputs=specs(art.manifest.outputs))
        return Source(kind, path, art.manifest.model_name, art.module, sig, dict(art.int8))
    if kind == "pt2":
        from pyserve.backends.torch_backend import load_torch_model

        try:
            module, sig = load_torch_model(path)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        return Source(kind, path, path.stem, module, sig)
    return _load_recipe(path)


def _load_recipe(path: Path) -> Source:
    import torch

    from pyserve.compress.pipeline import build_model
    from pyserve.compress.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        raise ExportError(str(exc)) from None
    if recipe.model.export is not None:
        raise ExportError(f"{path}: model.export names a torch.export file: export that file itself "
                          f"(pyserve export {recipe.resolve(recipe.model.export)} ...)")
    try:
        model = build_model(recipe)
    except RecipeError as exc:
        raise ExportError(str(exc)) from None
    if not recipe.model.checkpoint:
        raise ExportError(f"{path}: model.checkpoint is not set; export needs trained weights (train them with "
                          f"`pyserve compress {path}`, which saves the checkpoint)")
    ckpt = recipe.resolve(recipe.model.checkpoint)
    if not ckpt.is_file():
        raise ExportError(f"{path}: model.checkpoint {ckpt} does not exist; train the model first with "
                          f"`pyserve compress {path}`")
    try:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    except Exception as exc:  # torch raises several types for a bad file
        raise ExportError(f"{path}: model.checkpoint {ckpt} is not a state_dict of this model "
                          f"({type(exc).__name__})") from None

    def specs(items):
        return tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in items)

    sig = ModelSignature(inputs=specs(recipe.model.inputs), outputs=specs(recipe.model.outputs))
    return Source("recipe", path, recipe.name, model.eval(), sig)


def example_inputs(sig: ModelSignature, batch: int = 2, dynamic_dim: int = 8, seed: int = 0) -> tuple:
    """One torch tensor per input: -1 in dim 0 becomes ``batch``, other -1 dims ``dynamic_dim``.

    Floating inputs are standard normal; integer and bool inputs are ones (a valid token id and an
    attention mask that keeps every position).
    """
    import torch

    from pyserve import dtypes

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sig.inputs:
        shape = [batch if (i == 0 and d == -1) else (dynamic_dim if d == -1 else d) for i, d in enumerate(s.shape)]
        dt = dtypes.torch_dtype(s.datatype)
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dt))
        else:
            out.append(torch.ones(shape, dtype=dt))
    return tuple(out)
