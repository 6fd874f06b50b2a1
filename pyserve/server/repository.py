"""The model repository: ``DIR/<model>/<version>/model.*`` plus optional ``DIR/<model>/config.yaml``
(or ``config.pbtxt``).

Layout::

    DIR/
      mnist/
        config.yaml          # optional, see ModelConfig
        1/model.pyserve
        3/model.pyserve      # by default (version_policy latest 1) the highest version serves

Version policies (Triton's ``version_policy``): ``latest {num_versions: N}`` serves the N highest
numbered versions, ``all`` every version directory, ``specific {versions: [...]}`` exactly those.
A request naming a version gets that version (NOT_FOUND if it is not served); a request without
one gets the highest served version.

Control modes (Triton's ``--model-control-mode``):

- ``none``: every model is loaded at start-up; RepositoryModelLoad/Unload are refused. A model
  directory that appears later is listed (RepositoryIndex) but never loads: it answers UNAVAILABLE
  saying so, and a traffic route refuses it as a variant (:data:`NEVER_LOADED_IN_MODE_NONE`).
- ``poll``: every model is loaded at start-up; :meth:`ModelRepository.poll` (called every
  ``--repository-poll-s`` by the server) loads new model directories, reloads changed ones and
  unloads removed ones; the load/unload RPCs are refused (as in Triton).
- ``explicit``: at start-up only the models named in ``startup_models`` are loaded (``"*"``: all);
  :meth:`ModelRepository.load` and :meth:`ModelRepository.unload` (the repository RPCs) do the rest.

A model that cannot be loaded (bad config, no version directory, a missing, truncated or corrupt
artifact, a signature that does not fit the config, a failed warm-up) is *refused*: the reason is
logged, its ModelReady answers false, inference on it answers UNAVAILABLE with the reason, and every
other model keeps serving. A load is all or nothing over the versions its policy selects: a (re)load
that fails keeps what served before serving and reports the error to the caller. A new or changed
version serves only after it has loaded *and warmed up* (one inference on zeros, see
:func:`warm_up`); versions whose model file and config did not change are kept as they are. The
new set of versions swaps in atomically; requests already running finish on the version they
started on, which is unloaded once they are done.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pyserve.backends import Backend, create_backend, get_backend
from pyserve.protocol.errors import InvalidArgument, NotFound, Unavailable
from pyserve.protocol.types import ModelIndexEntry
from pyserve.server.scheduler import DEFAULT_INLINE_MAX_US, DirectScheduler, DynamicBatcher, Scheduler
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
    "VersionPolicy",
    "warm_up",
    "warmup_inputs",
]

log = logging.getLogger("pyserve.server.repository")

CONFIG_FILENAME = "config.yaml"
PBTXT_FILENAME = "config.pbtxt"
CONTROL_MODES = ("none", "poll", "explicit")

#: Why a model directory that appeared after start-up does not serve under control mode ``none``.
NEVER_LOADED_IN_MODE_NONE = (
    "its directory appeared after start-up and model control mode 'none' loads models only at start-up "
    "(restart the server, or run it with --model-control-mode poll or explicit)"
)
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
class VersionPolicy:
    """``version_policy`` of a config (Triton's ModelVersionPolicy): which version directories serve.

    kind : ``"latest"`` (the ``num_versions`` highest numbers), ``"all"``, or ``"specific"`` (exactly
        ``versions``; each must exist on disk, or the load fails naming the missing one).
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Sequence[int], where: str = "") -> list[int]:
        """The served version numbers (ascending) among ``available``; ValueError when none or a
        specific version is missing."""
        have = sorted(set(available))
        if self.kind == "all":
            chosen = have
        elif self.kind == "specific":
            missing = [v for v in self.versions if v not in have]
            if missing:
                raise ValueError(f"{where}: field 'version_policy.specific.versions' lists {missing} but there is no "
                                 f"such version directory (found {have})")
            chosen = sorted(set(self.versions))
        else:
            chosen = have[-self.num_versions:]
        if not chosen:
            raise ValueError(f"{where}: no numeric version directory (expected e.g. {where}/1/)")
        return chosen

    def as_info(self) -> tuple[str, tuple[int, ...]]:
        """``(kind, numbers)`` as :class:`pyserve.protocol.types.ModelConfigInfo` carries it."""
        if self.kind == "latest":
            return "latest", (self.num_versions,)
        return self.kind, tuple(self.versions)


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
    version_policy : which version directories serve (:class:`VersionPolicy`), one of
        ``{latest: {num_versions: N}}`` (default N = 1), ``{all: {}}``, ``{specific: {versions: [1, 3]}}``.

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
    version_policy: VersionPolicy = VersionPolicy()

    #: field names of config.yaml (instance_count/instance_kind come from instance_group)
    YAML_FIELDS = ("name", "backend", "max_batch_size", "dynamic_batching", "instance_group", "input", "output",
                   "platform", "version_policy")

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
        policy = cls._version_policy(path, raw.get("version_policy"))
        return cls(name=name, backend=backend, max_batch_size=mbs, dynamic_batching=batching,
                   instance_count=count, instance_kind=kind, inputs=decls.get("input"), outputs=decls.get("output"),
                   version_policy=policy)

    @staticmethod
    def _version_policy(path: Path, raw: Any) -> VersionPolicy:
        if raw is None or raw == {}:
            return VersionPolicy()
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ConfigError(f"{path}: field 'version_policy' must be one of {{latest: {{num_versions: N}}}}, "
                              f"{{all: {{}}}}, {{specific: {{versions: [...]}}}}, got {raw!r}")
        (kind, body), = raw.items()
        body = {} if body is None else body
        if kind not in ("latest", "all", "specific") or not isinstance(body, dict):
            raise ConfigError(f"{path}: field 'version_policy' must be one of latest, all, specific (a mapping), "
                              f"got {raw!r}")
        if kind == "all":
            _check_fields(path, "version_policy.all.", body, [])
            return VersionPolicy("all")
        if kind == "latest":
            _check_fields(path, "version_policy.latest.", body, ["num_versions"])
            n = _int(path, "version_policy.latest.num_versions", body.get("num_versions", 1), 1)
            return VersionPolicy("latest", num_versions=n)
        _check_fields(path, "version_policy.specific.", body, ["versions"])
        versions = body.get("versions")
        if (not isinstance(versions, list) or not versions
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in versions)):
            raise ConfigError(f"{path}: field 'version_policy.specific.versions' must be a non-empty list of "
                              f"integers >= 0, got {versions!r}")
        return VersionPolicy("specific", versions=tuple(sorted(set(versions))))

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


#: ``(st_mtime_ns, st_size, st_ino)`` of a version's model file: a version whose file and config
#: are unchanged is kept (not reloaded) when its model is loaded again.
Fingerprint = tuple


def _file_fingerprint(path: Path) -> Fingerprint:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _dir_fingerprint(model_dir: Path) -> Fingerprint:
    """What poll mode compares between two scans: the config files and every entry of every numeric
    version directory (name, mtime, size). Empty when the directory is gone."""
    entries = []
    try:
        children = sorted(model_dir.iterdir())
    except OSError:
        return ()
    for child in children:
        if child.name in (CONFIG_FILENAME, PBTXT_FILENAME):
            entries.append((child.name, _file_fingerprint(child)))
        elif child.name.isdigit() and child.is_dir():
            try:
                inner = sorted(child.iterdir())
            except OSError:
                continue
            entries.append((child.name, tuple((f.name, _file_fingerprint(f)) for f in inner)))
    return ("dir", *entries)


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of a model: its config, backend, scheduler and statistics.

    ``inflight`` counts the requests holding it (see :meth:`acquire`); a retired version is unloaded
    once it drops to zero. :meth:`acquire` and :meth:`release` may be called from any thread (the
    synchronous gRPC engine's handler threads); :meth:`drained` runs on the event loop that created
    the version.
    """

    name: str
    version: str
    config: ModelConfig
    backend: Backend
    stats: StatsRecorder
    scheduler: Scheduler
    path: Path
    inflight: int = 0
    fingerprint: Fingerprint = ()
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _loop_thread: int | None = field(default=None, repr=False)
    #: :meth:`drained` calls waiting: only then does a release from another thread wake the loop
    _watchers: int = field(default=0, repr=False)
    #: the data plane's per-version cache of what it checks requests against (built on first use)
    validation: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:  # built outside a loop (unit tests): every caller is on one thread
            self._loop, self._loop_thread = None, None

    def acquire(self) -> "ModelVersion":
        with self._lock:
            self.inflight += 1
        return self

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1
            idle = self.inflight == 0
        if idle and self._watchers:  # a wake-up per request would cost the loop a turn each time
            if self._loop is None or threading.get_ident() == self._loop_thread:
                self._idle.set()
            else:  # asyncio.Event wakes its waiters only on its own loop's thread
                try:
                    self._loop.call_soon_threadsafe(self._set_if_idle)
                except RuntimeError:  # the loop has closed: nobody waits any more
                    pass

    def _set_if_idle(self) -> None:
        if self.inflight == 0:
            self._idle.set()

    async def drained(self) -> None:
        self._watchers += 1  # before reading inflight: a release that brings it to 0 then sets _idle
        try:
            while self.inflight:
                self._idle.clear()  # set again by the release that brings inflight to 0
                if self.inflight:
                    await self._idle.wait()
        finally:
            self._watchers -= 1


def _vkey(version: str) -> int:
    return int(version) if version.isdigit() else -1


def _norm_version(version: str) -> str:
    """Request versions are int64 numbers in Triton: ``"02"`` means version 2."""
    return str(int(version)) if version.isdigit() else version


@dataclass(eq=False)
class Model:
    """One model of the repository: the versions it serves (``versions``) or why it serves nothing.

    ``current`` is the highest served version: the one a request without a version gets.
    """

    name: str
    directory: Path
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = "not loaded"
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    #: poll mode: the directory fingerprint last acted on
    seen: Fingerprint = ()
    #: (the ``versions`` dict it was computed from, its highest version): :attr:`current` is on every
    #: request's path, and ``versions`` is only ever replaced by a new dict, never changed in place
    _current: tuple = field(default=(None, None), repr=False)

    @property
    def current(self) -> ModelVersion | None:
        versions = self.versions
        cached_for, mv = self._current
        if cached_for is not versions:
            mv = versions[max(versions, key=_vkey)] if versions else None
            self._current = (versions, mv)
        return mv

    @property
    def served_versions(self) -> list[str]:
        """The served version numbers, ascending (as strings)."""
        return sorted(self.versions, key=_vkey)

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
        if self.state is not ModelState.READY:
            return False
        mv = self.current
        return mv is not None and mv.backend.ready

    def is_ready(self, version: str = "") -> bool:
        """Ready, and (when given) ``version`` is one of the served versions."""
        if not version:
            return self.ready
        mv = self.versions.get(_norm_version(version))
        return self.state is ModelState.READY and mv is not None and mv.backend.ready

    def pick(self, version: str = "") -> ModelVersion:
        """The served version ``version`` (``""``: the highest); NotFound naming the served ones."""
        if not version:
            mv = self.current
            if mv is None:
                raise Unavailable(f"model {self.name!r} is not available: {self.reason or self.state.value.lower()}")
            return mv
        mv = self.versions.get(_norm_version(version))
        if mv is None:
            raise NotFound(f"model {self.name!r} has no version {version!r}; it serves "
                           f"{_versions_text(self.served_versions)}")
        return mv


def _versions_text(versions: Sequence[str]) -> str:
    if not versions:
        return "no version"
    return ("version " if len(versions) == 1 else "versions ") + ", ".join(versions)


class ModelRepository:
    """Discovers, loads, reloads, unloads and hands out the models under ``root``.

    Parameters
    ----------
    root : the repository directory.
    executor : thread pool backends load and run in (None: the event loop's default executor).
    control_mode : ``"none"``, ``"poll"`` or ``"explicit"`` (see the module docstring).
    startup_models : models loaded by :meth:`load_all` in explicit mode (``"*"``: all); ignored
        in modes none and poll, where every model is loaded.
    stats_sink : receives every statistics event (the Prometheus exporter), or None.
    inline_max_us : executions measured below this many microseconds run on the event loop
        instead of the thread pool (:class:`pyserve.server.scheduler.ExecutionRunner`); 0: never.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        executor: Executor | None = None,
        control_mode: str = "none",
        startup_models: Sequence[str] = (),
        stats_sink: StatsSink | None = None,
        inline_max_us: float = DEFAULT_INLINE_MAX_US,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}, got {control_mode!r}")
        self.root = Path(root)
        self.executor = executor
        self.control_mode = control_mode
        self.startup_models = tuple(startup_models)
        self.stats_sink = stats_sink
        if inline_max_us < 0:
            raise ValueError(f"inline_max_us must be >= 0, got {inline_max_us}")
        self.inline_max_us = inline_max_us
        #: handler threads of the sync/native gRPC engine (set by the server; None on aio): a dynamic
        #: batcher stops waiting once that many requests wait in it (no further one can come)
        self.handler_threads: int | None = None
        self._models: dict[str, Model] = {}
        self._stats: dict[tuple[str, str], StatsRecorder] = {}
        self._retiring: set[asyncio.Task] = set()
        self._draining: set[ModelVersion] = set()
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
                model = Model(name=d.name, directory=d)
                if self.loaded and self.control_mode == "none":
                    # found after start-up (RepositoryIndex, a traffic config naming it): mode none
                    # never loads it, so say so; a traffic route refuses it as a variant
                    model.reason = NEVER_LOADED_IN_MODE_NONE
                self._models[d.name] = model
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
        if self.control_mode != "explicit" or "*" in self.startup_models:
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

    async def poll(self) -> None:
        """One scan of poll mode: load new model directories, reload changed ones (only their
        changed versions), unload removed ones. A failed (re)load keeps what served before and is
        retried when the directory changes again. Never raises for a model's failure."""
        try:
            self.discover()
        except ValueError as exc:
            log.error("poll: %s", exc)
            return
        models = list(self._models.values())
        # the scan (a stat per file) runs in a thread, not on the event loop
        seen_now = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [_dir_fingerprint(m.directory) for m in models])
        for model, seen in zip(models, seen_now):
            if not seen:  # the directory is gone
                await self._remove(model)
                continue
            if seen == model.seen:
                continue
            log.info("poll: model %r changed on disk; loading", model.name)
            await self._load_logged(model)

    async def _remove(self, model: Model) -> None:
        """Poll mode: the directory is gone; stop serving (in-flight requests finish) and forget it."""
        async with model.lock:
            old = list(model.versions.values())
            model.versions = {}
            model.state, model.reason = ModelState.UNAVAILABLE, "removed from the repository"
            self._models.pop(model.name, None)
        for mv in old:
            await self._retire(mv)
        log.info("model %r removed from the repository; unloaded", model.name)

    async def load(self, name: str) -> Model:
        """(Re)load ``name`` from disk (explicit mode): the RepositoryModelLoad RPC.

        Versions whose model file and config are unchanged keep serving as they are; new or changed
        ones serve only once loaded and warmed up; requests running on a replaced version finish
        there. Raises NotFound (no such directory), Unavailable (modes none and poll, as Triton), or
        InvalidArgument with the reason when the load fails (what served before keeps serving).
        """
        self._require_explicit("load")
        self.discover()
        model = self._models.get(name)
        if model is None or not model.directory.is_dir():
            raise NotFound(f"no model directory {name!r} in the repository {str(self.root)!r}")
        try:
            await self._load(model)
        except Exception as exc:
            kept = f"; {_versions_text(model.served_versions)} keeps serving" if model.ready else ""
            raise InvalidArgument(f"failed to load model {name!r}: {_reason(exc)}{kept}") from None
        return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (explicit mode): the RepositoryModelUnload RPC.

        New requests get UNAVAILABLE at once; requests already running finish before the backends
        are unloaded. Unloading a model that is not loaded does nothing.
        """
        self._require_explicit("unload")
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}" + self._known_suffix())
        async with model.lock:
            old = list(model.versions.values())
            if not old:
                model.state, model.reason = ModelState.UNAVAILABLE, model.reason or "not loaded"
                return
            model.state, model.reason = ModelState.UNLOADING, ""
            model.versions = {}
            await asyncio.gather(*(self._retire(mv) for mv in old))
            model.state, model.reason = ModelState.UNAVAILABLE, "unloaded"
            log.info("model %r %s unloaded", name, _versions_text([mv.version for mv in old]))

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
        """Snapshots of the served versions (all models when ``name`` is empty; every served version
        of ``name`` when ``version`` is empty). A named model that is not ready answers
        NotFound/Unavailable like inference would."""
        if name:
            model = self.get_ready(name, version)
            chosen = [model.pick(version).version] if version else model.served_versions
            return [self.stats_recorder(model.name, v).snapshot() for v in chosen]
        return [self.stats_recorder(m.name, v).snapshot() for m in self.models if m.ready for v in m.served_versions]

    def index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        """One entry per served version of every model directory (READY), and one entry with an
        empty version and the state/reason for a model that serves nothing."""
        try:
            self.discover()
        except ValueError:
            pass
        entries = []
        for m in self.models:
            if m.ready:
                entries.extend(ModelIndexEntry(m.name, v, m.state.value, "") for v in m.served_versions)
            elif not ready_only:
                entries.append(ModelIndexEntry(m.name, "", m.state.value, m.reason))
        return entries

    async def _load(self, model: Model) -> None:
        """Load the versions ``version_policy`` selects, all or nothing: either every selected
        version is loaded and warmed up and they replace the served set at once, or nothing changes
        (the newly loaded backends are unloaded) and the error is raised."""
        async with model.lock:
            model.seen = _dir_fingerprint(model.directory)
            if not model.versions:
                model.state, model.reason = ModelState.LOADING, ""
            fresh: list[ModelVersion] = []
            backend = None
            where = f"model {model.name!r}"
            try:
                config = ModelConfig.load(model.directory)
                chosen = self._pick_versions(model, config)
                new: dict[str, ModelVersion] = {}
                for version, path in chosen:
                    where = f"model {model.name!r} version {version}"
                    fp = _file_fingerprint(path)
                    old = model.versions.get(version)
                    if old is not None and old.fingerprint == fp and _same_but_policy(old.config, config):
                        old.config = config
                        new[version] = old
                        continue
                    backend = create_backend(config.backend, path, executor=self.executor)
                    await backend.load()
                    _check_signature(config, backend)
                    await warm_up(backend)
                    if config.dynamic_batching is not None and config.max_batch_size >= 2:
                        await check_rows_independent(backend, where)
                    stats = self.stats_recorder(model.name, version)
                    mv = ModelVersion(model.name, version, config, backend, stats, _scheduler(config, backend, stats, self.executor, self.inline_max_us,
                                                                                             self.handler_threads),
                                      path, fingerprint=fp)
                    backend = None
                    fresh.append(mv)
                    new[version] = mv
            except Exception as exc:  # a bad model never stops the others
                reason = _reason(exc)
                for b in [backend, *(mv.backend for mv in fresh)]:
                    if b is not None and b.ready:
                        try:
                            await b.unload()
                        except Exception:
                            log.exception("%s: unload after a failed load failed", where)
                for mv in fresh:
                    await mv.scheduler.close()
                if model.versions:
                    log.error("%s: load failed, %s keeps serving: %s", where,
                              _versions_text(model.served_versions), reason)
                else:
                    model.state, model.reason = ModelState.UNAVAILABLE, reason
                    log.error("%s refused: %s", where, reason)
                raise
            retired = [mv for v, mv in model.versions.items() if new.get(v) is not mv]
            model.versions = new
            model.state, model.reason = ModelState.READY, ""
            for mv in fresh:
                backend = mv.backend
                how = ", ".join(f"{k} {v}" for k, v in (("executor", getattr(backend, "graph_executor", None)),
                                                       ("kernels", _kernel_summary(backend)),
                                                       ("attention", getattr(backend, "attention", None))) if v)
                log.info("model %r version %s loaded and warmed up (%s backend%s)", model.name, mv.version,
                         config.backend, f"; {how}" if how else "")
                if self.on_swap is not None:
                    self.on_swap(model.name, mv.version)
            for mv in retired:
                task = asyncio.ensure_future(self._retire(mv))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: ModelVersion) -> None:
        """Wait for the requests still on ``old`` to finish, then unload it."""
        self._draining.add(old)
        try:
            await old.drained()
        finally:
            self._draining.discard(old)
        try:
            await old.scheduler.close()
            await old.backend.unload()
        except Exception:
            log.exception("model %r version %s: unload failed", old.name, old.version)
        else:
            log.info("model %r: retired version %s", old.name, old.version)

    def _pick_versions(self, model: Model, config: ModelConfig) -> list[tuple[str, Path]]:
        """``[(version, model file)]`` that ``config.version_policy`` selects, ascending; ValueError
        when there is no version directory, a selected one lacks its model file, or a specific
        version is missing."""
        dirs = {int(d.name): d for d in model.directory.iterdir() if d.is_dir() and d.name.isdigit()}
        numbers = config.version_policy.select(list(dirs), str(model.directory))
        filename = get_backend(config.backend).artifact_filename
        out = []
        for n in numbers:
            path = dirs[n] / filename
            if not path.is_file():
                which = "the highest version directory" if n == max(dirs) else f"version directory {n}"
                raise ValueError(f"{dirs[n]}: no {filename} in {which}")
            out.append((str(n), path))
        return out

    def get(self, name: str, version: str = "") -> Model:
        """The model ``name`` (NotFound if there is none, or if ``version`` is not one it serves)."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}" + self._known_suffix())
        if version and model.versions and _norm_version(version) not in model.versions:
            raise NotFound(f"model {name!r} has no version {version!r}; it serves "
                           f"{_versions_text(model.served_versions)}")
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

    def inflight(self) -> int:
        """Inference requests running now, on every version (served or retiring)."""
        seen = {id(mv): mv for m in self._models.values() for mv in m.versions.values()}
        seen.update({id(mv): mv for mv in self._draining})
        return sum(mv.inflight for mv in seen.values())

    async def drained(self) -> None:
        """Return once no inference request is running on any version."""
        while self.inflight():
            versions = [mv for m in self._models.values() for mv in m.versions.values()] + list(self._draining)
            await asyncio.gather(*(mv.drained() for mv in versions))

    async def unload_all(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for model in self._models.values():
            old, model.versions = list(model.versions.values()), {}
            for mv in old:
                try:
                    await mv.scheduler.close()
                    await mv.backend.unload()
                except Exception:
                    log.exception("model %r version %s: unload failed", model.name, mv.version)
            model.state = ModelState.UNAVAILABLE
            model.reason = "the server is stopping"


def _same_but_policy(a: ModelConfig, b: ModelConfig) -> bool:
    return replace(a, version_policy=VersionPolicy()) == replace(b, version_policy=VersionPolicy())


def warmup_inputs(signature) -> dict[str, np.ndarray]:
    """Zeros for every input of ``signature``: each -1 dimension taken as 1; BYTES as empty strings.

    Returns input name -> array of ``pyserve.dtypes.numpy_dtype(spec.datatype)`` (object for BYTES).
    """
    from pyserve import dtypes

    out = {}
    for spec in signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, b"", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtypes.numpy_dtype(spec.datatype))
    return out


async def warm_up(backend: Backend) -> None:
    """Run one inference on :func:`warmup_inputs` before a version serves (first-call costs such as
    lazy initialisation and allocation are paid here, not by a client), and check that it returns
    every output of the signature with its datatype. Raises ValueError saying what failed."""
    from pyserve import dtypes

    sig = backend.signature
    try:
        results = await backend.infer([warmup_inputs(sig)])
    except Exception as exc:
        raise ValueError(f"warm-up inference (zeros, -1 dims as 1) failed: {_reason(exc)}") from exc
    result = results[0] if isinstance(results, (list, tuple)) and len(results) == 1 else results
    if isinstance(result, BaseException):
        raise ValueError(f"warm-up inference (zeros, -1 dims as 1) failed: {_reason(result)}") from result
    if not isinstance(result, dict):
        raise ValueError(f"warm-up inference returned {type(result).__name__}, not one dict of outputs")
    for spec in sig.outputs:
        array = result.get(spec.name)
        if array is None:
            raise ValueError(f"warm-up inference returned no output {spec.name!r}")
        if spec.datatype != "BYTES" and np.asarray(array).dtype.newbyteorder("=") != dtypes.numpy_dtype(spec.datatype):
            raise ValueError(f"warm-up inference: output {spec.name!r} is numpy {np.asarray(array).dtype}, "
                             f"the signature declares {spec.datatype}")


def _as_float(array: np.ndarray, datatype: str | None) -> np.ndarray:
    """An output as float64 for comparing: BF16 bit patterns decoded, other numbers cast."""
    from pyserve.dtypes import bf16_to_float32

    if datatype == "BF16" and array.dtype == np.uint16:
        return bf16_to_float32(array).astype(np.float64)
    return array.astype(np.float64)


def _distinct_rows(signature) -> tuple[dict, dict] | None:
    """Two one-row inputs that differ in every input (-1 dims after the first taken as 1): random
    normal floats (BF16 as its bit patterns), 0 and 1 for integers (valid token ids, indices and
    flags), False and True; None when an input is BYTES or has no batch dimension (nothing can be
    made up for it)."""
    from pyserve import dtypes

    rng = np.random.default_rng(0)
    a, b = {}, {}
    for spec in signature.inputs:
        if spec.datatype == "BYTES" or not spec.shape or spec.shape[0] != -1:
            return None
        shape = (1, *(1 if d == -1 else d for d in spec.shape[1:]))
        dtype = dtypes.numpy_dtype(spec.datatype)
        if spec.datatype == "BF16":
            a[spec.name], b[spec.name] = (dtypes.float32_to_bf16(rng.standard_normal(shape)) for _ in range(2))
        elif np.issubdtype(dtype, np.floating):
            a[spec.name] = rng.standard_normal(shape).astype(dtype)
            b[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            a[spec.name] = np.zeros(shape, dtype)
            b[spec.name] = np.ones(shape, dtype)
    return a, b


def _rows_close(got: np.ndarray, ref: np.ndarray) -> bool:
    scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)) or 1.0
    return bool(np.allclose(got, ref, rtol=1e-3, atol=1e-5 * scale, equal_nan=True))


async def check_rows_independent(backend: Backend, where: str) -> bool:
    """For a model served with dynamic batching: run two made-up rows (:func:`_distinct_rows`) alone
    and as one batch of two, and log a WARNING when a row's outputs in the batch differ from its
    outputs alone beyond float rounding (``rtol=1e-3``, ``atol=1e-5`` of the output's scale): the
    model then mixes the rows of a batch (a softmax or a normalisation over dim 0, a per-batch
    quantization scale), so under dynamic batching one request's answer depends on the requests
    batched with it. The version still serves (some models accept that, e.g. per-tensor dynamic
    quantization). Not checked (logged at INFO): a failing run, and a model whose output for the
    same row changes from run to run (random). Returns False when the rows were found to mix, True
    otherwise (also when nothing could be checked)."""
    rows = _distinct_rows(backend.signature)
    if rows is None:
        return True
    a, b = rows
    both = {name: np.concatenate([a[name], b[name]]) for name in a}
    try:  # one call each: a backend may run the requests of one call as one batch
        results = [(await backend.infer([x]))[0] for x in (a, a, b, both)]
    except Exception as exc:  # the model's own error shows on real requests; warm-up passed
        log.info("%s: batch-row independence not checked: %s", where, _reason(exc))
        return True
    failed = next((r for r in results if isinstance(r, BaseException) or not isinstance(r, dict)), None)
    if failed is not None:
        log.info("%s: batch-row independence not checked: %s", where,
                 _reason(failed) if isinstance(failed, BaseException) else f"the model returned {type(failed).__name__}")
        return True
    alone_a, again_a, alone_b, batched = results
    types = {spec.name: spec.datatype for spec in backend.signature.outputs}
    for name, out in batched.items():
        got, ra, ra2, rb = (np.asarray(x) for x in (out, alone_a.get(name), again_a.get(name), alone_b.get(name)))
        if got.dtype == object or ra.dtype == object or got.ndim == 0 or got.shape[0] != 2 \
                or (ra.shape != got.shape[1:] and ra.shape != (1, *got.shape[1:])) or rb.shape != ra.shape \
                or ra2.shape != ra.shape or not (np.issubdtype(got.dtype, np.number) or got.dtype == np.bool_):
            continue
        dt = types.get(name)
        g64 = _as_float(got, dt)
        r64 = np.concatenate([_as_float(ra, dt).reshape(1, *got.shape[1:]), _as_float(rb, dt).reshape(1, *got.shape[1:])])
        if not _rows_close(_as_float(ra2, dt).reshape(1, *got.shape[1:]), r64[:1]):
            log.info("%s: batch-row independence not checked: output %r changes from run to run for the same row",
                     where, name)
            return True
        if _rows_close(g64, r64):
            continue
        diff = float(np.nanmax(np.abs(g64 - r64)))
        log.warning("%s: its output %r for a row differs by up to %.3g when the row is batched with another "
                    "row than when it runs alone: the model mixes the rows of a batch (e.g. a softmax or a "
                    "normalisation over dim 0), so with dynamic_batching a request's answer depends on the "
                    "requests batched with it; serve it without dynamic_batching, or fix the model",
                    where, name, diff)
        return False
    return True


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


def _scheduler(config: ModelConfig, backend: Backend, stats: StatsRecorder, executor=None,
               inline_max_us: float = DEFAULT_INLINE_MAX_US, handler_threads: int | None = None) -> Scheduler:
    db = config.dynamic_batching
    if db is None:
        return DirectScheduler(backend, stats, instances=config.instance_count, executor=executor,
                               inline_max_us=inline_max_us)
    return DynamicBatcher(
        backend,
        stats,
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=db.preferred_batch_size,
        max_queue_delay_us=db.max_queue_delay_microseconds,
        instances=config.instance_count,
        executor=executor,
        inline_max_us=inline_max_us,
        handler_threads=handler_threads,
    )


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _kernel_summary(backend) -> str:
    """``"dense x2, csr x1"`` from a pyserve backend's per-layer kernel choices ('' for other backends)."""
    choices = getattr(backend, "kernel_choices", None)
    if not isinstance(choices, dict) or not choices:
        return ""
    counts: dict = {}
    for kernel in choices.values():
        counts[kernel] = counts.get(kernel, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
