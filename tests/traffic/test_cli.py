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


def test_serve_refuses_a_route_to_a_version_that_is_not_served(tmp_path, capsys):
    """The versions a model serves are known only after the repository loaded: the server must
    still refuse the config (exit 2, field named) rather than serve a route answering NOT_FOUND."""
    torch = pytest.importorskip("torch")
    from pyserve.artifact import save

    repo = tmp_path / "repo"
    for version in (1, 2):  # no config.yaml: only the highest version (2) serves
        save(repo / "lin" / str(version) / "model.pyserve", torch.nn.Linear(4, 2), (torch.randn(2, 4),),
             model_name="lin")
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text("version: 1\nroutes:\n  mnist:\n    policy: canary\n    variants:\n"
                   "      a: {model: lin, version: 2, weight_percent: 90}\n      b: {model: lin, version: 1, weight_percent: 10}\n")
    rc = main(["serve", "--model-repository", str(repo), "--grpc-port", "0", "--host", "127.0.0.1",
               "--traffic-config", str(cfg), "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"pyserve serve: error: {cfg}: routes.mnist.variants.b.version: model 'lin' has no "
                              "version '1'"), err[-1]


def test_every_help_page_prints(capsys):
    """`--help` of every command and traffic action exits 0 (argparse formats help strings with %)."""
    for argv in (["--help"], ["serve", "--help"], ["traffic", "--help"], ["export", "--help"], ["compress", "--help"],
                 ["inspect", "--help"], ["infer", "--help"], ["evaluate", "--help"],
                 *[["traffic", a, "--help"] for a in ("status", "report", "get-route", "set-route", "set-weights",
                                                        "promote", "rollback", "feedback")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, argv
        assert "usage:" in capsys.readouterr().out


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


def test_serve_prints_a_yaml_error_on_one_line(tmp_path, capsys):
    """PyYAML's message spans several lines (with a caret drawing): the CLI prints one, with the place."""
    repo = tmp_path / "repo"
    (repo / "lenet300" / "1").mkdir(parents=True)
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text("version: 1\nroutes:\n  mnist:\n    policy: canary\n   variants: {a: {model: lenet300}}\n")
    rc = main(["serve", "--model-repository", str(repo), "--grpc-port", "0", "--host", "127.0.0.1",
               "--traffic-config", str(cfg), "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"pyserve serve: error: {cfg}: not valid YAML at line 5, column ")


def _lin(repo, name, n_in, version=1):
    torch = pytest.importorskip("torch")
    from pyserve.artifact import save

    save(repo / name / str(version) / "model.pyserve", torch.nn.Linear(n_in, 2), (torch.randn(2, n_in),),
         model_name=name)


def _serve_with(tmp_path, repo, routes: str) -> int:
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text("version: 1\nroutes:\n  r:\n" + routes)
    return main(["serve", "--model-repository", str(repo), "--grpc-port", "0", "--host", "127.0.0.1",
                 "--traffic-config", str(cfg), "--log-level", "ERROR"])


def test_serve_refuses_a_variant_whose_model_failed_to_load(tmp_path, capsys):
    repo = tmp_path / "repo"
    _lin(repo, "good", 4)
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "1" / "model.pyserve").write_bytes(b"not an artifact")
    rc = _serve_with(tmp_path, repo, "    policy: canary\n    variants:\n"
                     "      a: {model: good, weight_percent: 90}\n      b: {model: bad, weight_percent: 10}\n")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"pyserve serve: error: {tmp_path / 'traffic.yaml'}: routes.r.variants.b.model: "
                              "model 'bad' failed to load: "), err[-1]
    assert len(err) == 1


def test_serve_refuses_variants_with_different_inputs(tmp_path, capsys):
    repo = tmp_path / "repo"
    _lin(repo, "four", 4)
    _lin(repo, "five", 5)
    rc = _serve_with(tmp_path, repo, "    policy: canary\n    variants:\n"
                     "      a: {model: four, weight_percent: 90}\n      b: {model: five, weight_percent: 10}\n")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"pyserve serve: error: {tmp_path / 'traffic.yaml'}: routes.r.variants.b.model: "
                              "model 'five' takes "), err[-1]
    assert "shape [-1, 4] vs [-1, 5]" in err[-1]
