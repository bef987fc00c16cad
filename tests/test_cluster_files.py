"""The cluster files (ray-cluster.yaml, cluster/): they parse, and their versions, paths and commands agree.

These are static checks; nothing here starts a cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from geobatch.pipeline import WORKER_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
AUTOSCALER = REPO / "ray-cluster.yaml"
CLUSTER = REPO / "cluster"
WEIGHTS = "/opt/geobatch/weights"


def load(path: Path) -> dict:
    (document,) = yaml.safe_load_all(path.read_text())
    return document


def cluster_specs() -> list[pytest.param]:
    """The RayCluster's spec and the RayJob's embedded cluster spec: both must satisfy the same checks."""
    return [
        pytest.param(load(CLUSTER / "raycluster.yaml")["spec"], id="RayCluster"),
        pytest.param(load(CLUSTER / "rayjob.yaml")["spec"]["rayClusterSpec"], id="RayJob"),
    ]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", [AUTOSCALER, *sorted(CLUSTER.glob("*.yaml"))], ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_constraints_pin_the_installed_ray():
    assert f"ray=={ray.__version__}" in (REPO / "constraints.txt").read_text().splitlines()


# --- ray-cluster.yaml (Ray autoscaler) ---


def test_autoscaler_config_satisfies_rays_own_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(AUTOSCALER), schema)


def test_autoscaler_has_an_aws_cpu_head_and_a_gpu_worker_type():
    config = load(AUTOSCALER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU", 0) == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] >= 1  # GPUs seen at run start


def test_autoscaler_setup_installs_geobatch_with_the_constraints_file():
    commands = load(AUTOSCALER)["setup_commands"]
    installs = [c for c in commands if "pip install" in c and ".[geopixel]" in c]
    assert len(installs) == 1
    assert "-c constraints.txt" in installs[0]
    assert "cd ~/geobatch" in installs[0]
    assert load(AUTOSCALER)["file_mounts"] == {"~/geobatch": "."}


def test_autoscaler_provisions_weights_at_the_fixed_path_at_setup():
    commands = " ; ".join(load(AUTOSCALER)["setup_commands"])
    assert re.search(rf"aws s3 sync (--\S+ )*s3://\S+ {WEIGHTS}/?(\s|$)", commands)


def test_autoscaler_starts_ray_from_the_venv_geobatch_is_installed_in():
    config = load(AUTOSCALER)
    venv = re.search(r"python3\.11 -m venv (\S+)", " ; ".join(config["setup_commands"])).group(1)
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert f"{venv}/bin/ray start --head" in head[-1] and "--autoscaling-config=" in head[-1]
    assert f"{venv}/bin/ray start --address=$RAY_HEAD_IP:6379" in worker[-1]
    assert all(c.startswith(f"{venv}/bin/ray stop") for c in (head[0], worker[0]))


# --- cluster/Dockerfile ---


def test_dockerfile_builds_on_the_official_ray_image_of_the_installed_version():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-(gpu|cu\d+)", base)


def test_dockerfile_installs_with_constraints_and_bakes_in_no_weights():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt '\.\[geopixel\]'", text)
    assert "ENV GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR" in text
    copies = re.findall(r"^(?:COPY|ADD) .*$", text, re.MULTILINE)
    assert copies and not any("weights" in c or ".venv" in c for c in copies)


def test_cluster_workers_run_with_the_environment_of_local_workers():
    settings = [f"{name}={value}" for name, value in WORKER_ENVIRONMENT.items()]
    (env,) = re.findall(r"^ENV ZARR.*$", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    (start,) = [c for c in load(AUTOSCALER)["worker_start_ray_commands"] if "ray start" in c]
    assert set(settings) <= set(env.split()[1:])
    assert set(settings) <= set(re.search(r"export ([^;]+);", start).group(1).split())


# --- cluster/raycluster.yaml and cluster/rayjob.yaml (KubeRay) ---


@pytest.mark.parametrize(("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_use_the_v1_api(name, kind):
    manifest = load(CLUSTER / name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)


@pytest.mark.parametrize("spec", cluster_specs())
def test_cluster_ray_version_matches_the_installed_ray(spec):
    assert spec["rayVersion"] == ray.__version__


@pytest.mark.parametrize("spec", cluster_specs())
def test_cluster_has_an_autoscaled_gpu_worker_group(spec):
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups
    for group in gpu_groups:
        limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert limit >= 1
        assert group["rayStartParams"]["num-gpus"] == str(limit)
        assert group["maxReplicas"] > group["minReplicas"] >= 1  # GPUs are detected when a run starts
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


@pytest.mark.parametrize("spec", cluster_specs())
def test_ray_start_params_are_strings(spec):
    """KubeRay takes rayStartParams as a map of strings."""
    for params in [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
        assert all(isinstance(value, str) for value in params.values())


@pytest.mark.parametrize("spec", cluster_specs())
def test_every_pod_mounts_weights_read_only_and_the_shared_data_volume(spec):
    for pod in pod_specs(spec):
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            weights, data = mounts[WEIGHTS], mounts["/data"]
            assert weights.get("readOnly") is True
            assert claims[weights["name"]] == {"claimName": "geobatch-weights", "readOnly": True}
            assert claims[data["name"]]["claimName"] == "geobatch-data"
            assert not data.get("readOnly", False)


@pytest.mark.parametrize("spec", cluster_specs())
def test_every_pod_runs_one_image(spec):
    images = {c["image"] for pod in pod_specs(spec) for c in pod["containers"]}
    assert images == {"geobatch:latest"}


def test_rayjob_runs_geobatch_and_shuts_its_cluster_down():
    job = load(CLUSTER / "rayjob.yaml")["spec"]
    command = job["entrypoint"].split()
    assert command[:2] == ["geobatch", "run"]
    assert command[2].startswith("/data/")  # on the shared volume, the same path on every pod
    assert (REPO / "jobs" / Path(command[2]).name).is_file()
    assert job["shutdownAfterJobFinishes"] is True
    assert job["submissionMode"] == "K8sJobMode"


def test_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    for path in ["ray-cluster.yaml", "cluster/Dockerfile", "cluster/raycluster.yaml", "cluster/rayjob.yaml"]:
        assert path in text and (REPO / path).is_file()
    assert "ray up ray-cluster.yaml" in text and "ray down ray-cluster.yaml" in text
    assert "geobatch run jobs/example.yaml" in text and "--address auto" in text
