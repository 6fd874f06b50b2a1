"""The model repository: ``DIR/<model>/<version>/model.pyserve`` plus optional ``DIR/<model>/config.yaml``.

Layout::

    DIR/
      mnist/
        config.yaml          # optional: name, backend (default pyserve), max_batch_size
        1/model.pyserve
        3/model.pyserve      # the highest numeric version is the one served

Every model is loaded at start-up. A model that cannot be loaded (bad ``config.yaml``, no version
directory, a missing, truncated or corrupt artifact) is *refused*: the reason is logged, its
ModelReady answers false, inference on it answers UNAVAILABLE with the reason, and every other
model keeps serving.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, fields
from pathlib import Path

from pyserve.backends import Backend, create_backend, get_backend
from pyserve.protocol.errors import NotFound, Unavailable

__all__ = ["ConfigError", "ModelConfig", "ModelState", "Model", "ModelRepository", "CONFIG_FILENAME"]

log = logging.getLogger("pyserve.server.repository")

CONFIG_FILENAME = "config.yaml"


class ConfigError(ValueError):
    """A model's config.yaml is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    """A model's ``config.yaml``.

    name : must equal the model's directory name.
    backend : registered backend name (``pyserve.backends.backend_names()``).
    max_batch_size : largest batch dimension (dim 0) a request may carry; 0 = no limit.
    """

    name: str
    backend: str = "pyserve"
    max_batch_size: int = 0

    @classmethod
    def load(cls, model_dir: Path) -> "ModelConfig":
        """Read ``model_dir/config.yaml`` (defaults when absent); raises ConfigError."""
        path = model_dir / CONFIG_FILENAME
        if not path.exists():
            return cls(name=model_dir.name)
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(f"{path}: unknown field {key!r}; known fields: {', '.join(known)}")
        name = raw.get("name", model_dir.name)
        if name != model_dir.name:
            raise ConfigError(f"{path}: field 'name' is {name!r}; it must equal the directory name {model_dir.name!r}")
        backend = raw.get("backend", "pyserve")
        if not isinstance(backend, str):
            raise ConfigError(f"{path}: field 'backend' must be a string, got {backend!r}")
        try:
            get_backend(backend)
        except ValueError as exc:
            raise ConfigError(f"{path}: field 'backend': {exc}") from None
        mbs = raw.get("max_batch_size", 0)
        if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 0:
            raise ConfigError(f"{path}: field 'max_batch_size' must be an integer >= 0, got {mbs!r}")
        return cls(name=name, backend=backend, max_batch_size=mbs)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class Model:
    """One model of the repository and the version it serves (or why it serves nothing)."""

    name: str
    directory: Path
    config: ModelConfig | None = None
    version: str | None = None
    backend: Backend | None = None
    state: ModelState = ModelState.LOADING
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self.backend is not None and self.backend.ready


class ModelRepository:
    """Discovers, loads and hands out the models under ``root``."""

    def __init__(self, root: str | Path, *, executor: Executor | None = None) -> None:
        self.root = Path(root)
        #: thread pool backends load and run in (None: the event loop's default executor)
        self.executor = executor
        self._models: dict[str, Model] = {}
        self.loaded = False

    @property
    def models(self) -> list[Model]:
        return [self._models[k] for k in sorted(self._models)]

    def discover(self) -> list[Model]:
        """Find the model directories (no loading). Raises ValueError if ``root`` is not a directory."""
        if not self.root.is_dir():
            raise ValueError(f"model repository {str(self.root)!r} is not a directory")
        self._models = {
            d.name: Model(name=d.name, directory=d)
            for d in sorted(self.root.iterdir())
            if d.is_dir() and not d.name.startswith(".")
        }
        return self.models

    async def load_all(self) -> None:
        """Discover and load every model; refused models are logged, never raised."""
        self.discover()
        await asyncio.gather(*(self._load(m) for m in self._models.values()))
        self.loaded = True

    async def _load(self, model: Model) -> None:
        try:
            model.config = ModelConfig.load(model.directory)
            model.version, path = self._pick_version(model)
            model.backend = create_backend(model.config.backend, path, executor=self.executor)
            await model.backend.load()
        except Exception as exc:  # a bad model never stops the others
            model.state, model.reason = ModelState.UNAVAILABLE, _reason(exc)
            model.backend = None
            where = f"model {model.name!r}" + (f" version {model.version}" if model.version else "")
            log.error("%s refused: %s", where, model.reason)
            return
        model.state = ModelState.READY
        log.info("model %r version %s loaded (%s backend)", model.name, model.version, model.config.backend)

    def _pick_version(self, model: Model) -> tuple[str, Path]:
        versions = [d for d in model.directory.iterdir() if d.is_dir() and d.name.isdigit()]
        if not versions:
            raise ValueError(f"{model.directory}: no numeric version directory (expected e.g. {model.directory}/1/)")
        newest = max(versions, key=lambda d: int(d.name))
        filename = get_backend(model.config.backend).artifact_filename
        path = newest / filename
        if not path.is_file():
            raise ValueError(f"{newest}: no {filename} in the highest version directory")
        return str(int(newest.name)), path

    def get(self, name: str, version: str = "") -> Model:
        """The model ``name`` (NotFound if there is none, or if ``version`` is not the one served)."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}" + self._known_suffix())
        if version and model.version is not None and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; it serves version {model.version}")
        return model

    def get_ready(self, name: str, version: str = "") -> Model:
        """Like :meth:`get`, but raises Unavailable (with the reason) for a refused model."""
        model = self.get(name, version)
        if not model.ready:
            reason = model.reason or "still loading"
            raise Unavailable(f"model {name!r} is not available: {reason}")
        return model

    def _known_suffix(self) -> str:
        names = sorted(self._models)
        if not names:
            return "; the repository has no models"
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        return f"; known models: {shown}"

    async def unload_all(self) -> None:
        for model in self._models.values():
            if model.backend is not None:
                try:
                    await model.backend.unload()
                except Exception:
                    log.exception("model %r: unload failed", model.name)
            model.state = ModelState.UNAVAILABLE
            model.reason = "the server is stopping"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"
