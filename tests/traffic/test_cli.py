"""`pyserve traffic` and `pyserve serve --traffic-config` error paths: one line, exit 2."""

from __future__ import annotations

import pytest

from pyserve.cli.main import main


def test_serve_refuses_an_invalid_traffic_config_at_start(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "lenet300" / "1").mkdir(parents=True)
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text("version: 1\nroutes:\n  mnist:\n    policy: canary\n    variants:\n"
                   "      a: {model: lenet300, weight_percent: 90}\n      b: {model: ghost, weight_percent: 10}\n")
    rc = main(["serve", "--model-repository", str(repo), "--grpc-port", "0", "--host", "127.0.0.1",
               "--traffic-config", str(cfg), "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"pyserve serve: error: {cfg}: routes.mnist.variants.b.model: unknown model 'ghost'")


def test_serve_refuses_a_bad_poll_interval(tmp_path, capsys):
    assert main(["serve", "--model-repository", str(tmp_path), "--traffic-poll-s", "0"]) == 2
    assert "--traffic-poll-s must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("args,words", [
    (["set-weights", "r", "a=abc"], "expected VARIANT=PERCENT"),
    (["set-weights", "r", "=50"], "expected VARIANT=PERCENT"),
    (["feedback", "id", "--metric", "nan"], "--metric must be a finite number"),
    (["feedback", "id", "--clicked", "3", "--row", "-1"], "--row must be >= 0"),
])
def test_traffic_cli_argument_errors(args, words, capsys):
    assert main(["traffic", *args, "--url", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyserve traffic: error: ") and words in err and len(err.strip().splitlines()) == 1


def test_traffic_cli_without_a_server(capsys):
    assert main(["traffic", "status", "--url", "127.0.0.1:1", "--timeout-s", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyserve traffic: error: UNAVAILABLE") and len(err.strip().splitlines()) == 1
