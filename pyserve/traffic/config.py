"""The declarative traffic config: YAML (format version 1) -> frozen dataclasses, checked at load.

Format (docs/traffic.md has the full reference)::

    version: 1                      # format version, required
    revision: "2026-11-30.1"        # optional label, shown by `pyserve traffic status`
    routes:
      mnist:                        # route name = the model_name a client calls
        policy: canary              # canary | ab | shadow | interleave
        variants:                   # ordered: variant name -> model of the repository
          stable:    {model: lenet300, version: 1, weight_percent: 95}
          candidate: {model: lenet300, version: 2, weight_percent: 5}
        shadows:                    # optional, any policy but interleave: mirrored off the request path
          compressed: {model: lenet300c, version: 1, fraction: 0.25, timeout_s: 10}
        shadow_queue_size: 1024     # optional
        guard: {...}                # optional SLO guard for a progressive canary (GuardConfig)

A variant or shadow names a repository model (``model`` + optional ``version``; omitted = the
version the model serves) or, instead, another route (``route: NAME``; the request is routed again
through that route's policy). A route that mirrors to itself, or whose ``route:`` references form a
cycle, is refused.

Every error is a :class:`TrafficConfigError` whose message starts with the source (file name) and
the field path, e.g. ``traffic.yaml: routes.mnist.variants.candidate.weight_percent: ...``. Parsing
builds a whole new :class:`TrafficConfig` or raises: a config is never half-applied.

This module imports nothing of pyserve (the traffic package is pure; STYLE.md rule 10).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "FORMAT_VERSION",
    "POLICIES",
    "TrafficConfigError",
    "TargetConfig",
    "VariantConfig",
    "ShadowConfig",
    "GuardConfig",
    "RouteConfig",
    "TrafficConfig",
    "load_traffic_config",
    "parse_traffic_config",
    "parse_route",
    "route_to_dict",
]

FORMAT_VERSION = 1
POLICIES = ("canary", "ab", "shadow", "interleave")
DEFAULT_SHADOW_QUEUE_SIZE = 1024
#: Seconds one shadow copy may run before it counts as an error of kind timeout (ShadowConfig.timeout_s).
DEFAULT_SHADOW_TIMEOUT_S = 10.0
#: Tolerance on the sum of the weights (percent), for float weights such as 33.3/33.3/33.4.
WEIGHT_SUM_TOLERANCE = 1e-6


class TrafficConfigError(ValueError):
    """A traffic config is invalid; the message names the source and the field path."""

    def __init__(self, source: str, field_path: str, message: str) -> None:
        self.source, self.field_path = source, field_path
        super().__init__(f"{source}: {field_path}: {message}" if field_path else f"{source}: {message}")


@dataclass(frozen=True)
class TargetConfig:
    """Where a variant or shadow sends requests: a repository model or another route.

    model : repository model name (None when ``route`` is set).
    version : the model version; "" = the version the model serves.
    route : another route's name (None when ``model`` is set).
    """

    model: str | None = None
    version: str = ""
    route: str | None = None

    @property
    def label(self) -> str:
        if self.route is not None:
            return f"route {self.route}"
        return f"{self.model}" + (f" v{self.version}" if self.version else "")


@dataclass(frozen=True)
class VariantConfig:
    """One variant (an "arm" for A/B) of a route. ``weight_percent`` in [0, 100]."""

    name: str
    target: TargetConfig
    weight_percent: float = 0.0


@dataclass(frozen=True)
class ShadowConfig:
    """A shadow: requests mirrored to ``target`` with probability ``fraction`` in [0, 1].

    ``timeout_s`` (> 0, seconds): how long one mirrored copy may run; after that it counts as a
    shadow error of kind timeout and the shadows behind it go on (in the worker process: the worker
    is killed and started again, see :mod:`pyserve.server._shadow_process`).
    """

    name: str
    target: TargetConfig
    fraction: float = 1.0
    timeout_s: float = DEFAULT_SHADOW_TIMEOUT_S


@dataclass(frozen=True)
class GuardConfig:
    """The SLO guard of a progressive canary (see :mod:`pyserve.traffic.guard`).

    canary : the variant rolled out; the route's other variant is the baseline.
    steps_percent : canary weights in percent, strictly increasing, each in (0, 100].
    window_s : seconds each step is held and evaluated.
    min_requests : canary requests a window needs before it is judged.
    max_error_rate_increase : largest allowed canary error rate minus baseline error rate (absolute).
    max_p99_latency_ratio : largest allowed canary p99 latency / baseline p99 latency.
    max_shadow_disagreement : largest allowed 1 - top-1 agreement of the canary's model when it
        runs as a shadow of the route (None: not checked).
    """

    canary: str
    steps_percent: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
    window_s: float = 60.0
    min_requests: int = 100
    max_error_rate_increase: float = 0.01
    max_p99_latency_ratio: float = 1.2
    max_shadow_disagreement: float | None = None


@dataclass(frozen=True)
class RouteConfig:
    """One route: the name a client calls, its policy, its variants and shadows."""

    name: str
    policy: str
    variants: tuple[VariantConfig, ...]
    shadows: tuple[ShadowConfig, ...] = ()
    shadow_queue_size: int = DEFAULT_SHADOW_QUEUE_SIZE
    guard: GuardConfig | None = None

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def weights(self) -> dict[str, float]:
        return {v.name: v.weight_percent for v in self.variants}

    def with_weights(self, weights: Mapping[str, float], source: str = "set-weights") -> "RouteConfig":
        """A copy with new weights (every variant named, each >= 0, summing to 100).

        Raises TrafficConfigError naming ``routes.<name>.variants.<variant>.weight_percent``.
        """
        where = f"routes.{self.name}.variants"
        if self.policy == "interleave":
            raise TrafficConfigError(source, f"routes.{self.name}.policy",
                                     "an interleave route has no weights (both variants rank every request)")
        names = [v.name for v in self.variants]
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise TrafficConfigError(source, f"{where}.{unknown[0]}",
                                     f"unknown variant; the route's variants are {', '.join(names)}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise TrafficConfigError(source, f"{where}.{missing[0]}.weight_percent",
                                     "missing; give a weight for every variant")
        for n, w in weights.items():
            _check_weight(source, f"{where}.{n}.weight_percent", w)
        _check_sum(source, where, {n: float(weights[n]) for n in names})
        return replace(self, variants=tuple(replace(v, weight_percent=float(weights[v.name])) for v in self.variants))


@dataclass(frozen=True)
class TrafficConfig:
    """A whole traffic config. ``routes`` keeps the file's order."""

    version: int = FORMAT_VERSION
    revision: str = ""
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)
    source: str = "<string>"

    def check_targets(self, model_exists: Callable[[str, str], str | None]) -> None:
        """Check every ``model`` target against the repository.

        ``model_exists(model, version)`` returns None when the model (and version, "" = served) is
        known, else a reason. Raises TrafficConfigError naming the field.
        """
        for route, kind, item, t in self._model_targets():
            reason = model_exists(t.model, t.version)
            if reason:
                field_ = "version" if t.version and "version" in reason else "model"
                raise TrafficConfigError(self.source, f"routes.{route.name}.{kind}.{item.name}.{field_}", reason)

    def check_loaded(self, load_failure: Callable[[str, str], str | None],
                     warn: Callable[[str], None] | None = None) -> None:
        """Refuse a variant whose model failed to load; warn (``warn(message)``) for such a shadow.

        ``load_failure(model, version)`` returns why the model's last load failed, or None when it
        serves (or was never asked to load, e.g. explicit mode). A variant on such a model would
        answer every request it gets with UNAVAILABLE, so the config is refused (TrafficConfigError
        naming ``routes.R.variants.V.model``); a shadow never affects an answer, so only ``warn``
        hears of it (its errors are counted).
        """
        for route, kind, item, t in self._model_targets():
            reason = load_failure(t.model, t.version)
            if not reason:
                continue
            where = f"routes.{route.name}.{kind}.{item.name}.model"
            msg = f"model {t.model!r} failed to load: {reason}"
            if kind == "variants":
                raise TrafficConfigError(self.source, where, msg + "; fix the model or route elsewhere")
            if warn is not None:
                warn(f"{self.source}: {where}: {msg}; every mirrored request to it fails (counted)")

    def check_inputs(self, inputs_of: Callable[[str, str], Sequence[tuple[str, str, tuple]] | None],
                     warn: Callable[[str], None] | None = None) -> None:
        """Refuse a route whose variants take different inputs; warn for such a shadow.

        ``inputs_of(model, version)`` gives the model's inputs as ``(name, datatype, shape)`` (-1 =
        any size), or None when unknown (not loaded); unknown models are not compared. Every model
        variant of a route must accept what its first model variant accepts: the same input names,
        the same datatypes and shapes of the same rank whose fixed sizes agree. Raises
        TrafficConfigError naming ``routes.R.variants.V.model`` with both signatures.
        """
        refs: dict[str, tuple] = {}  # route name -> (variant, model, inputs) of its first known model
        for route, kind, item, t in self._model_targets():
            sig = inputs_of(t.model, t.version)
            if sig is None:
                continue
            ref = refs.setdefault(route.name, (item.name, t.model, tuple(sig)))
            why = _inputs_mismatch(ref[2], tuple(sig))
            if why is None:
                continue
            where = f"routes.{route.name}.{kind}.{item.name}.model"
            msg = (f"model {t.model!r} takes {_fmt_inputs(sig)} but variant {ref[0]!r} (model {ref[1]!r}) "
                   f"takes {_fmt_inputs(ref[2])}: {why}")
            if kind == "variants":
                raise TrafficConfigError(self.source, where, msg + "; a client of the route could not call both")
            if warn is not None:
                warn(f"{self.source}: {where}: {msg}; every mirrored request to it fails (counted)")

    def _model_targets(self):
        """``(route, "variants"|"shadows", item, target)`` for every variant and shadow that names a
        model (not another route), routes in file order, variants before shadows."""
        for route in self.routes.values():
            for kind, items in (("variants", route.variants), ("shadows", route.shadows)):
                for item in items:
                    if item.target.model is not None:
                        yield route, kind, item, item.target


def _fmt_inputs(sig) -> str:
    return ", ".join(f"{n} {d} [{', '.join(str(x) for x in s)}]" for n, d, s in sig) or "no inputs"


def _inputs_mismatch(a, b) -> str | None:
    """Why inputs ``a`` and ``b`` (``(name, datatype, shape)`` each) cannot take the same request."""
    da, db = {n: (d, tuple(s)) for n, d, s in a}, {n: (d, tuple(s)) for n, d, s in b}
    if set(da) != set(db):
        return f"input names differ ({', '.join(sorted(da))} vs {', '.join(sorted(db))})"
    for n in sorted(da):
        (ta, sa), (tb, sb) = da[n], db[n]
        if ta != tb:
            return f"input {n!r}: datatype {ta} vs {tb}"
        if len(sa) != len(sb) or any(x != y and x != -1 and y != -1 for x, y in zip(sa, sb)):
            return f"input {n!r}: shape [{', '.join(map(str, sa))}] vs [{', '.join(map(str, sb))}]"
    return None


# --- one route <-> its YAML body (the admin RPCs GetRoute / SetRoute) ------------------------------


def route_to_dict(route: RouteConfig) -> dict:
    """The route as the mapping ``routes.<name>`` holds in a config file (current weights)."""

    def target(t: TargetConfig) -> dict:
        if t.route is not None:
            return {"route": t.route}
        return {"model": t.model, **({"version": int(t.version)} if t.version else {})}

    out: dict = {"policy": route.policy, "variants": {}}
    for v in route.variants:
        out["variants"][v.name] = target(v.target)
        if route.policy != "interleave":
            out["variants"][v.name]["weight_percent"] = v.weight_percent
    if route.shadows:
        out["shadows"] = {s.name: {**target(s.target), "fraction": s.fraction,
                                   **({"timeout_s": s.timeout_s} if s.timeout_s != DEFAULT_SHADOW_TIMEOUT_S else {})}
                          for s in route.shadows}
    if route.shadow_queue_size != DEFAULT_SHADOW_QUEUE_SIZE:
        out["shadow_queue_size"] = route.shadow_queue_size
    if route.guard is not None:
        g = route.guard
        out["guard"] = {"canary": g.canary, "steps_percent": list(g.steps_percent), "window_s": g.window_s,
                        "min_requests": g.min_requests, "max_error_rate_increase": g.max_error_rate_increase,
                        "max_p99_latency_ratio": g.max_p99_latency_ratio}
        if g.max_shadow_disagreement is not None:
            out["guard"]["max_shadow_disagreement"] = g.max_shadow_disagreement
    return out


def parse_route(name: str, text: str, source: str = "set-route") -> RouteConfig:
    """Parse one route's YAML body (what ``routes.<name>`` holds) into a checked RouteConfig.

    Route references (``route:``) are checked by the caller against the other routes.
    """
    import yaml

    _name(source, f"routes.{name}", name)
    try:
        raw = _safe_load(text)
    except yaml.YAMLError as exc:
        raise TrafficConfigError(source, f"routes.{name}", yaml_error_line(exc)) from None
    return _route(source, name, raw)


# --- parsing ---------------------------------------------------------------------------------------


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a route or variant pasted twice under the same name would replace the first)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def _mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden below it
                continue
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given above)", key_node.start_mark)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_error_line(exc: Exception) -> str:
    """One line for a PyYAML error (whose ``str`` spans several lines with a caret drawing), e.g.
    ``not valid YAML at line 4, column 12: mapping values are not allowed here``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if not problem:
        problem = " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    if context and context != problem:
        problem = f"{problem} ({context})"
    return f"not valid YAML{where}: {problem}"


def load_traffic_config(path: str | os.PathLike) -> TrafficConfig:
    """Read and check a traffic config file; TrafficConfigError naming the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrafficConfigError(str(p), "", f"cannot read the traffic config: {exc}") from None
    return parse_traffic_config(text, source=str(p))


def parse_traffic_config(text: str, source: str = "<string>") -> TrafficConfig:
    """Parse YAML text (format version 1) into a checked :class:`TrafficConfig`."""
    import yaml

    try:
        raw = _safe_load(text)
    except yaml.YAMLError as exc:
        raise TrafficConfigError(source, "", yaml_error_line(exc)) from None
    if not isinstance(raw, dict):
        raise TrafficConfigError(source, "", f"expected a mapping at the top level, got {type(raw).__name__}")
    _known(source, "", raw, ("version", "revision", "routes"))
    if "version" not in raw:
        raise TrafficConfigError(source, "version", f"required (the format version, {FORMAT_VERSION})")
    version = raw["version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise TrafficConfigError(source, "version", f"unsupported format version {version!r}; "
                                 f"this pyserve reads version {FORMAT_VERSION}")
    revision = raw.get("revision", "")
    if revision is None:
        revision = ""
    if not isinstance(revision, (str, int, float)) or isinstance(revision, bool):
        raise TrafficConfigError(source, "revision", f"must be a string, got {revision!r}")
    routes_raw = raw.get("routes") or {}
    if not isinstance(routes_raw, dict):
        raise TrafficConfigError(source, "routes", f"must be a mapping of route name -> route, got "
                                 f"{type(routes_raw).__name__}")
    routes: dict[str, RouteConfig] = {}
    for name, r in routes_raw.items():
        _name(source, f"routes.{name}", name)
        routes[name] = _route(source, name, r)
    _check_route_refs(source, routes)
    return TrafficConfig(version=FORMAT_VERSION, revision=str(revision), routes=routes, source=source)


def _known(source: str, where: str, raw: dict, known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            raise TrafficConfigError(source, path, f"unknown field; known fields: {', '.join(known)}")


def _name(source: str, where: str, name: Any) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "," in name or "/" in name:
        raise TrafficConfigError(source, where, f"a name must be a non-empty string without spaces, ',' or '/'; "
                                 f"got {name!r}")


def _number(source: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = (" (YAML read it as text: an exponent needs a dot and a sign there, e.g. 1.0e-9, "
                        "not 1e-9)")
            except ValueError:
                pass
        raise TrafficConfigError(source, where, f"must be a number, got {value!r}{hint}")
    return float(value)


def _check_weight(source: str, where: str, value: Any) -> float:
    w = _number(source, where, value)
    if w < 0 or w > 100:
        raise TrafficConfigError(source, where, f"must be in [0, 100] (percent), got {value!r}")
    return w


def _check_sum(source: str, where: str, weights: Mapping[str, float]) -> None:
    total = sum(weights.values())
    if abs(total - 100.0) > WEIGHT_SUM_TOLERANCE:
        shown = ", ".join(f"{n}={w:g}" for n, w in weights.items())
        raise TrafficConfigError(source, where, f"weight_percent must sum to 100, got {total:g} ({shown})")


def _target(source: str, where: str, raw: dict) -> TargetConfig:
    has_model, has_route = "model" in raw, "route" in raw
    if has_model == has_route:
        raise TrafficConfigError(source, where, "give exactly one of 'model' (a repository model) or 'route' "
                                 "(another route)")
    if has_route:
        if "version" in raw:
            raise TrafficConfigError(source, f"{where}.version", "a 'route' target has no version")
        _name(source, f"{where}.route", raw["route"])
        return TargetConfig(route=raw["route"])
    _name(source, f"{where}.model", raw["model"])
    version = raw.get("version", "")
    if version is None:
        version = ""
    if isinstance(version, bool) or not isinstance(version, (int, str)) or \
            (version != "" and not str(version).isdigit()):
        raise TrafficConfigError(source, f"{where}.version", f"must be a non-negative integer, got {version!r}")
    return TargetConfig(model=raw["model"], version=str(int(version)) if version != "" else "")


def _route(source: str, name: str, r: Any) -> RouteConfig:
    where = f"routes.{name}"
    if not isinstance(r, dict):
        raise TrafficConfigError(source, where, f"must be a mapping, got {type(r).__name__}")
    _known(source, where, r, ("policy", "variants", "shadows", "shadow_queue_size", "guard"))
    policy = r.get("policy")
    if policy not in POLICIES:
        raise TrafficConfigError(source, f"{where}.policy", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    vraw = r.get("variants")
    if not isinstance(vraw, dict) or not vraw:
        raise TrafficConfigError(source, f"{where}.variants", "required: a non-empty mapping of variant name -> "
                                 "{model, version, weight_percent}")
    variants = []
    for vname, v in vraw.items():
        vw = f"{where}.variants.{vname}"
        _name(source, vw, vname)
        if not isinstance(v, dict):
            raise TrafficConfigError(source, vw, f"must be a mapping, got {type(v).__name__}")
        _known(source, vw, v, ("model", "version", "route", "weight_percent"))
        target = _target(source, vw, v)
        if policy == "interleave":
            if "weight_percent" in v:
                raise TrafficConfigError(source, f"{vw}.weight_percent",
                                         "an interleave route has no weights (both variants rank every request)")
            weight = 50.0
        elif "weight_percent" in v:
            weight = _check_weight(source, f"{vw}.weight_percent", v["weight_percent"])
        elif len(vraw) == 1:
            weight = 100.0
        else:
            raise TrafficConfigError(source, f"{vw}.weight_percent", "required when a route has several variants")
        variants.append(VariantConfig(vname, target, weight))
    if policy == "interleave" and len(variants) != 2:
        raise TrafficConfigError(source, f"{where}.variants", f"an interleave route needs exactly two variants, "
                                 f"got {len(variants)}")
    if policy != "interleave":
        _check_sum(source, f"{where}.variants", {v.name: v.weight_percent for v in variants})

    shadows = []
    sraw = r.get("shadows") or {}
    if not isinstance(sraw, dict):
        raise TrafficConfigError(source, f"{where}.shadows", f"must be a mapping, got {type(sraw).__name__}")
    if policy == "interleave" and sraw:
        raise TrafficConfigError(source, f"{where}.shadows", "an interleave route cannot have shadows (its answer is "
                                 "a merged list of two rankers, with nothing single to compare a shadow with); "
                                 "shadow a route or model that serves one ranker instead")
    for sname, s in sraw.items():
        sw = f"{where}.shadows.{sname}"
        _name(source, sw, sname)
        if sname in vraw:
            raise TrafficConfigError(source, sw, "a shadow cannot have the name of a variant of the same route")
        if not isinstance(s, dict):
            raise TrafficConfigError(source, sw, f"must be a mapping, got {type(s).__name__}")
        _known(source, sw, s, ("model", "version", "route", "fraction", "timeout_s"))
        target = _target(source, sw, s)
        fraction = _number(source, f"{sw}.fraction", s.get("fraction", 1.0))
        if not 0.0 <= fraction <= 1.0:
            raise TrafficConfigError(source, f"{sw}.fraction", f"must be in [0, 1], got {s.get('fraction')!r}")
        if target.route == name:
            raise TrafficConfigError(source, f"{sw}.route", f"route {name!r} cannot shadow itself")
        if target.route is not None:
            # a copy sent through another route would be that route's live traffic: its split, guard
            # (rollback), counts, impressions and feedback records (see docs/traffic.md)
            raise TrafficConfigError(source, f"{sw}.route", f"a shadow must name a model, not a route ({target.route!r}):"
                                     " a copy sent through a route would act as that route's live traffic (its "
                                     "guard, counts and feedback records); shadow the model of the variant to test")
        timeout_s = _number(source, f"{sw}.timeout_s", s.get("timeout_s", DEFAULT_SHADOW_TIMEOUT_S))
        if timeout_s <= 0:
            raise TrafficConfigError(source, f"{sw}.timeout_s", f"must be > 0 (seconds), got {s.get('timeout_s')!r}")
        shadows.append(ShadowConfig(sname, target, fraction, timeout_s))
    if policy == "shadow" and not shadows:
        raise TrafficConfigError(source, f"{where}.shadows", "policy 'shadow' needs at least one shadow")

    qsize = r.get("shadow_queue_size", DEFAULT_SHADOW_QUEUE_SIZE)
    if isinstance(qsize, bool) or not isinstance(qsize, int) or qsize < 1:
        raise TrafficConfigError(source, f"{where}.shadow_queue_size", f"must be an integer >= 1, got {qsize!r}")

    guard = None
    if r.get("guard") is not None:
        guard = _guard(source, f"{where}.guard", r["guard"], policy, variants)
    return RouteConfig(name, policy, tuple(variants), tuple(shadows), qsize, guard)


def _guard(source: str, where: str, g: Any, policy: str, variants: list[VariantConfig]) -> GuardConfig:
    if not isinstance(g, dict):
        raise TrafficConfigError(source, where, f"must be a mapping, got {type(g).__name__}")
    _known(source, where, g, ("canary", "steps_percent", "window_s", "min_requests", "max_error_rate_increase",
                              "max_p99_latency_ratio", "max_shadow_disagreement"))
    if policy != "canary":
        raise TrafficConfigError(source, where, f"a guard needs policy 'canary', the route's policy is {policy!r}")
    if len(variants) != 2:
        raise TrafficConfigError(source, where, f"a guard needs exactly two variants (baseline and canary), "
                                 f"the route has {len(variants)}")
    canary = g.get("canary")
    names = [v.name for v in variants]
    if canary not in names:
        raise TrafficConfigError(source, f"{where}.canary", f"unknown variant {canary!r}; the route's variants are "
                                 f"{', '.join(names)}")
    steps_raw = g.get("steps_percent", list(GuardConfig.steps_percent))
    if not isinstance(steps_raw, list) or not steps_raw:
        raise TrafficConfigError(source, f"{where}.steps_percent", f"must be a non-empty list, got {steps_raw!r}")
    steps = []
    for i, s in enumerate(steps_raw):
        v = _number(source, f"{where}.steps_percent[{i}]", s)
        if not 0 < v <= 100:
            raise TrafficConfigError(source, f"{where}.steps_percent[{i}]", f"must be in (0, 100], got {s!r}")
        if steps and v <= steps[-1]:
            raise TrafficConfigError(source, f"{where}.steps_percent[{i}]",
                                     f"steps must increase strictly; {s!r} follows {steps[-1]:g}")
        steps.append(v)
    window_s = _number(source, f"{where}.window_s", g.get("window_s", GuardConfig.window_s))
    if window_s <= 0:
        raise TrafficConfigError(source, f"{where}.window_s", f"must be > 0 (seconds), got {g.get('window_s')!r}")
    mreq = g.get("min_requests", GuardConfig.min_requests)
    if isinstance(mreq, bool) or not isinstance(mreq, int) or mreq < 1:
        raise TrafficConfigError(source, f"{where}.min_requests", f"must be an integer >= 1, got {mreq!r}")
    err = _number(source, f"{where}.max_error_rate_increase",
                  g.get("max_error_rate_increase", GuardConfig.max_error_rate_increase))
    if not 0 <= err <= 1:
        raise TrafficConfigError(source, f"{where}.max_error_rate_increase", f"must be in [0, 1], got {err!r}")
    p99 = _number(source, f"{where}.max_p99_latency_ratio",
                  g.get("max_p99_latency_ratio", GuardConfig.max_p99_latency_ratio))
    if p99 <= 0:
        raise TrafficConfigError(source, f"{where}.max_p99_latency_ratio", f"must be > 0, got {p99!r}")
    dis = g.get("max_shadow_disagreement")
    if dis is not None:
        dis = _number(source, f"{where}.max_shadow_disagreement", dis)
        if not 0 <= dis <= 1:
            raise TrafficConfigError(source, f"{where}.max_shadow_disagreement", f"must be in [0, 1], got {dis!r}")
    cw = next(v.weight_percent for v in variants if v.name == canary)
    if all(abs(cw - s) > 1e-9 for s in steps):
        raise TrafficConfigError(source, f"{where[:-len('.guard')]}.variants.{canary}.weight_percent",
                                 f"the guarded canary's weight {cw:g} must be one of guard.steps_percent "
                                 f"({', '.join(f'{s:g}' for s in steps)}): the guard starts from that step")
    return GuardConfig(canary, tuple(steps), window_s, mreq, err, p99, dis)


def _check_route_refs(source: str, routes: Mapping[str, RouteConfig]) -> None:
    """Every ``route:`` target names a known route, and following them never comes back (no cycle)."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for r in routes.values():
        out = edges.setdefault(r.name, [])
        for kind, items in (("variants", r.variants), ("shadows", r.shadows)):
            for item in items:
                t = item.target
                if t.route is None:
                    continue
                f = f"routes.{r.name}.{kind}.{item.name}.route"
                if t.route not in routes:
                    raise TrafficConfigError(source, f, f"unknown route {t.route!r}; routes: {', '.join(routes)}")
                if t.route == r.name:
                    raise TrafficConfigError(source, f, f"route {r.name!r} cannot route to itself")
                if kind == "shadows" and routes[t.route].policy == "interleave":
                    raise TrafficConfigError(source, f, f"route {t.route!r} interleaves: its answer (a merged list "
                                             "of two rankers) cannot be compared with this route's; shadow one of "
                                             "its rankers instead")
                out.append((t.route, f))
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt, f in edges.get(node, ()):
            if state.get(nxt) == 1:
                cycle = " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}"
                raise TrafficConfigError(source, f, f"routes form a cycle: {cycle}")
            if state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in routes:
        if state.get(name) is None:
            visit(name, [name])
