"""docs/deploy.md stays in step with deploy/: the files it names exist, and the canary config it
shows is the one in the canary overlay."""

from __future__ import annotations

import re

import yaml

from deploy_helpers import K8S, ROOT

DOC = ROOT / "docs" / "deploy.md"


def test_paths_named_in_the_guide_exist():
    text = DOC.read_text()
    paths = set(re.findall(r"`((?:deploy|docs|tests)/[\w./-]+?)/?`", text))
    paths |= {f"deploy/k8s/{p}" for p in re.findall(r"`((?:base|overlays|components)/[\w./-]+?)/?`", text)}
    assert "deploy/Dockerfile" in paths and "deploy/k8s/overlays/canary/traffic.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_canary_config_shown_is_the_overlays():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    shown = [yaml.safe_load(b) for b in blocks if "routes:" in b]
    assert shown == [yaml.safe_load((K8S / "overlays" / "canary" / "traffic.yaml").read_text())]
