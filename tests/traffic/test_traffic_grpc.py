"""Every policy end to end over gRPC with tritonclient, on two real LeNet-300-100 variants.

References are computed another way: the variant a key must get from a fresh WeightedSplit, the
logits from the torch modules the artifacts were built from, the interleaving from team_draft with
the server's seed, the A/B test from the statistics of the metrics we sent.
"""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
import urllib.request

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
torch = pytest.importorskip("torch")

from pyserve.cli.main import main as cli_main  # noqa: E402
from pyserve.protocol import traffic_codec  # noqa: E402
from pyserve.server import ServerThread  # noqa: E402
from pyserve.traffic import WeightedSplit, team_draft, two_proportion_z_test  # noqa: E402

CANARY = textwrap.dedent("""
    version: 1
    revision: canary-1
    routes:
      mnist:
        policy: canary
        variants:
          stable: {model: lenet300, version: 1, weight_percent: 80}
          candidate: {model: lenet300c, weight_percent: 20}
""")


def _input(x):
    t = tc.InferInput("images", list(x.shape), "FP32")
    t.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t


def _param(result, name):
    p = result.get_response().parameters.get(name)
    return None if p is None else p.string_param


def _infer(client, route, x, key=None, headers=None, request_id=""):
    params = {"routing_key": key} if key is not None else None
    return client.infer(route, [_input(x)], parameters=params, headers=headers, request_id=request_id)


def _admin(url):
    import grpc

    ch = grpc.insecure_channel(url)
    return ch, traffic_codec.traffic_stub(ch)


def _torch_logits(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture()
def images(lenet_built):
    return lenet_built[1]["test"][0]


def _serve(repo, config_text, tmp_path, **kw):
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text(config_text)
    return ServerThread(repo, host="127.0.0.1", grpc_port=0, traffic_config=cfg, **kw), cfg


def test_canary_split_is_sticky_and_names_the_variant(lenet_repo, lenet_built, images, tmp_path, capsys):
    info = lenet_built[1]
    srv, _ = _serve(lenet_repo, CANARY, tmp_path)
    ref = WeightedSplit("mnist", [("stable", 80), ("candidate", 20)])
    with srv:
        c = tc.InferenceServerClient(srv.url)
        seen = {}
        for i in range(60):
            x = images[i:i + 1]
            key = f"user-{i}"
            r = _infer(c, "mnist", x, key=key)
            v = _param(r, "pyserve_variant")
            assert v == ref.choose(key), key
            module = info["fp32"] if v == "stable" else info["compressed"]
            np.testing.assert_allclose(r.as_numpy("logits"), _torch_logits(module, x), rtol=1e-4, atol=1e-4)
            seen[key] = v
        assert set(seen.values()) == {"stable", "candidate"}
        # sticky: again by parameter, and by the x-routing-key metadata
        for key, v in list(seen.items())[:15]:
            assert _param(_infer(c, "mnist", images[:1], key=key), "pyserve_variant") == v
            assert _param(_infer(c, "mnist", images[:1], headers={"x-routing-key": key}), "pyserve_variant") == v
        # the request id is the key when nothing else is given
        assert _param(_infer(c, "mnist", images[:1], request_id="user-3"), "pyserve_variant") == seen["user-3"]
        # `pyserve infer` prints the response parameters (the request id is the key here), both clients
        np.save(tmp_path / "x.npy", images[:1])
        for client in ("tritonclient", "pyserve"):
            assert cli_main(["infer", "--url", srv.url, "--model", "mnist", "--input", str(tmp_path / "x.npy"),
                             "--id", "user-3", "--client", client]) == 0
            assert f"parameters: pyserve_variant={seen['user-3']}\n" in capsys.readouterr().out
        # a model name with no route behaves as before
        direct = c.infer("lenet300", [_input(images[:2])])
        assert _param(direct, "pyserve_variant") is None
        np.testing.assert_allclose(direct.as_numpy("logits"), _torch_logits(info["fp32"], images[:2]), atol=1e-4)
        # metadata of a route: its first variant's model
        assert c.get_model_metadata("mnist").name == "lenet300" and c.is_model_ready("mnist")
        # a version on a route is refused
        with pytest.raises(tc.InferenceServerException, match="picks the model version"):
            c.infer("mnist", [_input(images[:1])], model_version="1")

        # set weights over the admin RPC: atomic, from the next request; bad weights refused, kept
        ch, stub = _admin(srv.url)
        pb = traffic_codec.pb
        stub.SetWeights(pb.SetWeightsRequest(route="mnist", weights={"stable": 0, "candidate": 100}))
        assert {_param(_infer(c, "mnist", images[:1], key=f"user-{i}"), "pyserve_variant") for i in range(20)} == \
            {"candidate"}
        import grpc

        with pytest.raises(grpc.RpcError) as e:
            stub.SetWeights(pb.SetWeightsRequest(route="mnist", weights={"stable": -10, "candidate": 110}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("set-weights: routes.mnist.variants.")  # the map's order is not kept
        assert "weight_percent: must be in [0, 100] (percent)" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.SetWeights(pb.SetWeightsRequest(route="nope", weights={"a": 100}))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        got = traffic_codec.weights_to_dict(stub.GetRoute(pb.GetRouteRequest(route="mnist")).weights)
        assert list(got.items()) == [("stable", 0.0), ("candidate", 100.0)]
        ch.close()
        c.close()


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_shadow_never_changes_the_primary_and_measures_divergence(lenet_repo, lenet_built, images, tmp_path,
                                                                   isolation):
    """Divergence against the torch modules, with shadows in the worker process (priority normal,
    so a loaded test machine cannot starve it) and in the server process."""
    info = lenet_built[1]
    cfg = textwrap.dedent("""
        version: 1
        routes:
          mnist:
            policy: shadow
            variants: {primary: {model: lenet300}}
            shadows:
              compressed: {model: lenet300c, fraction: 1.0}
              broken: {model: broken, fraction: 1.0}
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path, metrics_port=0, shadow_isolation=isolation, shadow_priority="normal")
    x = images[:200]
    with srv:
        c = tc.InferenceServerClient(srv.url)
        for i in range(0, 200, 8):
            r = _infer(c, "mnist", x[i:i + 8], key=f"k{i}")
            assert _param(r, "pyserve_variant") == "primary"
            np.testing.assert_allclose(r.as_numpy("logits"), _torch_logits(info["fp32"], x[i:i + 8]), atol=1e-4)
        router = srv.server.traffic
        import asyncio

        asyncio.run_coroutine_threadsafe(router.drain_shadows(), srv._loop).result(60)
        ch, stub = _admin(srv.url)
        rep = json.loads(stub.Report(traffic_codec.pb.ReportRequest(route="mnist")).json)["mnist"]
        ch.close()
        s = rep["shadows"]["compressed"]
        assert s["requests_count"] == 25 and s["requests_errors"] == 0 and s["compared"] == 25
        pa, sa = _torch_logits(info["fp32"], x), _torch_logits(info["compressed"], x)
        assert s["top1_agreement"] == pytest.approx(np.mean(pa.argmax(1) == sa.argmax(1)))
        assert s["max_abs_diff"] == pytest.approx(np.abs(pa - sa).max(), rel=1e-3)
        cos = np.sum(pa * sa, 1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(sa, axis=1))
        assert s["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-4)  # the batches are equal-sized
        b = rep["shadows"]["broken"]
        assert b["requests_count"] == 25 and b["requests_errors"] == 25
        assert rep["variants"]["primary"]["errors"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_bound_port}/metrics") as f:
            text = f.read().decode()
        assert 'pyserve_traffic_shadow_requests_total{outcome="error",route="mnist",shadow="broken"} 25.0' in text
        assert 'pyserve_traffic_requests_total{outcome="ok",route="mnist",variant="primary"} 25.0' in text
        assert "pyserve_traffic_shadow_top1_agreement" in text
        proc = router.shadow_process
        if isolation == "process":  # both shadows ran in one worker process (broken: a plug-in backend)
            assert proc.starts == 1 and proc.pid is not None and proc.pid != os.getpid()
        else:
            assert proc is None
        c.close()


def _drain(srv):
    import asyncio

    asyncio.run_coroutine_threadsafe(srv.server.traffic.drain_shadows(), srv._loop).result(120)


SHADOWED = textwrap.dedent("""
    version: 1
    routes:
      mnist:
        policy: shadow
        variants: {primary: {model: lenet300}}
        shadows: {compressed: {model: lenet300c, fraction: 1.0}}
""")


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")
def test_shadow_worker_runs_at_sched_idle(lenet_repo, images, tmp_path):
    srv, _ = _serve(lenet_repo, SHADOWED, tmp_path)  # the default: process, idle
    with srv:
        c = tc.InferenceServerClient(srv.url)
        _infer(c, "mnist", images[:4], key="k")
        proc = srv.server.traffic.shadow_process
        deadline = time.monotonic() + 60
        policy = None
        while time.monotonic() < deadline:
            pid = proc.pid
            if pid is not None:
                try:
                    policy = os.sched_getscheduler(pid)
                except OSError:
                    policy = None
                if policy == os.SCHED_IDLE:
                    break
            time.sleep(0.05)
        assert pid != os.getpid() and policy == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the server itself is untouched
        c.close()


def test_shadow_worker_that_dies_is_counted_and_restarted(lenet_repo, images, tmp_path, monkeypatch):
    import signal

    from pyserve.server import _shadow_process

    monkeypatch.setattr(_shadow_process, "RESTART_BACKOFF_S", 0.5)
    srv, _ = _serve(lenet_repo, SHADOWED, tmp_path, shadow_priority="normal")
    with srv:
        c = tc.InferenceServerClient(srv.url)
        for i in range(5):
            _infer(c, "mnist", images[i:i + 1], key=f"a{i}")
        _drain(srv)
        proc = srv.server.traffic.shadow_process
        st = srv.server.traffic.controller.routes["mnist"].shadows["compressed"]
        assert proc.starts == 1 and st.requests.count == 5 and st.requests.errors == 0
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        i = 0
        while proc.starts < 2 or st.requests.count - st.requests.errors < 6:
            assert time.monotonic() < deadline, (proc.starts, st.as_dict())
            r = _infer(c, "mnist", images[:1], key=f"b{i}")  # the primary never fails meanwhile
            assert _param(r, "pyserve_variant") == "primary"
            _drain(srv)
            i += 1
            time.sleep(0.1)
        assert st.compared == st.requests.count - st.requests.errors
        c.close()


def test_poll_mode_logs_a_route_whose_model_was_removed(lenet_repo, images, tmp_path, caplog):
    import logging
    import shutil

    srv, _ = _serve(lenet_repo, CANARY, tmp_path, model_control_mode="poll", repository_poll_s=0.2)
    with caplog.at_level(logging.INFO, logger="pyserve.traffic"), srv:
        shutil.rmtree(lenet_repo / "lenet300c")
        want = ("traffic route 'mnist': routes.mnist.variants.candidate.model: model 'lenet300c' is no longer in "
                "the repository (its directory was removed); its share of the route's requests fails")
        deadline = time.monotonic() + 30
        while want not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
        assert caplog.text.count(want) == 1  # once per change, not every second
        time.sleep(1.5)
        assert caplog.text.count(want) == 1


def test_shadow_queue_drops_under_pressure(lenet_repo, images, tmp_path, variants_module):
    variants_module.write_faulty_model(lenet_repo, "slow", lenet_repo / "lenet300c/1/model.pyserve", "slow", 200)
    cfg = textwrap.dedent("""
        version: 1
        routes:
          mnist:
            policy: shadow
            variants: {primary: {model: lenet300}}
            shadows: {slow: {model: slow}}
            shadow_queue_size: 2
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path)
    with srv:
        c = tc.InferenceServerClient(srv.url)
        for i in range(30):
            _infer(c, "mnist", images[:64], key=f"k{i}")
        st = srv.server.traffic.controller.routes["mnist"].shadows["slow"]
        assert st.dropped > 0
        assert st.dropped + st.requests.count + 3 >= 30  # dropped + done + at most queue (2) + running (1)
        c.close()


def test_ab_feedback_report_and_unknown_ids(lenet_repo, images, tmp_path, capsys):
    cfg = textwrap.dedent("""
        version: 1
        routes:
          ab:
            policy: ab
            variants:
              control: {model: lenet300, weight_percent: 50}
              treatment: {model: lenet300c, weight_percent: 50}
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path, metrics_port=0)
    rng = random.Random(0)
    sent = {"control": [], "treatment": []}
    with srv:
        c = tc.InferenceServerClient(srv.url)
        ch, stub = _admin(srv.url)
        pb = traffic_codec.pb
        for i in range(120):
            r = _infer(c, "ab", images[i:i + 1], key=f"user{i}")
            arm = _param(r, "pyserve_variant")
            rid = _param(r, "pyserve_request_id")
            assert rid
            value = 1.0 if rng.random() < (0.2 if arm == "control" else 0.6) else 0.0
            sent[arm].append(value)
            fb = stub.Feedback(traffic_codec.feedback_request(rid, metric=value))
            assert (fb.route, fb.variant) == ("ab", arm)
        import grpc

        for _ in range(2):
            with pytest.raises(grpc.RpcError) as e:
                stub.Feedback(traffic_codec.feedback_request("no-such-request", metric=1.0))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        rep = json.loads(stub.Report(pb.ReportRequest(route="ab")).json)["ab"]["ab"]
        c_, t_ = sent["control"], sent["treatment"]
        assert rep[0]["metric_n"] == len(c_) and rep[0]["metric_mean"] == pytest.approx(np.mean(c_))
        ref = two_proportion_z_test(int(sum(c_)), len(c_), int(sum(t_)), len(t_))
        assert rep[1]["test"] == "two-proportion z" and rep[1]["p_value"] == pytest.approx(ref.p_value)
        assert json.loads(stub.Status(pb.StatusRequest()).json)["unknown_feedback"] == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_bound_port}/metrics") as f:
            assert 'pyserve_traffic_feedback_total{result="unknown_id"} 2.0' in f.read().decode()
        # the CLI report prints the arms, their CIs and the test
        assert cli_main(["traffic", "report", "ab", "--url", srv.url]) == 0
        out = capsys.readouterr().out
        assert "two-proportion z" in out and "95% CI" in out and "treatment" in out
        assert cli_main(["traffic", "feedback", "nope", "--metric", "1", "--url", srv.url]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err
        ch.close()
        c.close()


def test_interleaving_answers_the_team_draft_and_counts_clicks(lenet_repo, lenet_built, images, tmp_path):
    info = lenet_built[1]
    cfg = textwrap.dedent("""
        version: 1
        routes:
          rank:
            policy: interleave
            variants: {fp32: {model: lenet300}, compressed: {model: lenet300c}}
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path)
    with srv:
        c = tc.InferenceServerClient(srv.url)
        ch, stub = _admin(srv.url)
        outcomes = []
        for i in range(12):
            x = images[i:i + 2]
            key = f"q{i}"
            r = _infer(c, "rank", x, key=key)
            assert _param(r, "pyserve_variant") == "fp32,compressed"
            ids, teams = r.as_numpy("interleaved"), r.as_numpy("interleaved_team")
            ra = np.argsort(-_torch_logits(info["fp32"], x), axis=1, kind="stable")
            rb = np.argsort(-_torch_logits(info["compressed"], x), axis=1, kind="stable")
            for row in range(2):
                il = team_draft(list(ra[row]), list(rb[row]), random.Random(f"rank/{key}/{row}"))
                n = len(il.items)
                assert list(ids[row, :n]) == list(il.items) and list(teams[row, :n]) == list(il.teams)
            # click the top item of row 0: a win for whichever team contributed it
            fb = stub.Feedback(traffic_codec.feedback_request(_param(r, "pyserve_request_id"), clicked=[int(ids[0, 0])]))
            outcomes.append(fb.outcome)
            assert fb.outcome == ("win" if teams[0, 0] == 0 else "loss")
        rep = json.loads(stub.Report(traffic_codec.pb.ReportRequest(route="rank")).json)["rank"]["interleave"]
        assert (rep["wins"], rep["losses"], rep["ties"]) == (outcomes.count("win"), outcomes.count("loss"), 0)
        assert rep["impressions"] == 12
        ch.close()
        c.close()


def test_guard_rolls_back_a_failing_canary_within_one_window(lenet_repo, images, tmp_path, capsys, variants_module):
    # a canary that loads (a variant whose model failed to load is refused by the config) and then
    # fails every request once the flag exists
    flag = tmp_path / "canary-fails"
    variants_module.write_faulty_model(lenet_repo, "failing", lenet_repo / "lenet300c/1/model.pyserve", "ok",
                                       fail_if_exists=flag)
    cfg = textwrap.dedent("""
        version: 1
        revision: guarded
        routes:
          mnist:
            policy: canary
            variants:
              stable: {model: lenet300, weight_percent: 50}
              canary: {model: failing, weight_percent: 50}
            guard: {canary: canary, steps_percent: [50, 100], window_s: 30, min_requests: 10,
                    max_error_rate_increase: 0.05, max_p99_latency_ratio: 100}
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path)
    with srv:
        flag.touch()
        c = tc.InferenceServerClient(srv.url)
        t0 = time.monotonic()
        errors = 0
        for i in range(200):
            try:
                _infer(c, "mnist", images[:1], key=f"u{i}")
            except tc.InferenceServerException:
                errors += 1
            if srv.server.traffic.controller.routes["mnist"].guard.state == "rolled_back":
                break
        assert time.monotonic() - t0 < 30  # inside the first window
        assert errors == 10  # exactly min_requests canary requests failed, then the canary was out
        assert all(_param(_infer(c, "mnist", images[:1], key=f"u{i}"), "pyserve_variant") == "stable"
                   for i in range(30))
        assert cli_main(["traffic", "status", "--url", srv.url]) == 0
        out = capsys.readouterr().out
        assert "rolled_back" in out and "rollback 50% -> 0%" in out and "error rate" in out
        assert cli_main(["traffic", "promote", "mnist", "--url", srv.url]) == 0
        assert "manual_promote 0% -> 50%" in capsys.readouterr().out
        c.close()


def test_guard_promotes_a_healthy_canary(lenet_repo, images, tmp_path):
    cfg = textwrap.dedent("""
        version: 1
        routes:
          mnist:
            policy: canary
            variants:
              stable: {model: lenet300, weight_percent: 50}
              canary: {model: lenet300c, weight_percent: 50}
            guard: {canary: canary, steps_percent: [50, 100], window_s: 0.5, min_requests: 5,
                    max_error_rate_increase: 0.05, max_p99_latency_ratio: 1000}
    """)
    srv, _ = _serve(lenet_repo, cfg, tmp_path)
    with srv:
        c = tc.InferenceServerClient(srv.url)
        for i in range(40):
            _infer(c, "mnist", images[:1], key=f"u{i}")
        deadline = time.monotonic() + 10
        g = srv.server.traffic.controller.routes["mnist"].guard
        while g.state != "complete" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert g.state == "complete" and g.percent == 100
        assert {_param(_infer(c, "mnist", images[:1], key=f"u{i}"), "pyserve_variant") for i in range(20)} == {"canary"}
        c.close()


def test_hot_reload_applies_valid_and_refuses_invalid(lenet_repo, images, tmp_path, capsys):
    srv, path = _serve(lenet_repo, CANARY, tmp_path, traffic_poll_s=0.05)
    router = srv.server.traffic

    def wait(pred):
        deadline = time.monotonic() + 10
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pred()

    with srv:
        c = tc.InferenceServerClient(srv.url)
        path.write_text(CANARY.replace("canary-1", "canary-2").replace("80}", "0}").replace("20}", "100}"))
        wait(lambda: router.reloads_applied == 1)
        assert {_param(_infer(c, "mnist", images[:1], key=f"u{i}"), "pyserve_variant") for i in range(20)} == \
            {"candidate"}
        path.write_text(CANARY.replace("canary-1", "canary-3").replace("20}", "25}"))  # sums to 105
        wait(lambda: router.reloads_refused == 1)
        assert "routes.mnist.variants: weight_percent must sum to 100, got 105" in router.last_reload_error
        assert router.controller.config.revision == "canary-2"  # the previous config stays in force
        path.write_text(CANARY.replace("lenet300c", "ghost"))
        wait(lambda: router.reloads_refused == 2)
        assert "routes.mnist.variants.candidate.model" in router.last_reload_error
        path.write_text(CANARY.replace("version: 1, weight", "version: 7, weight"))
        wait(lambda: router.reloads_refused == 3)
        assert "routes.mnist.variants.stable.version: model 'lenet300' has no version '7'" in router.last_reload_error
        assert {_param(_infer(c, "mnist", images[:1], key=f"u{i}"), "pyserve_variant") for i in range(20)} == \
            {"candidate"}
        assert cli_main(["traffic", "status", "--url", srv.url]) == 0
        out = capsys.readouterr().out
        assert "revision: canary-2" in out and "3 refused" in out
        c.close()


def test_invalid_config_at_start_is_refused(lenet_repo, tmp_path):
    srv, _ = _serve(lenet_repo, CANARY.replace("policy: canary", "policy: cannary"), tmp_path)
    with pytest.raises(ValueError, match="traffic.yaml: routes.mnist.policy: must be one of"):
        srv.start()


def test_get_and_set_route_and_manual_rollback_from_the_cli(lenet_repo, images, tmp_path, capsys):
    srv, _ = _serve(lenet_repo, CANARY, tmp_path)
    with srv:
        c = tc.InferenceServerClient(srv.url)
        assert cli_main(["traffic", "get-route", "mnist", "--url", srv.url]) == 0
        body = capsys.readouterr().out
        assert "policy: canary" in body and "weight_percent: 80.0" in body
        # a new route from the YAML body, served from the next request
        new = tmp_path / "route.yaml"
        new.write_text(body.replace("80.0", "0.0").replace("20.0", "100.0"))
        assert cli_main(["traffic", "set-route", "fresh", str(new), "--url", srv.url]) == 0
        assert "route fresh (canary): stable=0%, candidate=100%" in capsys.readouterr().out
        assert _param(_infer(c, "fresh", images[:1], key="k"), "pyserve_variant") == "candidate"
        # invalid bodies are refused whole, with the field named
        new.write_text(body.replace("lenet300c", "ghost"))
        assert cli_main(["traffic", "set-route", "fresh", str(new), "--url", srv.url]) == 2
        err = capsys.readouterr().err
        assert "INVALID_ARGUMENT" in err and "routes.fresh.variants.candidate.model" in err
        new.write_text(body.replace("80.0", "81.0"))
        assert cli_main(["traffic", "set-route", "fresh", str(new), "--url", srv.url]) == 2
        assert "routes.fresh.variants: weight_percent must sum to 100, got 101" in capsys.readouterr().err
        assert _param(_infer(c, "fresh", images[:1], key="k"), "pyserve_variant") == "candidate"  # kept
        # manual rollback / promote of an unguarded two-variant route
        assert cli_main(["traffic", "rollback", "fresh", "--reason", "bad metrics", "--url", srv.url]) == 0
        assert "manual_rollback 100% -> 0% (bad metrics); stable=100%, candidate=0%" in capsys.readouterr().out
        assert _param(_infer(c, "fresh", images[:1], key="k"), "pyserve_variant") == "stable"
        assert cli_main(["traffic", "set-weights", "fresh", "stable=60", "candidate=40", "--url", srv.url]) == 0
        assert "stable=60%, candidate=40%" in capsys.readouterr().out
        c.close()


def test_stream_infer_routes_by_the_stream_metadata_key(lenet_repo, images, tmp_path):
    import queue

    srv, _ = _serve(lenet_repo, CANARY, tmp_path)
    ref = WeightedSplit("mnist", [("stable", 80), ("candidate", 20)])
    key = next(k for k in (f"user-{i}" for i in range(200)) if ref.choose(k) == "candidate")
    with srv:
        c = tc.InferenceServerClient(srv.url)
        got: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: got.put((result, error)), headers={"x-routing-key": key})
        for i in range(8):
            c.async_stream_infer("mnist", [_input(images[i:i + 1])])
        c.async_stream_infer("mnist", [_input(images[:1])], parameters={"routing_key": "user-0"})
        c.stop_stream()
        results = [got.get(timeout=30) for _ in range(9)]
        assert all(err is None for _, err in results)
        assert [_param(r, "pyserve_variant") for r, _ in results] == ["candidate"] * 8 + [ref.choose("user-0")]
        c.close()


def test_shadow_process_knows_which_backends_it_can_import(variants_module, tmp_path):
    from pyserve.backends import register_backend
    from pyserve.backends.registry import _REGISTRY
    from pyserve.server import Server
    from pyserve.server._shadow_process import ShadowProcess

    variants_module.register_faulty_backend()  # a class from a module loaded from a file path
    register_backend("lambda-test", lambda path, executor=None: None, "model.x")
    try:
        p = ShadowProcess(tmp_path)
        assert p.portable("pyserve") and p.portable("onnxruntime")  # registered as "module:attr"
        assert p.portable("faulty")
        assert not p.portable("lambda-test") and not p.portable("no-such-backend")
    finally:
        _REGISTRY.pop("lambda-test", None)
    with pytest.raises(ValueError, match="shadow_isolation must be one of process, inline, got 'thread'"):
        Server(tmp_path, shadow_isolation="thread")
    with pytest.raises(ValueError, match="shadow_priority must be one of idle, nice, normal, got 'low'"):
        Server(tmp_path, shadow_priority="low")
