"""The shadow worker's model (re)load rule (pyserve.server._shadow_process._fresh), on a stand-in
repository that records what the worker asked of it."""

import asyncio
from types import SimpleNamespace

from pyserve.server._shadow_process import _fresh


class FakeRepo:
    """Versions appear in ``_models`` only when ``load`` succeeds (``good`` tokens)."""

    def __init__(self, good):
        self._models = {}
        self.good = good          # model -> token its load yields, or None: the load fails
        self.discovers = 0
        self.loads = 0

    def discover(self):
        self.discovers += 1

    async def load(self, model):
        self.loads += 1
        tok = self.good.get(model)
        if tok is not None:
            self._models[model] = SimpleNamespace(versions={"1": SimpleNamespace(fingerprint=tok[0], config=tok[1])})


def _run(repo, token, tried, times=1):
    for _ in range(times):
        asyncio.run(_fresh(repo, "m", "1", token, tried))


def test_a_load_that_failed_is_not_retried_until_the_server_version_changes():
    repo, tried = FakeRepo({"m": None}), {}
    _run(repo, ("fp1", "cfg"), tried, times=5)
    assert repo.loads == 1                       # five jobs, one load attempt
    _run(repo, ("fp2", "cfg"), tried, times=3)   # the server loaded a new version: one new attempt
    assert repo.loads == 2


def test_a_loaded_version_is_reused_and_reloaded_when_its_token_changes():
    repo, tried = FakeRepo({"m": ("fp1", "cfg")}), {}
    _run(repo, ["fp1", "cfg"], tried, times=4)   # tokens arrive as lists after pickling too
    assert (repo.loads, repo.discovers) == (1, 1)  # matching version: no directory walk per job
    repo.good["m"] = ("fp2", "cfg")
    _run(repo, ("fp2", "cfg"), tried, times=2)
    assert repo.loads == 2
