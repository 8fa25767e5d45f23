"""The container and KubeRay manifests: they parse, their entrypoints are real commands, their spec is valid."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from orchestration.cli import build_parser
from orchestration.spec import validate_spec

INFRA = Path(__file__).resolve().parents[1] / "infra"


def manifests() -> dict[str, dict]:
    """Every Kubernetes object under infra/, by `kind/name`."""
    objects = {}
    for path in sorted(INFRA.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def one(objects: dict[str, dict], kind: str) -> dict:
    (found,) = [document for name, document in objects.items() if name.startswith(f"{kind}/")]
    return found


def test_manifests_parse_and_cover_cluster_job_schedule_and_tracking():
    objects = manifests()
    assert sorted(objects) == ["ConfigMap/exvideo-workflow", "Deployment/mlflow", "PersistentVolumeClaim/exvideo-data",
                               "PersistentVolumeClaim/mlflow-artifacts", "RayCluster/exvideo",
                               "RayCronJob/exvideo-nightly", "RayJob/exvideo-workflow", "Service/mlflow"]
    assert one(objects, "RayJob")["spec"]["clusterSelector"]["ray.io/cluster"] == "exvideo"
    assert one(objects, "RayCronJob")["spec"]["jobTemplate"]["clusterSelector"]["ray.io/cluster"] == "exvideo"
    assert len(one(objects, "RayCronJob")["spec"]["schedule"].split()) == 5
    assert "mlflow" in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]


def test_entrypoints_name_existing_commands_and_a_valid_mounted_spec():
    objects = manifests()
    head = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    config_map = next(v["configMap"]["name"] for v in head["volumes"] if "configMap" in v)
    assert config_map == one(objects, "ConfigMap")["metadata"]["name"]
    entrypoints = [one(objects, "RayJob")["spec"]["entrypoint"],
                   one(objects, "RayCronJob")["spec"]["jobTemplate"]["entrypoint"]]
    for entrypoint in entrypoints:
        program, *argv = shlex.split(entrypoint)
        assert program == "exvideo"
        args = build_parser().parse_args(argv)  # exits (fails the test) on an unknown subcommand or option
        assert args.command == "run" and args.func.__name__ == "_run_workflow"
        spec_file = Path(args.spec)
        assert str(spec_file.parent) == mounts["specs"]
        spec = validate_spec(yaml.safe_load(one(objects, "ConfigMap")["data"][spec_file.name]))
        assert spec.stages == ["preprocess", "train", "generate", "evaluate"] and spec.train["use_gpu"] is True


def test_gpu_workers_share_compiled_kernels_on_the_shared_volume():
    objects = manifests()
    (workers,) = one(objects, "RayCluster")["spec"]["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in workers["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    cache = Path({e["name"]: e["value"] for e in container["env"]}["TORCHINDUCTOR_CACHE_DIR"])
    shared = [name for name, path in mounts.items() if cache.is_relative_to(path)]
    assert shared and claims[shared[0]] == "exvideo-data"
    assert objects["PersistentVolumeClaim/exvideo-data"]["spec"]["accessModes"] == ["ReadWriteMany"]  # one cache


def test_dockerfile_installs_the_project_on_a_cuda_base():
    text = (INFRA / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:" in text
    root = INFRA.parent
    copied = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    assert all((root / name).exists() for name in copied), copied
    assert "pip install ." in text and "exvideo --help" in text
