"""The traffic ConfigMap of each overlay: what kustomize puts in it is the file in the repository,
it is a well-formed traffic config (format version 1: routes whose variants' weights sum to 100),
and every model it routes to is in the model repository the overlay's initContainer requires.

The last tests load it with pyserve's own loader (``pyserve.traffic.load_traffic_config``); they
skip, saying so, on a branch without the traffic controller and must pass once it is merged.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import yaml

from deploy_helpers import K8S, OVERLAY_ID, OVERLAYS, container, one, one_named, render_overlay

SOURCES = {  # the file each overlay's ConfigMap is generated from
    "base": K8S / "base" / "traffic.yaml",
    "cpu": K8S / "base" / "traffic.yaml",
    "gpu": K8S / "base" / "traffic.yaml",
    "canary": K8S / "overlays" / "canary" / "traffic.yaml",
}
POLICIES = {"canary", "ab", "shadow", "interleave"}
VARIANT_FIELDS = {"model", "version", "weight_percent"}


def configmap_text(overlay: str) -> str:
    cm = one(render_overlay(overlay), "ConfigMap", "pyserve-traffic")
    (text,) = cm["data"].values()
    return text


def repository_layout(overlay: str) -> set[tuple[str, int]]:
    """(model, version) pairs the overlay's initContainer requires of the model image."""
    init = container(one(render_overlay(overlay), "Deployment", "pyserve"), "models", init=True)
    entries = one_named(init["env"], "PYSERVE_MODELS")["value"].split()
    layout = set()
    for entry in entries:
        model, version = entry.split("/")
        layout.add((model, int(version)))
    return layout


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS), ids=OVERLAY_ID)
def test_configmap_holds_the_repository_file(overlay):
    assert configmap_text(overlay) == SOURCES[overlay].read_text()


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS), ids=OVERLAY_ID)
def test_traffic_config_is_well_formed(overlay):
    """Checked here without pyserve.traffic: the contract's shape, weights summing to 100."""
    cfg = yaml.safe_load(configmap_text(overlay))
    assert cfg["version"] == 1
    assert isinstance(cfg.get("revision", ""), str)
    assert cfg["routes"], "no routes"
    for route_name, route in cfg["routes"].items():
        assert isinstance(route_name, str) and route_name
        assert route["policy"] in POLICIES
        variants = route["variants"]
        assert variants
        for name, v in variants.items():
            assert set(v) <= VARIANT_FIELDS and "model" in v and "weight_percent" in v, (route_name, name, v)
            assert isinstance(v["weight_percent"], (int, float)) and v["weight_percent"] >= 0
            if "version" in v:
                assert isinstance(v["version"], int) and v["version"] >= 1
        assert math.isclose(sum(v["weight_percent"] for v in variants.values()), 100.0), route_name


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS), ids=OVERLAY_ID)
def test_routed_models_are_in_the_model_repository(overlay):
    layout = repository_layout(overlay)
    cfg = yaml.safe_load(configmap_text(overlay))
    for route in cfg["routes"].values():
        targets = list(route["variants"].values()) + list((route.get("shadows") or {}).values())
        for v in targets:
            if "version" in v:
                assert (v["model"], v["version"]) in layout, (v, sorted(layout))
            else:  # the model's served (latest) version: any version of it will do
                assert v["model"] in {m for m, _ in layout}, (v, sorted(layout))


def test_base_sends_everything_to_stable():
    cfg = yaml.safe_load(configmap_text("base"))
    assert list(cfg["routes"]) == ["mnist"]
    assert cfg["routes"]["mnist"]["variants"] == {"stable": {"model": "lenet300", "version": 1, "weight_percent": 100}}
    assert repository_layout("base") == {("lenet300", 1)}


def test_canary_sends_5_percent_to_the_new_version():
    cfg = yaml.safe_load(configmap_text("canary"))
    assert list(cfg["routes"]) == ["mnist"]
    route = cfg["routes"]["mnist"]
    assert route["policy"] == "canary"
    stable, candidate = route["variants"]["stable"], route["variants"]["candidate"]
    assert stable["model"] == candidate["model"] == "lenet300"
    assert (stable["version"], candidate["version"]) == (1, 2)
    assert (stable["weight_percent"], candidate["weight_percent"]) == (95, 5)
    assert repository_layout("canary") == {("lenet300", 1), ("lenet300", 2)}


# ---- with pyserve's traffic loader (the traffic controller's branch) ---------------------------

needs_traffic = pytest.mark.skipif(
    importlib.util.find_spec("pyserve.traffic") is None,
    reason="pyserve.traffic is not on this branch (the traffic controller is not merged yet)",
)


@needs_traffic
@pytest.mark.parametrize("overlay", ("base", *OVERLAYS), ids=OVERLAY_ID)
def test_configmap_loads_as_a_pyserve_traffic_config(overlay, tmp_path):
    from pyserve.traffic import load_traffic_config

    path = tmp_path / "traffic.yaml"
    path.write_text(configmap_text(overlay))  # as the kubelet writes it into the pod
    cfg = load_traffic_config(path)
    routes = getattr(cfg, "routes", None)
    if routes is not None:
        assert set(routes) == {"mnist"}


@needs_traffic
def test_pyserve_traffic_loader_refuses_a_broken_canary(tmp_path):
    """The loader used above really validates: the canary file with weights 95 + 6 is refused."""
    from pyserve.traffic import TrafficConfigError, load_traffic_config

    path = tmp_path / "traffic.yaml"
    path.write_text(configmap_text("canary").replace("weight_percent: 5}", "weight_percent: 6}"))
    with pytest.raises(TrafficConfigError, match="traffic.yaml"):
        load_traffic_config(path)
