"""deploy/k8s: every overlay renders with ``kubectl kustomize`` and ``kubernetes-validate --strict``
accepts every object, for the oldest and newest Kubernetes targeted; then the wiring between the
objects (selectors, ports, probes, shutdown timing, volumes) is checked on the rendered output."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import textwrap

import kubernetes_validate
import pytest

from deploy_helpers import (
    K8S,
    K8S_VERSIONS,
    OVERLAY_ID,
    OVERLAYS,
    container,
    flag_values,
    one,
    one_named,
    render,
    render_overlay,
    render_text,
    run_tool,
)

KINDS = sorted(["ConfigMap", "Service", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"])
POD_LABELS = {"app.kubernetes.io/name": "pyserve", "app.kubernetes.io/component": "server"}


def deployment(overlay: str) -> dict:
    return one(render_overlay(overlay), "Deployment", "pyserve")


def serve_flags(overlay: str) -> dict[str, str]:
    return flag_values(container(deployment(overlay))["args"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ("base", *OVERLAYS), ids=OVERLAY_ID)
def test_overlay_renders_and_validates_strict(overlay, version, tmp_path):
    objs = render_overlay(overlay)
    assert sorted(o["kind"] for o in objs) == KINDS
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render_text(K8S / ("base" if overlay == "base" else f"overlays/{overlay}")))
    out = run_tool("kubernetes-validate", "--strict", "-k", version, str(rendered))
    assert out.returncode == 0, out.stdout + out.stderr
    passed = re.findall(r"passed for resource (\S+) against version", out.stdout + out.stderr)
    assert sorted(passed) == sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in objs)


def test_strict_validation_rejects_an_unknown_field():
    """The validator really is strict: a misspelt field in the pod spec fails."""
    dep = deployment("cpu")
    kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)  # as rendered: fine
    bad = copy.deepcopy(dep)
    container(bad)["readinessProbe"]["grpc"]["servcie"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_selectors_match_the_pod_labels(overlay):
    objs = render_overlay(overlay)
    dep = one(objs, "Deployment", "pyserve")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert POD_LABELS.items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == POD_LABELS
    for name in ("pyserve", "pyserve-headless"):
        assert one(objs, "Service", name)["spec"]["selector"] == POD_LABELS
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == POD_LABELS
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in spread:
        assert c["labelSelector"]["matchLabels"] == POD_LABELS
        assert c["maxSkew"] == 1
    target = one(objs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "pyserve")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_ports_probes_and_service_agree_with_the_serve_flags(overlay):
    objs = render_overlay(overlay)
    dep = one(objs, "Deployment", "pyserve")
    c = container(dep)
    flags = serve_flags(overlay)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(flags["--grpc-port"]), "metrics": int(flags["--metrics-port"])} == {"grpc": 8001, "metrics": 8002}
    svc = {p["name"]: (p["port"], p["targetPort"]) for p in one(objs, "Service", "pyserve")["spec"]["ports"]}
    assert svc == {"grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    headless = one(objs, "Service", "pyserve-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["name"] for p in headless["ports"]] == ["grpc"]
    # native gRPC probes on the health service of the gRPC port (test_dockerfile.py checks that
    # a running server answers SERVING for these service names)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == 8001
    assert c["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    # loading may take the startup probe's whole budget before liveness can restart the pod
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_termination_grace_covers_prestop_and_exit_timeout(overlay):
    dep = deployment(overlay)
    c = container(dep)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    exit_timeout_s = float(serve_flags(overlay)["--exit-timeout-s"])
    grace_s = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop_s >= 1
    # the grace period runs from the start of preStop: sleep, then SIGTERM and the drain, then
    # at least 5 s to unload before SIGKILL
    assert grace_s >= pre_stop_s + exit_timeout_s + 5, (grace_s, pre_stop_s, exit_timeout_s)
    assert (pre_stop_s, exit_timeout_s, grace_s) == (5, 30, 45)  # as documented in deployment.yaml


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_traffic_configmap_is_mounted_for_hot_reload(overlay):
    objs = render_overlay(overlay)
    dep = one(objs, "Deployment", "pyserve")
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["name"] == "pyserve-traffic"  # no content hash: edits update it in place
    path = serve_flags(overlay)["--traffic-config"]
    directory, _, key = path.rpartition("/")
    assert key in cm["data"] and list(cm["data"]) == [key]
    assert float(serve_flags(overlay)["--traffic-poll-s"]) > 0
    volume = one_named(dep["spec"]["template"]["spec"]["volumes"], "traffic")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    mount = one_named(container(dep)["volumeMounts"], "traffic")
    assert mount["mountPath"] == directory
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    assert mount["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_model_repository_is_filled_by_the_init_container(overlay):
    dep = deployment(overlay)
    spec = dep["spec"]["template"]["spec"]
    init = container(dep, "models", init=True)
    assert init["image"].startswith("pyserve-models:")
    assert "cp -R /models/. /mnt/models/" in init["command"][-1]
    assert one_named(init["volumeMounts"], "models")["mountPath"] == "/mnt/models"
    mount = one_named(container(dep)["volumeMounts"], "models")
    assert mount["mountPath"] == serve_flags(overlay)["--model-repository"] == "/models"
    assert mount["readOnly"] is True
    assert "emptyDir" in one_named(spec["volumes"], "models")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_pods_run_as_non_root_with_a_read_only_root(overlay, dockerfile):
    dep = deployment(overlay)
    spec = dep["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    user = dockerfile.of_stage(dockerfile.final_stage, "USER")[-1].args
    assert dockerfile.args(dockerfile.final_stage)["PYSERVE_UID"] == str(pod["runAsUser"]) != "0"
    assert user.startswith("${PYSERVE_UID}")
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"]
    assert "emptyDir" in one_named(spec["volumes"], "tmp")  # the one writable place


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_autoscaler_and_disruption_budget(overlay):
    objs = render_overlay(overlay)
    dep = one(objs, "Deployment", "pyserve")
    assert "replicas" not in dep["spec"]  # the autoscaler owns it
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["metrics"][0]["resource"]["target"]["type"] == "Utilization"
    pdb = one(objs, "PodDisruptionBudget")["spec"]
    # with maxUnavailable 1 and at least 2 replicas, a drain always leaves one serving
    assert pdb["maxUnavailable"] == 1 and hpa["minReplicas"] >= 2
    assert hpa["maxReplicas"] >= hpa["minReplicas"]


def test_images_per_overlay():
    def images(overlay):
        spec = deployment(overlay)["spec"]["template"]["spec"]
        return container(deployment(overlay))["image"], spec["initContainers"][0]["image"]

    assert images("base") == ("pyserve", "pyserve-models")  # placeholders: each overlay sets both
    assert images("cpu") == ("pyserve:0.1.0-cpu", "pyserve-models:v1")
    assert images("gpu") == ("pyserve:0.1.0-cuda", "pyserve-models:v1")
    assert images("canary") == ("pyserve:0.1.0-cpu", "pyserve-models:v2")


def test_gpu_overlay_asks_for_one_gpu_and_tolerates_gpu_nodes():
    objs = render_overlay("gpu")
    dep = one(objs, "Deployment", "pyserve")
    resources = container(dep)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    tolerations = dep["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 4
    for overlay in ("cpu", "canary"):
        spec = deployment(overlay)["spec"]["template"]["spec"]
        assert "tolerations" not in spec
        assert "nvidia.com/gpu" not in container(deployment(overlay))["resources"].get("limits", {})


def test_canary_changes_only_the_traffic_config_and_the_models():
    """overlays/canary = overlays/cpu + the canary's traffic file, model image and model list."""
    cpu, canary = render_overlay("cpu"), render_overlay("canary")
    for objs in (cpu, canary):
        one(objs, "ConfigMap")["data"] = None
        init = container(one(objs, "Deployment", "pyserve"), "models", init=True)
        init["image"] = None
        one_named(init["env"], "PYSERVE_MODELS")["value"] = None
    assert canary == cpu


def test_servicemonitor_component_scrapes_the_metrics_port_once(tmp_path):
    """The optional ServiceMonitor, added to the gpu and canary overlays as a user would."""
    for overlay in ("gpu", "canary"):
        d = tmp_path / overlay
        write_overlay(d, f"""\
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources:
              - {os.path.relpath(K8S / 'overlays' / overlay, d)}
            components:
              - {os.path.relpath(K8S / 'components' / 'servicemonitor', d)}
            """)
        objs = render(d)
        monitor = one(objs, "ServiceMonitor", "pyserve")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in objs if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()]
        assert [s["metadata"]["name"] for s in selected] == ["pyserve"]  # not the headless one too
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]
        assert "metrics" in port_names
        for obj in objs:  # the rest is unchanged and still valid
            if obj["kind"] != "ServiceMonitor":
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        assert sorted(o["kind"] for o in objs if o["kind"] != "ServiceMonitor") == KINDS


def test_editing_the_traffic_file_changes_only_the_configmap(tmp_path):
    """Moving the canary is a ConfigMap update, not a rollout: the Deployment (pod template
    included) renders the same whatever the weights, so `kubectl apply -k` restarts nothing."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    traffic = copy_root / "overlays" / "canary" / "traffic.yaml"
    text = traffic.read_text()
    moved = text.replace("weight_percent: 95}", "weight_percent: 75}").replace("weight_percent: 5}", "weight_percent: 25}")
    assert moved != text
    traffic.write_text(moved)
    before, after = render_overlay("canary"), render(copy_root / "overlays" / "canary")
    assert one(after, "ConfigMap")["data"]["traffic.yaml"] == moved
    assert [o for o in after if o["kind"] != "ConfigMap"] == [o for o in before if o["kind"] != "ConfigMap"]


def write_overlay(d, text: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "kustomization.yaml").write_text(textwrap.dedent(text))


def test_registry_set_in_an_overlay_reaches_both_images(tmp_path):
    """What docs/deploy.md tells a user to do: newName in the overlay they apply (canary here,
    which also changes the model image's tag)."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    kustomization = copy_root / "overlays" / "canary" / "kustomization.yaml"
    text = kustomization.read_text()
    text = text.replace("  - name: pyserve\n    newTag:", "  - name: pyserve\n    newName: reg.example/ml/pyserve\n    newTag:")
    text = text.replace("  - name: pyserve-models\n    newTag:",
                        "  - name: pyserve-models\n    newName: reg.example/ml/pyserve-models\n    newTag:")
    assert text.count("reg.example") == 2
    kustomization.write_text(text)
    dep = one(render(copy_root / "overlays" / "canary"), "Deployment", "pyserve")
    assert container(dep)["image"] == "reg.example/ml/pyserve:0.1.0-cpu"
    assert container(dep, "models", init=True)["image"] == "reg.example/ml/pyserve-models:v2"


def test_gpu_canary_as_the_guide_describes(tmp_path):
    """overlays/canary with components/gpu in place of components/cpu and the CUDA image: the GPU
    sizing of overlays/gpu with the canary's models and traffic."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    kustomization = copy_root / "overlays" / "canary" / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("../../components/cpu") == 1 and text.count("newTag: 0.1.0-cpu") == 1
    kustomization.write_text(text.replace("../../components/cpu", "../../components/gpu")
                             .replace("newTag: 0.1.0-cpu", "newTag: 0.1.0-cuda"))
    gpu_canary, gpu, canary = render(copy_root / "overlays" / "canary"), render_overlay("gpu"), render_overlay("canary")
    for obj in gpu_canary:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    assert one(gpu_canary, "ConfigMap") == one(canary, "ConfigMap")
    assert container(one(gpu_canary, "Deployment"), "models", init=True) == container(one(canary, "Deployment"), "models", init=True)
    assert container(one(gpu_canary, "Deployment")) == container(one(gpu, "Deployment"))
    assert one(gpu_canary, "HorizontalPodAutoscaler") == one(gpu, "HorizontalPodAutoscaler")


def test_init_container_script_copies_the_repository_and_stops_on_a_missing_version(tmp_path):
    """The initContainer's shell script, run here with sh on stand-ins for /models (the model
    image) and /mnt/models (the emptyDir)."""
    init = container(deployment("canary"), "models", init=True)
    assert init["command"][:2] == ["sh", "-c"]
    image, volume = tmp_path / "image", tmp_path / "volume"
    script = init["command"][2].replace("/mnt/models", str(volume)).replace("/models", str(image))
    models = one_named(init["env"], "PYSERVE_MODELS")["value"]

    def run(env_models):
        if volume.exists():
            shutil.rmtree(volume)
        volume.mkdir()
        return subprocess.run(["sh", "-c", script], env={"PYSERVE_MODELS": env_models, "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, timeout=60)

    for version in (1, 2):
        (image / "lenet300" / str(version)).mkdir(parents=True)
        (image / "lenet300" / str(version) / "model.pyserve").write_bytes(b"v%d" % version)
    (image / "lenet300" / "config.yaml").write_text("name: lenet300\n")
    ok = run(models)
    assert ok.returncode == 0, ok.stderr
    assert (volume / "lenet300" / "2" / "model.pyserve").read_bytes() == b"v2"
    assert (volume / "lenet300" / "config.yaml").read_text() == "name: lenet300\n"
    shutil.rmtree(image / "lenet300" / "2")  # a v1-only image under the canary overlay
    missing = run(models)
    assert missing.returncode == 1
    assert "the model image has no lenet300/2" in missing.stderr
