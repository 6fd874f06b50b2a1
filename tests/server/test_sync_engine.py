"""The pieces the synchronous gRPC engine adds: slots shared by threads and the event loop, version
in-flight counting from other threads, engine selection. (Every server test runs on both engines
through the ``grpc_engine`` fixture; these test the parts alone.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pyserve.server.scheduler import Slots


def test_slots_are_shared_by_threads_and_the_event_loop():
    async def main():
        slots = Slots(1)
        assert slots.acquire_sync() and slots.free == 0
        order = []

        async def loop_waiter():
            await slots.acquire()
            order.append("loop")

        task = asyncio.ensure_future(loop_waiter())
        await asyncio.sleep(0.05)
        assert not task.done()  # the thread holds the only slot
        threading.Thread(target=slots.release).start()  # released from another thread
        await asyncio.wait_for(task, 5)
        assert order == ["loop"] and slots.free == 0
        # a thread now waits for the slot the loop holds
        got = []
        t = threading.Thread(target=lambda: got.append(slots.acquire_sync()))
        t.start()
        await asyncio.sleep(0.05)
        assert got == []
        slots.release()
        await asyncio.get_running_loop().run_in_executor(None, t.join, 5)
        assert got == [True] and slots.free == 0
        slots.release()
        assert slots.free == 1

    asyncio.run(main())


def test_a_cancelled_loop_waiter_leaves_the_queue_and_loses_no_slot():
    async def main():
        slots = Slots(1)
        await slots.acquire()
        task = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        slots.release()
        assert slots.free == 1
        # a slot handed over (from a thread) just as its waiter is cancelled is passed on, not lost
        await slots.acquire()
        task = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0.01)
        threading.Thread(target=slots.release).start()
        await asyncio.sleep(0)  # the hand-over is scheduled on the loop; cancel before it runs
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.05)
        assert slots.free == 1

    asyncio.run(main())


def test_a_thread_waiting_for_a_slot_gives_up_when_its_rpc_ends():
    slots = Slots(1)
    assert slots.acquire_sync()
    t0 = time.monotonic()
    deadline = t0 + 0.2
    assert slots.acquire_sync(lambda: time.monotonic() < deadline) is False
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert slots.free == 0  # nothing taken by the waiter that gave up
    with pytest.raises(ValueError, match="n >= 1"):
        Slots(0)


def test_model_version_released_from_another_thread_wakes_drained():
    from pyserve.server.repository import ModelVersion

    async def main():
        mv = ModelVersion("m", "1", None, None, None, None, None)
        mv.acquire()
        mv.acquire()
        waiter = asyncio.ensure_future(mv.drained())
        await asyncio.sleep(0.02)
        threading.Thread(target=mv.release).start()
        await asyncio.sleep(0.05)
        assert not waiter.done() and mv.inflight == 1
        threading.Thread(target=mv.release).start()
        await asyncio.wait_for(waiter, 5)
        assert mv.inflight == 0

    asyncio.run(main())


def test_engine_selection_is_checked(tmp_path, monkeypatch):
    from pyserve.server import Server

    monkeypatch.delenv("PYSERVE_GRPC_ENGINE", raising=False)
    assert Server(tmp_path).grpc_engine == "aio"
    assert Server(tmp_path, grpc_engine="sync").grpc_engine == "sync"
    with pytest.raises(ValueError, match="grpc_engine must be one of sync, aio, native, got 'uvloop'"):
        Server(tmp_path, grpc_engine="uvloop")
    with pytest.raises(ValueError, match="grpc_threads must be an int >= 1, got 0"):
        Server(tmp_path, grpc_threads=0)
    monkeypatch.setenv("PYSERVE_GRPC_ENGINE", "sync")
    assert Server(tmp_path).grpc_engine == "sync"
    assert Server(tmp_path, grpc_engine="aio").grpc_engine == "aio"  # the argument wins
    monkeypatch.setenv("PYSERVE_GRPC_ENGINE", "fast")
    with pytest.raises(ValueError, match="PYSERVE_GRPC_ENGINE must be one of sync, aio, native, got 'fast'"):
        Server(tmp_path)


def test_serve_cli_refuses_a_bad_thread_count(tmp_path, capsys):
    from pyserve.cli.main import main

    assert main(["serve", "--model-repository", str(tmp_path), "--grpc-threads", "0"]) == 2
    assert "--grpc-threads must be >= 1, got 0" in capsys.readouterr().err
