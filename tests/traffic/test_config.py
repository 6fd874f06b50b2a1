"""The traffic config contract: the example parses; every bad input is refused with the field named."""

from __future__ import annotations

import textwrap

import pytest

from pyserve.traffic import TrafficConfigError, load_traffic_config, parse_traffic_config

EXAMPLE = textwrap.dedent("""
    version: 1
    revision: "2026-11-30.1"
    routes:
      mnist:
        policy: canary
        variants:
          stable:    {model: lenet300, version: 1, weight_percent: 95}
          candidate: {model: lenet300, version: 2, weight_percent: 5}
        shadows:
          compressed: {model: lenet300c, version: 1, fraction: 0.25}
        shadow_queue_size: 1024
        guard:
          canary: candidate
          steps_percent: [1, 5, 25, 50, 100]
          window_s: 60
          min_requests: 100
          max_error_rate_increase: 0.01
          max_p99_latency_ratio: 1.2
          max_shadow_disagreement: 0.02
""")


def test_contract_example_parses():
    cfg = parse_traffic_config(EXAMPLE, source="traffic.yaml")
    assert cfg.version == 1 and cfg.revision == "2026-11-30.1" and list(cfg.routes) == ["mnist"]
    r = cfg.routes["mnist"]
    assert r.policy == "canary" and r.weights == {"stable": 95.0, "candidate": 5.0}
    assert [(v.target.model, v.target.version) for v in r.variants] == [("lenet300", "1"), ("lenet300", "2")]
    assert r.shadows[0].name == "compressed" and r.shadows[0].fraction == 0.25
    assert r.guard.canary == "candidate" and r.guard.steps_percent == (1, 5, 25, 50, 100)
    assert r.guard.max_shadow_disagreement == 0.02 and r.shadow_queue_size == 1024


def test_load_from_file_names_the_file(tmp_path):
    p = tmp_path / "traffic.yaml"
    p.write_text(EXAMPLE.replace("weight_percent: 5}", "weight_percent: 6}"))
    with pytest.raises(TrafficConfigError) as e:
        load_traffic_config(p)
    assert str(e.value).startswith(f"{p}: routes.mnist.variants: weight_percent must sum to 100, got 101")


def test_version_omitted_means_served_version_and_single_variant_gets_100():
    cfg = parse_traffic_config("version: 1\nroutes:\n  r: {policy: canary, variants: {only: {model: m}}}\n")
    v = cfg.routes["r"].variants[0]
    assert v.target.version == "" and v.weight_percent == 100.0


def _routes(body: str) -> str:
    return "version: 1\nroutes:\n" + textwrap.indent(textwrap.dedent(body), "  ")


BAD = [
    # (yaml, field path, words in the message)
    (_routes("""
        r:
          policy: canary
          variants:
            a: {model: m, weight_percent: -5}
            b: {model: n, weight_percent: 105}
        """), "routes.r.variants.a.weight_percent", "[0, 100]"),
    (_routes("""
        r:
          policy: ab
          variants:
            a: {model: m, weight_percent: 50}
            b: {model: n, weight_percent: 49}
        """), "routes.r.variants", "sum to 100, got 99"),
    (_routes("""
        r:
          policy: canary
          variants:
            a: {model: m, weight_percent: 99}
            b: {model: n, weight_percent: 1}
          guard: {canary: c, steps_percent: [1, 100]}
        """), "routes.r.guard.canary", "unknown variant 'c'"),
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
          shadows: {me: {route: r}}
        """), "routes.r.shadows.me.route", "cannot shadow itself"),
    (_routes("""
        r:
          policy: canary
          variants: {a: {route: s}}
        s:
          policy: canary
          variants: {b: {route: t}}
        t:
          policy: canary
          variants: {c: {route: r}}
        """), "routes.t.variants.c.route", "cycle: r -> s -> t -> r"),
    # a shadow through another route would be that route's live traffic (break-it finding 3)
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
          shadows: {s: {route: t}}
        t:
          policy: canary
          variants: {c: {model: m}}
        """), "routes.r.shadows.s.route", "a shadow must name a model, not a route ('t')"),
    # YAML 1.1 reads 1e-9 as text: the message says so
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
          shadows: {s: {model: n, timeout_s: 1e-9}}
        """), "routes.r.shadows.s.timeout_s", "an exponent needs a dot"),
    (_routes("""
        r:
          policy: canary
          variants: {a: {route: nowhere}}
        """), "routes.r.variants.a.route", "unknown route 'nowhere'"),
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
          shadows: {s: {model: n, fraction: 1.5}}
        """), "routes.r.shadows.s.fraction", "[0, 1]"),
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
          shadows: {s: {model: n, fraction: -0.1}}
        """), "routes.r.shadows.s.fraction", "[0, 1]"),
    (_routes("""
        r:
          policy: canary
          variants: {a: {model: m, wieght_percent: 100}}
        """), "routes.r.variants.a.wieght_percent", "unknown field"),
    (_routes("""
        r: {policy: rainbow, variants: {a: {model: m}}}
        """), "routes.r.policy", "canary, ab, shadow, interleave"),
    (_routes("""
        r:
          policy: interleave
          variants: {a: {model: m}, b: {model: n}, c: {model: o}}
        """), "routes.r.variants", "exactly two"),
    (_routes("""
        r:
          policy: interleave
          variants: {a: {model: m, weight_percent: 50}, b: {model: n, weight_percent: 50}}
        """), "routes.r.variants.a.weight_percent", "no weights"),
    (_routes("""
        r:
          policy: canary
          variants:
            a: {model: m, weight_percent: 97}
            b: {model: n, weight_percent: 3}
          guard: {canary: b, steps_percent: [1, 5, 100]}
        """), "routes.r.variants.b.weight_percent", "must be one of guard.steps_percent"),
    (_routes("""
        r:
          policy: canary
          variants:
            a: {model: m, weight_percent: 99}
            b: {model: n, weight_percent: 1}
          guard: {canary: b, steps_percent: [1, 50, 25]}
        """), "routes.r.guard.steps_percent[2]", "increase strictly"),
    (_routes("""
        r:
          policy: canary
          variants: {a: {model: m, route: x}}
        """), "routes.r.variants.a", "exactly one of 'model'"),
    (_routes("""
        r:
          policy: shadow
          variants: {a: {model: m}}
        """), "routes.r.shadows", "at least one shadow"),
    ("routes: {}\n", "version", "required"),
    ("version: 2\nroutes: {}\n", "version", "unsupported format version 2"),
]


@pytest.mark.parametrize("text,field,words", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_config_is_refused_with_the_field_named(text, field, words):
    with pytest.raises(TrafficConfigError) as e:
        parse_traffic_config(text, source="traffic.yaml")
    assert e.value.field_path == field
    assert str(e.value).startswith(f"traffic.yaml: {field}: ")
    assert words in str(e.value)


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(TrafficConfigError, match="not valid YAML"):
        parse_traffic_config("version: [1\n", source="t.yaml")
    with pytest.raises(TrafficConfigError, match="mapping at the top level"):
        parse_traffic_config("- 1\n", source="t.yaml")


def test_route_chaining_without_cycle_is_accepted():
    cfg = parse_traffic_config(_routes("""
        front: {policy: canary, variants: {all: {route: back}}}
        back: {policy: canary, variants: {a: {model: m, weight_percent: 50}, b: {model: n, weight_percent: 50}}}
        """))
    assert cfg.routes["front"].variants[0].target.route == "back"


def test_with_weights_checks_every_rule():
    r = parse_traffic_config(EXAMPLE).routes["mnist"]
    assert r.with_weights({"stable": 75, "candidate": 25}).weights == {"stable": 75.0, "candidate": 25.0}
    assert r.weights == {"stable": 95.0, "candidate": 5.0}  # frozen: the original is unchanged
    for weights, field in (({"stable": 75, "candidate": 20}, "routes.mnist.variants"),
                           ({"stable": 110, "candidate": -10}, "routes.mnist.variants.stable.weight_percent"),
                           ({"stable": 100}, "routes.mnist.variants.candidate.weight_percent"),
                           ({"stable": 50, "candidate": 25, "ghost": 25}, "routes.mnist.variants.ghost")):
        with pytest.raises(TrafficConfigError) as e:
            r.with_weights(weights)
        assert e.value.field_path == field


def test_check_targets_names_the_field():
    cfg = parse_traffic_config(EXAMPLE, source="traffic.yaml")

    def exists(model, version):
        return None if model == "lenet300" else f"unknown model {model!r}"

    with pytest.raises(TrafficConfigError) as e:
        cfg.check_targets(exists)
    assert e.value.field_path == "routes.mnist.shadows.compressed.model"
    cfg.check_targets(lambda m, v: None)


def test_route_to_dict_round_trips_through_parse_route():
    import yaml

    from pyserve.traffic.config import parse_route, route_to_dict

    for r in parse_traffic_config(EXAMPLE).routes.values():
        assert parse_route(r.name, yaml.safe_dump(route_to_dict(r), sort_keys=False)) == r
    il = parse_traffic_config(_routes("""
        rank: {policy: interleave, variants: {a: {model: m, version: 3}, b: {route: other}}}
        other: {policy: canary, variants: {x: {model: n}}}
        """)).routes["rank"]
    assert parse_route("rank", yaml.safe_dump(route_to_dict(il), sort_keys=False)) == il
    with pytest.raises(TrafficConfigError) as e:
        parse_route("r", "policy: canary\nvariants: {a: {model: m, weight_percent: 50}}\n")
    assert e.value.field_path == "routes.r.variants"


def test_yaml_errors_are_one_line_with_the_place():
    with pytest.raises(TrafficConfigError) as e:
        parse_traffic_config("version: 1\nroutes:\n  a: {policy: canary\n  b: 1\n", source="t.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("t.yaml: not valid YAML at line 4, column ")


def test_a_key_given_twice_is_refused_not_silently_replaced():
    # PyYAML keeps the last of two equal keys: a route pasted twice lost the first one silently
    route = "{policy: canary, variants: {s: {model: m, weight_percent: 100}}}"
    with pytest.raises(TrafficConfigError) as e:
        parse_traffic_config(f"version: 1\nroutes:\n  a: {route}\n  a: {route}\n", source="t.yaml")
    assert str(e.value) == "t.yaml: not valid YAML at line 4, column 3: duplicate key 'a' (first given above)"
    with pytest.raises(TrafficConfigError, match="duplicate key 's'"):
        parse_traffic_config("version: 1\nroutes:\n  a: {policy: canary, variants: {s: {model: m, weight_percent: 50},"
                             " s: {model: n, weight_percent: 50}}}\n", source="t.yaml")
    from pyserve.traffic.config import parse_route

    with pytest.raises(TrafficConfigError, match="duplicate key 'policy'"):
        parse_route("a", "policy: canary\npolicy: ab\nvariants: {s: {model: m, weight_percent: 100}}\n")
    # merge keys stay usable, and may be overridden
    cfg = parse_traffic_config(f"version: 1\nroutes:\n  a: &r {route}\n  b: {{<<: *r, policy: canary}}\n")
    assert cfg.routes["b"].variants == cfg.routes["a"].variants


def test_check_loaded_refuses_a_failed_variant_and_warns_for_a_shadow():
    cfg = parse_traffic_config(EXAMPLE, source="traffic.yaml")
    warnings = []

    def failure(model, version):
        return "artifact truncated" if model == "lenet300c" else None

    cfg.check_loaded(failure, warn=warnings.append)  # lenet300c is only a shadow here: warned, accepted
    assert warnings == ["traffic.yaml: routes.mnist.shadows.compressed.model: model 'lenet300c' failed to load: "
                        "artifact truncated; every mirrored request to it fails (counted)"]
    with pytest.raises(TrafficConfigError) as e:
        cfg.check_loaded(lambda m, v: "bad file" if v == "2" else None)
    assert e.value.field_path == "routes.mnist.variants.candidate.model"
    assert "model 'lenet300' failed to load: bad file" in str(e.value)


def test_check_inputs_compares_every_variant_with_the_first():
    cfg = parse_traffic_config(EXAMPLE, source="traffic.yaml")
    img = [("images", "FP32", (-1, 784))]
    same = {("lenet300", "1"): img, ("lenet300", "2"): [("images", "FP32", (8, 784))], ("lenet300c", "1"): img}
    cfg.check_inputs(lambda m, v: same[(m, v)])  # -1 accepts any size
    cfg.check_inputs(lambda m, v: None)  # unknown (not loaded): not compared
    for other, words in (([("images", "FP16", (-1, 784))], "input 'images': datatype FP32 vs FP16"),
                         ([("images", "FP32", (-1, 28, 28))], "input 'images': shape [-1, 784] vs [-1, 28, 28]"),
                         ([("x", "FP32", (-1, 784))], "input names differ (images vs x)"),
                         ([("images", "FP32", (-1, 100))], "shape [-1, 784] vs [-1, 100]")):
        sigs = {**same, ("lenet300", "2"): other}
        with pytest.raises(TrafficConfigError) as e:
            cfg.check_inputs(lambda m, v: sigs[(m, v)])
        assert e.value.field_path == "routes.mnist.variants.candidate.model"
        assert words in str(e.value)
    warnings = []
    sigs = {**same, ("lenet300c", "1"): [("x", "FP32", (-1, 784))]}
    cfg.check_inputs(lambda m, v: sigs[(m, v)], warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("traffic.yaml: routes.mnist.shadows.compressed.model: ")
