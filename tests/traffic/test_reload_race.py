"""Hot reload of a file caught in the middle of a write (found by our adversarial pass: the gRPC
hot-reload test failed once under load, the poller having read the file between the truncation
and the write of ``Path.write_text``): an empty file is judged only when a second poll still finds
it empty, and a file that changed while it was read is read again instead of refused."""

from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

from pyserve.server import traffic as traffic_mod
from pyserve.server.traffic import TrafficRouter
from pyserve.traffic import TrafficController

GOOD = textwrap.dedent("""
    version: 1
    revision: {rev}
    routes:
      r:
        policy: canary
        variants: {{a: {{model: m}}}}
""")


def _router(tmp_path):
    path = tmp_path / "traffic.yaml"
    path.write_text(GOOD.format(rev="one"))
    plane = SimpleNamespace(repository=SimpleNamespace(root=str(tmp_path)))
    router = TrafficRouter(plane, TrafficController(), config_path=path, shadow_isolation="inline")
    router.check_config = lambda cfg: None  # no repository here
    router.apply(router.load_file())
    return router, path


def _bump(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # a new mtime, as a write gives


def test_an_empty_file_is_judged_at_the_second_poll(tmp_path):
    router, path = _router(tmp_path)
    path.write_text("")  # truncated by a writer that has not written yet...
    _bump(path)
    assert router.poll_once() is None and router.reloads_refused == 0
    path.write_text(GOOD.format(rev="two"))  # ...who then writes
    _bump(path)
    assert router.poll_once() is True and router.controller.config.revision == "two"
    path.write_text("")  # emptied for good: refused at the second look, the previous config kept
    _bump(path)
    assert router.poll_once() is None
    assert router.poll_once() is False and router.reloads_refused == 1
    assert "expected a mapping at the top level" in router.last_reload_error
    assert router.controller.config.revision == "two"


def test_a_file_that_changed_while_it_was_read_is_read_again(tmp_path, monkeypatch):
    router, path = _router(tmp_path)
    real = traffic_mod.load_traffic_config
    calls = []

    def racing(p):
        calls.append(p)
        if len(calls) == 1:  # the first read sees half a file; the writer finishes meanwhile
            path.write_text(GOOD.format(rev="three"))
            _bump(path)
            return real_text("version: 1\nroutes:\n  r:\n    policy: can")
        return real(p)

    def real_text(text):
        from pyserve.traffic import parse_traffic_config

        return parse_traffic_config(text, source=str(path))

    monkeypatch.setattr(traffic_mod, "load_traffic_config", racing)
    path.write_text(GOOD.format(rev="half"))
    _bump(path)
    assert router.poll_once() is None and router.reloads_refused == 0
    assert router.poll_once() is True and router.controller.config.revision == "three"
    assert len(calls) == 2
