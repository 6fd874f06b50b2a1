"""When the router does shadow work (pyserve.server.traffic): the request path only counts and queues
a mirrored copy; the copy is sent on its way only when no routed request is running (or once
SHADOW_MAX_DEFER_S has passed); the per-route bound (shadow_queue_size waiting + the running one)
drops and counts the rest. A stand-in data plane records the order of calls, so the references
are the calls themselves; the divergence is checked against pyserve.traffic.divergence."""

from __future__ import annotations

import asyncio
import textwrap
from types import SimpleNamespace

import numpy as np

from pyserve.protocol.types import InferRequest, InferResponse, Tensor
from pyserve.server import traffic as traffic_mod
from pyserve.server.traffic import TrafficRouter
from pyserve.traffic import TrafficController, divergence, parse_traffic_config

CFG = textwrap.dedent("""
    version: 1
    routes:
      r:
        policy: shadow
        variants: {primary: {model: p}}
        shadows: {s: {model: sh, fraction: 1.0}}
        shadow_queue_size: 4
""")

P_OUT = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
S_OUT = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)


class Plane:
    """Answers ``p`` with P_OUT and ``sh`` with S_OUT; ``gate`` holds the primary while unset."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.repository = SimpleNamespace(root="/nonexistent")

    async def infer_model(self, request: InferRequest) -> InferResponse:
        self.calls.append(request.model_name)
        if request.model_name == "p":
            await self.gate.wait()
        out = P_OUT if request.model_name == "p" else S_OUT
        return InferResponse(request.model_name, "1", (Tensor("y", "FP32", out),))


def _router() -> tuple[TrafficRouter, Plane]:
    plane = Plane()
    ctl = TrafficController()
    ctl.apply(parse_traffic_config(CFG))
    return TrafficRouter(plane, ctl, shadow_isolation="inline"), plane


def _req(i: int) -> InferRequest:
    return InferRequest("r", (Tensor("x", "FP32", np.full((1, 2), i, np.float32)),),
                        parameters={"routing_key": f"k{i}"})


def test_the_request_path_only_queues_and_the_copy_runs_after_the_answer():
    async def go():
        router, plane = _router()
        resp = await router.infer(_req(0))
        assert resp.parameters["pyserve_variant"] == "primary"
        np.testing.assert_array_equal(resp.outputs[0].data, P_OUT)
        assert plane.calls == ["p"] and len(router._mirrors) == 1  # queued, not sent yet
        assert router.shadows_outstanding == 1
        await router.drain_shadows(timeout_s=10)
        assert plane.calls == ["p", "sh"] and router.shadows_outstanding == 0
        st = router.controller.routes["r"].shadows["s"]
        want = divergence({"y": P_OUT}, {"y": S_OUT})
        assert st.requests.count == 1 and st.requests.errors == 0 and st.compared == 1
        assert st.top1_agreement == want.top1_agreement == 0.0
        assert st.max_abs_diff == want.max_abs_diff
        await router.stop()

    asyncio.run(go())


def test_shadow_work_waits_while_a_routed_request_runs(monkeypatch):
    monkeypatch.setattr(traffic_mod, "SHADOW_MAX_DEFER_S", 0.3)

    async def go():
        router, plane = _router()
        await router.infer(_req(0))  # copy 0 queued
        plane.gate.clear()
        held = asyncio.create_task(router.infer(_req(1)))  # a second request is running (held)
        for _ in range(20):
            await asyncio.sleep(0)
        assert plane.calls == ["p", "p"]  # the queued copy did not run meanwhile
        await asyncio.sleep(0.05)
        assert plane.calls == ["p", "p"]
        await asyncio.sleep(0.4)  # past SHADOW_MAX_DEFER_S: the copy runs even so
        assert plane.calls == ["p", "p", "sh"]
        plane.gate.set()
        await held
        await router.drain_shadows(timeout_s=10)
        assert plane.calls == ["p", "p", "sh", "sh"]
        await router.stop()

    asyncio.run(go())


def test_the_bound_drops_and_counts_copies_beyond_the_queue():
    async def go():
        router, plane = _router()
        plane.gate.clear()
        # nine requests in flight at once: no quiet moment, so nothing is dispatched meanwhile
        tasks = [asyncio.create_task(router.infer(_req(i))) for i in range(9)]
        for _ in range(5):
            await asyncio.sleep(0)
        plane.gate.set()
        await asyncio.gather(*tasks)
        st = router.controller.routes["r"].shadows["s"]
        assert st.dropped == 9 - (4 + traffic_mod.SHADOW_WORKERS)  # queue 4 + the running one
        await router.drain_shadows(timeout_s=10)
        assert st.requests.count == 4 + traffic_mod.SHADOW_WORKERS and st.requests.errors == 0
        assert plane.calls.count("sh") == st.requests.count and router.shadows_outstanding == 0
        await router.stop()

    asyncio.run(go())
