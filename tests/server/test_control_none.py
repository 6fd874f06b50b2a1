"""``--model-control-mode none``: a model directory that appears after start-up never loads, so nothing
may route to it. Before this was fixed, the directory was found by RepositoryIndex or by a traffic
config reload with the state "not loaded", which a traffic reload accepted as a variant ("never asked
to load"), and every request on the route then failed with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import textwrap

import numpy as np
import pytest

from pyserve.protocol.errors import Unavailable
from pyserve.server.repository import NEVER_LOADED_IN_MODE_NONE, ModelRepository, ModelState

ECHO = "backend: test-echo\n"


def test_late_directory_in_mode_none_says_it_never_loads(tmp_path, write_model):
    write_model(tmp_path, "a", 1, config=ECHO)
    repo = ModelRepository(tmp_path, control_mode="none")
    asyncio.run(repo.load_all())
    write_model(tmp_path, "late", 1, config=ECHO)
    names = {e.name: e for e in repo.index()}  # RepositoryIndex rescans the directory
    assert names["a"].state == "READY" and names["late"].state == "UNAVAILABLE"
    assert names["late"].reason == NEVER_LOADED_IN_MODE_NONE
    with pytest.raises(Unavailable, match="model 'late' is not available: its directory appeared after start-up"):
        repo.get_ready("late")
    assert not repo.get("late").ready and repo.get("late").state is ModelState.UNAVAILABLE
    asyncio.run(repo.unload_all())


@pytest.mark.parametrize("mode", ["poll", "explicit"])
def test_late_directory_in_other_modes_is_only_not_loaded_yet(tmp_path, write_model, mode):
    """poll loads it on the next scan and explicit on a load RPC: there "not loaded" is the truth."""
    write_model(tmp_path, "a", 1, config=ECHO)
    repo = ModelRepository(tmp_path, control_mode=mode, startup_models=("*",))

    async def run():
        await repo.load_all()
        write_model(tmp_path, "late", 1, config=ECHO)
        assert {e.name: e.reason for e in repo.index()}["late"] == "not loaded"
        await (repo.poll() if mode == "poll" else repo.load("late"))
        assert repo.get_ready("late").current.version == "1"  # loaded and warmed up: it serves
        await repo.unload_all()

    asyncio.run(run())


ROUTE = textwrap.dedent("""
    version: 1
    revision: {revision}
    routes:
      front:
        policy: canary
        variants:
          only: {{model: {model}, weight_percent: 100}}
""")


def test_traffic_reload_refuses_a_route_to_a_model_mode_none_never_loads(tmp_path, write_model):
    tc = pytest.importorskip("tritonclient.grpc")
    from pyserve.server import ServerThread
    from test_server_grpc import fp32_input  # tests/server is on sys.path

    repo = tmp_path / "repo"
    write_model(repo, "a", 1, config=ECHO)
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text(ROUTE.format(revision="r1", model="a"))
    srv = ServerThread(repo, host="127.0.0.1", grpc_port=0, model_control_mode="none", traffic_config=cfg,
                       traffic_poll_s=3600)  # reloads driven by poll_once() below
    with srv:
        router = srv.server.traffic
        write_model(repo, "late", 1, config=ECHO)
        cfg.write_text(ROUTE.format(revision="r2", model="late"))
        assert router.poll_once() is False  # refused: the previous config stays in force
        assert "routes.front.variants.only.model" in router.last_reload_error
        assert "model control mode 'none' loads models only at start-up" in router.last_reload_error
        assert router.controller.config.revision == "r1"
        c = tc.InferenceServerClient(srv.url)
        x = np.full((1, 2), 3.0, np.float32)
        result = c.infer("front", [fp32_input(x)])  # still served, by the model that loaded
        assert np.array_equal(result.as_numpy("y"), 2 * x) and result.get_response().model_name == "a"
        c.close()
