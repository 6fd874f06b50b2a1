"""The model repository: ``DIR/<model>/<version>/model.*`` plus optional ``DIR/<model>/config.yaml``.

Layout::

    DIR/
      mnist/
        config.yaml          # optional, see ModelConfig
        1/model.pyserve
        3/model.pyserve      # the highest numeric version is the one served

Control modes (Triton's ``--model-control-mode``):

- ``none``: every model is loaded at start-up; RepositoryModelLoad/Unload are refused.
- ``explicit``: at start-up only the models named in ``startup_models`` are loaded (``"*"``: all);
  :meth:`ModelRepository.load` and :meth:`ModelRepository.unload` (the repository RPCs) do the rest.

A model that cannot be loaded (bad ``config.yaml``, no version directory, a missing, truncated or
corrupt artifact, a signature that does not fit the config) is *refused*: the reason is logged, its
ModelReady answers false, inference on it answers UNAVAILABLE with the reason, and every other model
keeps serving. A (re)load that fails while an earlier load of the model is serving keeps the earlier
one serving and reports the error to the caller. A successful reload swaps the new version in
atomically; requests already running finish on the old one, which is unloaded once they are done.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from pyserve.backends import Backend, create_backend, get_backend
from pyserve.protocol.errors import InvalidArgument, NotFound, Unavailable
from pyserve.protocol.types import ModelIndexEntry
from pyserve.server.scheduler import DirectScheduler, DynamicBatcher, Scheduler
from pyserve.server.stats import StatsRecorder, StatsSink

__all__ = [
    "CONFIG_FILENAME",
    "PBTXT_FILENAME",
    "TensorDecl",
    "CONTROL_MODES",
    "ConfigError",
    "DynamicBatchingConfig",
    "Model",
    "ModelConfig",
    "ModelRepository",
    "ModelState",
    "ModelVersion",
]

log = logging.getLogger("pyserve.server.repository")

CONFIG_FILENAME = "config.yaml"
PBTXT_FILENAME = "config.pbtxt"
CONTROL_MODES = ("none", "explicit")
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


class ConfigError(ValueError):
    """A model's config.yaml is malformed; the message names the file and the field."""


def _check_fields(path: Path, where: str, raw: dict, known: Sequence[str]) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown field '{where}{key}'; known fields: {', '.join(known)}")


def _int(path: Path, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: field '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """``dynamic_batching`` of config.yaml (Triton's field names).

    max_queue_delay_microseconds : longest wait, in microseconds, of the oldest queued request for
        others to batch with (default 0: batch only what is already waiting).
    preferred_batch_size : batch sizes (rows) to aim for, each in 1..max_batch_size.
    """

    max_queue_delay_microseconds: int = 0
    preferred_batch_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorDecl:
    """An ``input``/``output`` entry of a config: checked against the backend's signature at load.

    dims : without the batch dimension when max_batch_size > 0 (Triton's convention); -1 = any.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    """A model's ``config.yaml``; every field optional.

    name : must equal the model's directory name.
    backend : registered backend name (``pyserve.backends.backend_names()``), default ``pyserve``.
    max_batch_size : largest batch dimension (dim 0) of a request or a dynamic batch; 0 = the
        server does not batch and imposes no limit. When > 0, every input and output of the model
        must have a variable first dimension (-1).
    dynamic_batching : ``{max_queue_delay_microseconds, preferred_batch_size}``; needs max_batch_size > 0.
    instance_group : list of ``{count, kind}`` (kind KIND_CPU, KIND_GPU or KIND_AUTO); the counts
        add up to the number of executions of this model that may run at once (default 1).
    input, output : optional lists of ``{name, data_type, dims}`` (``data_type`` a Triton ``TYPE_*``
        name or a protocol datatype); when given they must match the backend's signature.
    platform : only when ``backend`` is absent: the backend to use (Triton configs name it so).

    Read from ``config.yaml`` or, in Triton's text format, ``config.pbtxt`` (not both).
    """

    name: str
    backend: str = "pyserve"
    max_batch_size: int = 0
    dynamic_batching: DynamicBatchingConfig | None = None
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    inputs: tuple[TensorDecl, ...] | None = None
    outputs: tuple[TensorDecl, ...] | None = None

    #: field names of config.yaml (instance_count/instance_kind come from instance_group)
    YAML_FIELDS = ("name", "backend", "max_batch_size", "dynamic_batching", "instance_group", "input", "output",
                   "platform")

    @classmethod
    def load(cls, model_dir: Path) -> "ModelConfig":
        """Read ``model_dir/config.yaml`` or ``config.pbtxt`` (defaults when neither exists);
        raises ConfigError naming the file and the field."""
        path, pbtxt = model_dir / CONFIG_FILENAME, model_dir / PBTXT_FILENAME
        if path.exists() and pbtxt.exists():
            raise ConfigError(f"{model_dir}: both {CONFIG_FILENAME} and {PBTXT_FILENAME}; keep one")
        if pbtxt.exists():
            from pyserve.protocol import codec

            try:
                raw = codec.parse_model_config_text(pbtxt.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"{pbtxt}: {exc}") from None
            return cls._from_raw(pbtxt, model_dir, raw)
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
        return cls._from_raw(path, model_dir, raw)

    @classmethod
    def _from_raw(cls, path: Path, model_dir: Path, raw: dict) -> "ModelConfig":
        _check_fields(path, "", raw, cls.YAML_FIELDS)
        name = raw.get("name", model_dir.name)
        if name != model_dir.name:
            raise ConfigError(f"{path}: field 'name' is {name!r}; it must equal the directory name {model_dir.name!r}")
        if "backend" in raw and "platform" in raw and raw["backend"] != raw["platform"]:
            raise ConfigError(f"{path}: field 'platform' is {raw['platform']!r} but field 'backend' is "
                              f"{raw['backend']!r}; give only 'backend'")
        key = "backend" if "backend" in raw or "platform" not in raw else "platform"
        backend = raw.get(key, "pyserve")
        if not isinstance(backend, str):
            raise ConfigError(f"{path}: field '{key}' must be a string, got {backend!r}")
        try:
            get_backend(backend)
        except ValueError as exc:
            raise ConfigError(f"{path}: field '{key}': {exc}") from None
        mbs = _int(path, "max_batch_size", raw.get("max_batch_size", 0), 0)
        batching = cls._dynamic_batching(path, raw.get("dynamic_batching"), mbs) if "dynamic_batching" in raw else None
        count, kind = cls._instance_group(path, raw.get("instance_group", []))
        decls = {k: cls._tensors(path, k, raw[k]) for k in ("input", "output") if k in raw}
        return cls(name=name, backend=backend, max_batch_size=mbs, dynamic_batching=batching,
                   instance_count=count, instance_kind=kind, inputs=decls.get("input"), outputs=decls.get("output"))

    @staticmethod
    def _tensors(path: Path, kind: str, raw: Any) -> tuple[TensorDecl, ...]:
        from pyserve import dtypes

        if not isinstance(raw, list):
            raise ConfigError(f"{path}: field '{kind}' must be a list of {{name, data_type, dims}}, got {raw!r}")
        by_config = {d.triton_config: d.name for d in dtypes.DTYPES}
        out = []
        for i, t in enumerate(raw):
            where = f"{kind}[{i}]"
            if not isinstance(t, dict):
                raise ConfigError(f"{path}: field '{where}' must be a mapping, got {t!r}")
            _check_fields(path, f"{where}.", t, ["name", "data_type", "dims"])
            name, dt, dims = t.get("name"), t.get("data_type"), t.get("dims")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{path}: field '{where}.name' must be a non-empty string, got {name!r}")
            datatype = by_config.get(dt, dt)
            if datatype not in {d.name for d in dtypes.DTYPES}:
                raise ConfigError(f"{path}: field '{where}.data_type' must be a TYPE_* name (e.g. TYPE_FP32) or a "
                                  f"protocol datatype, got {dt!r}")
            if not isinstance(dims, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < -1
                                                 for d in dims):
                raise ConfigError(f"{path}: field '{where}.dims' must be a list of integers >= -1, got {dims!r}")
            out.append(TensorDecl(name, datatype, tuple(dims)))
        return tuple(out)

    @staticmethod
    def _dynamic_batching(path: Path, raw: Any, max_batch_size: int) -> DynamicBatchingConfig:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: field 'dynamic_batching' must be a mapping, got {raw!r}")
        _check_fields(path, "dynamic_batching.", raw, [f.name for f in fields(DynamicBatchingConfig)])
        if max_batch_size <= 0:
            raise ConfigError(f"{path}: field 'dynamic_batching' needs 'max_batch_size' > 0 (got {max_batch_size})")
        delay = _int(path, "dynamic_batching.max_queue_delay_microseconds",
                     raw.get("max_queue_delay_microseconds", 0), 0)
        preferred = raw.get("preferred_batch_size", [])
        if isinstance(preferred, int) and not isinstance(preferred, bool):
            preferred = [preferred]
        if not isinstance(preferred, list):
            raise ConfigError(f"{path}: field 'dynamic_batching.preferred_batch_size' must be a list of integers, "
                              f"got {preferred!r}")
        for p in preferred:
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= max_batch_size:
                raise ConfigError(f"{path}: field 'dynamic_batching.preferred_batch_size' entries must be integers "
                                  f"in 1..max_batch_size ({max_batch_size}), got {p!r}")
        return DynamicBatchingConfig(max_queue_delay_microseconds=delay, preferred_batch_size=tuple(preferred))

    @staticmethod
    def _instance_group(path: Path, raw: Any) -> tuple[int, str]:
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: field 'instance_group' must be a list of {{count, kind}}, got {raw!r}")
        if not raw:
            return 1, "KIND_CPU"
        count, kinds = 0, set()
        for i, group in enumerate(raw):
            if not isinstance(group, dict):
                raise ConfigError(f"{path}: field 'instance_group[{i}]' must be a mapping, got {group!r}")
            _check_fields(path, f"instance_group[{i}].", group, ["name", "count", "kind"])
            count += _int(path, f"instance_group[{i}].count", group.get("count", 1), 1)
            kind = group.get("kind", "KIND_CPU")
            if kind not in INSTANCE_KINDS:
                raise ConfigError(f"{path}: field 'instance_group[{i}].kind' must be one of "
                                  f"{', '.join(INSTANCE_KINDS)}, got {kind!r}")
            kinds.add(kind)
        if len(kinds) > 1:
            raise ConfigError(f"{path}: field 'instance_group': one kind for all groups, got {sorted(kinds)}")
        return count, kinds.pop()


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of a model: its config, backend, scheduler and statistics.

    ``inflight`` counts the requests holding it (see :meth:`acquire`); a retired version is unloaded
    once it drops to zero.
    """

    name: str
    version: str
    config: ModelConfig
    backend: Backend
    stats: StatsRecorder
    scheduler: Scheduler
    path: Path
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def acquire(self) -> "ModelVersion":
        self.inflight += 1
        self._idle.clear()
        return self

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self) -> None:
        if self.inflight:
            await self._idle.wait()


@dataclass(eq=False)
class Model:
    """One model of the repository: the version it serves (``current``) or why it serves nothing."""

    name: str
    directory: Path
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = "not loaded"
    current: ModelVersion | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def config(self) -> ModelConfig | None:
        return self.current.config if self.current else None

    @property
    def version(self) -> str | None:
        return self.current.version if self.current else None

    @property
    def backend(self) -> Backend | None:
        return self.current.backend if self.current else None

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self.current is not None and self.current.backend.ready


class ModelRepository:
    """Discovers, loads, reloads, unloads and hands out the models under ``root``.

    Parameters
    ----------
    root : the repository directory.
    executor : thread pool backends load and run in (None: the event loop's default executor).
    control_mode : ``"none"`` or ``"explicit"`` (see the module docstring).
    startup_models : models loaded by :meth:`load_all` in explicit mode (``"*"``: all); ignored
        in mode none, where every model is loaded.
    stats_sink : receives every statistics event (the Prometheus exporter), or None.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        executor: Executor | None = None,
        control_mode: str = "none",
        startup_models: Sequence[str] = (),
        stats_sink: StatsSink | None = None,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}, got {control_mode!r}")
        self.root = Path(root)
        self.executor = executor
        self.control_mode = control_mode
        self.startup_models = tuple(startup_models)
        self.stats_sink = stats_sink
        self._models: dict[str, Model] = {}
        self._stats: dict[tuple[str, str], StatsRecorder] = {}
        self._retiring: set[asyncio.Task] = set()
        self.loaded = False
        #: called with (model name, version) after a version starts serving (hook for tests/metrics)
        self.on_swap: Callable[[str, str], None] | None = None

    @property
    def models(self) -> list[Model]:
        return [self._models[k] for k in sorted(self._models)]

    def discover(self) -> list[Model]:
        """Find the model directories (no loading); keeps the models already known.

        Raises ValueError if ``root`` is not a directory.
        """
        if not self.root.is_dir():
            raise ValueError(f"model repository {str(self.root)!r} is not a directory")
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in self._models:
                self._models[d.name] = Model(name=d.name, directory=d)
        return self.models

    async def load_all(self) -> None:
        """Discover and load the start-up models; refused models are logged, never raised."""
        names = self.startup_names()
        for name in names:
            self._models[name].state, self._models[name].reason = ModelState.LOADING, ""
        await asyncio.gather(*(self._load_logged(self._models[n]) for n in names))
        self.loaded = True

    def startup_names(self) -> list[str]:
        """Discover, then the models :meth:`load_all` loads; ValueError naming unknown start-up models."""
        self.discover()
        if self.control_mode == "none" or "*" in self.startup_models:
            return list(self._models)
        unknown = [n for n in self.startup_models if n not in self._models]
        if unknown:
            raise ValueError(f"start-up model(s) {', '.join(map(repr, unknown))} not in {str(self.root)!r}")
        return list(dict.fromkeys(self.startup_models))

    async def _load_logged(self, model: Model) -> None:
        try:
            await self._load(model)
        except Exception:
            pass  # already logged and recorded in model.reason

    async def load(self, name: str) -> Model:
        """(Re)load ``name`` from disk (explicit mode): the RepositoryModelLoad RPC.

        The new version serves only once loaded; requests running on the old one finish there.
        Raises NotFound (no such directory), Unavailable (mode none, as Triton), or InvalidArgument
        with the reason when the load fails (the previous version, if any, keeps serving).
        """
        self._require_explicit("load")
        self.discover()
        model = self._models.get(name)
        if model is None or not model.directory.is_dir():
            raise NotFound(f"no model directory {name!r} in the repository {str(self.root)!r}")
        try:
            await self._load(model)
        except Exception as exc:
            kept = f"; version {model.version} keeps serving" if model.ready else ""
            raise InvalidArgument(f"failed to load model {name!r}: {_reason(exc)}{kept}") from None
        return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (explicit mode): the RepositoryModelUnload RPC.

        New requests get UNAVAILABLE at once; requests already running finish before the backend
        is unloaded. Unloading a model that is not loaded does nothing.
        """
        self._require_explicit("unload")
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}" + self._known_suffix())
        async with model.lock:
            old = model.current
            if old is None:
                model.state, model.reason = ModelState.UNAVAILABLE, model.reason or "not loaded"
                return
            model.state, model.reason = ModelState.UNLOADING, ""
            model.current = None
            await self._retire(old)
            model.state, model.reason = ModelState.UNAVAILABLE, "unloaded"
            log.info("model %r version %s unloaded", name, old.version)

    def _require_explicit(self, what: str) -> None:
        # Triton answers UNAVAILABLE with this phrase (which clients match on) in modes none and poll
        if self.control_mode != "explicit":
            raise Unavailable(
                f"explicit model load / unload is not allowed: the server runs with model control mode "
                f"{self.control_mode!r}; start it with --model-control-mode explicit to {what} models"
            )

    def stats_recorder(self, name: str, version: str) -> StatsRecorder:
        """The statistics of ``name`` version ``version``; kept across reloads of that version."""
        key = (name, version)
        if key not in self._stats:
            self._stats[key] = StatsRecorder(name, version, self.stats_sink)
        return self._stats[key]

    def statistics(self, name: str = "", version: str = ""):
        """Snapshots of the served versions (all models when ``name`` is empty).

        A named model that is not ready answers NotFound/Unavailable like inference would.
        """
        if name:
            model = self.get_ready(name, version)
            return [self.stats_recorder(model.name, model.version).snapshot()]
        return [self.stats_recorder(m.name, m.version).snapshot() for m in self.models if m.ready]

    def index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        """Every model directory of the repository, with the version it serves and its state."""
        try:
            self.discover()
        except ValueError:
            pass
        entries = []
        for m in self.models:
            if ready_only and not m.ready:
                continue
            entries.append(ModelIndexEntry(m.name, m.version or "", m.state.value, m.reason))
        return entries

    async def _load(self, model: Model) -> None:
        async with model.lock:
            if model.current is None:
                model.state, model.reason = ModelState.LOADING, ""
            backend = None
            version = None
            try:
                config = ModelConfig.load(model.directory)
                version, path = self._pick_version(model, config)
                backend = create_backend(config.backend, path, executor=self.executor)
                await backend.load()
                _check_signature(config, backend)
                stats = self.stats_recorder(model.name, version)
                new = ModelVersion(model.name, version, config, backend, stats, _scheduler(config, backend, stats), path)
            except Exception as exc:  # a bad model never stops the others
                reason = _reason(exc)
                where = f"model {model.name!r}" + (f" version {version}" if version else "")
                if backend is not None and backend.ready:
                    try:
                        await backend.unload()
                    except Exception:
                        log.exception("%s: unload after a failed load failed", where)
                if model.current is not None:
                    log.error("%s: load failed, version %s keeps serving: %s", where, model.current.version, reason)
                else:
                    model.state, model.reason = ModelState.UNAVAILABLE, reason
                    log.error("%s refused: %s", where, reason)
                raise
            old, model.current = model.current, new
            model.state, model.reason = ModelState.READY, ""
            log.info("model %r version %s loaded (%s backend)", model.name, version, config.backend)
            if self.on_swap is not None:
                self.on_swap(model.name, version)
            if old is not None:
                task = asyncio.ensure_future(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: ModelVersion) -> None:
        """Wait for the requests still on ``old`` to finish, then unload it."""
        await old.drained()
        try:
            await old.scheduler.close()
            await old.backend.unload()
        except Exception:
            log.exception("model %r version %s: unload failed", old.name, old.version)
        else:
            log.info("model %r: retired version %s", old.name, old.version)

    def _pick_version(self, model: Model, config: ModelConfig) -> tuple[str, Path]:
        versions = [d for d in model.directory.iterdir() if d.is_dir() and d.name.isdigit()]
        if not versions:
            raise ValueError(f"{model.directory}: no numeric version directory (expected e.g. {model.directory}/1/)")
        newest = max(versions, key=lambda d: int(d.name))
        filename = get_backend(config.backend).artifact_filename
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
        """Like :meth:`get`, but raises Unavailable (with the reason) for a model not serving."""
        model = self.get(name, version)
        if not model.ready:
            reason = model.reason or model.state.value.lower()
            raise Unavailable(f"model {name!r} is not available: {reason}")
        return model

    def _known_suffix(self) -> str:
        names = sorted(self._models)
        if not names:
            return "; the repository has no models"
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        return f"; known models: {shown}"

    async def unload_all(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for model in self._models.values():
            old, model.current = model.current, None
            if old is not None:
                try:
                    await old.scheduler.close()
                    await old.backend.unload()
                except Exception:
                    log.exception("model %r: unload failed", model.name)
            model.state = ModelState.UNAVAILABLE
            model.reason = "the server is stopping"


def _check_signature(config: ModelConfig, backend: Backend) -> None:
    """With max_batch_size > 0, every input and output must have a variable first dimension; declared
    inputs/outputs must match the backend's signature (names, datatypes, dims; -1 matches any)."""
    sig = backend.signature
    batched = config.max_batch_size > 0
    for kind, specs, decls in (("input", sig.inputs, config.inputs), ("output", sig.outputs, config.outputs)):
        if batched:
            for s in specs:
                if not s.shape or s.shape[0] != -1:
                    raise ConfigError(
                        f"model config: field 'max_batch_size' is {config.max_batch_size} but {kind} {s.name!r} "
                        f"has shape {list(s.shape)}; batching needs a variable first dimension (-1)"
                    )
        if decls is None:
            continue
        actual = {s.name: s for s in specs}
        if [d.name for d in decls] != [s.name for s in specs]:
            raise ConfigError(f"model config: field '{kind}' declares {[d.name for d in decls]}; the model's "
                              f"{kind}s are {[s.name for s in specs]}")
        for i, d in enumerate(decls):
            s = actual[d.name]
            shape = tuple(s.shape[1:]) if batched else tuple(s.shape)
            if d.datatype != s.datatype:
                raise ConfigError(f"model config: field '{kind}[{i}].data_type' is {d.datatype}; the model's "
                                  f"{kind} {d.name!r} is {s.datatype}")
            if len(d.dims) != len(shape) or any(a != -1 and b != -1 and a != b for a, b in zip(d.dims, shape)):
                raise ConfigError(f"model config: field '{kind}[{i}].dims' is {list(d.dims)}; the model's {kind} "
                                  f"{d.name!r} has dims {list(shape)}" + (" (batch dimension excluded)" if batched else ""))


def _scheduler(config: ModelConfig, backend: Backend, stats: StatsRecorder) -> Scheduler:
    db = config.dynamic_batching
    if db is None:
        return DirectScheduler(backend, stats, instances=config.instance_count)
    return DynamicBatcher(
        backend,
        stats,
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=db.preferred_batch_size,
        max_queue_delay_us=db.max_queue_delay_microseconds,
        instances=config.instance_count,
    )


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"
