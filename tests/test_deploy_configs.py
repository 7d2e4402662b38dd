"""Every deployment file validated with Ray's own schemas: serve configs (and the RayService's serveConfigV2)
with Serve's `ServeDeploySchema`, the cluster launcher config with Ray's `ray-schema.json`."""

import json
from pathlib import Path

import pytest
import yaml
import jsonschema
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = ["serve_config.yaml", "serve_config.autoscale.yaml", "serve_config.gpu.yaml", "serve_config.gpu_packed.yaml"]
STAGES = {"ingress", "vision_encoder", "audio_encoder", "thinker", "talker", "code2wav"}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _app(config: ServeDeploySchema):
    (app,) = config.applications
    return app


def _deployments(app) -> dict:
    return {d.name: d for d in app.deployments}


def test_deployment_names_are_the_apps():
    """The names the configs use are the names the code gives its deployments."""
    from deployments.app import Code2WavStage, OmniIngress, TalkerStage, ThinkerStage
    from deployments.encoders import AudioEncoderStage, VisionEncoderStage

    classes = [OmniIngress, VisionEncoderStage, AudioEncoderStage, ThinkerStage, TalkerStage, Code2WavStage]
    assert {c.name for c in classes} == STAGES


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_schema(name):
    config = ServeDeploySchema.model_validate(_load(name))
    app = _app(config)
    assert app.import_path == "deployments.app:build_app"
    ServiceSettings.model_validate(app.args)  # the builder accepts the args
    assert set(_deployments(app)) == STAGES


def test_cpu_config_fits_two_cores():
    deployments = _deployments(_app(ServeDeploySchema.model_validate(_load("serve_config.yaml"))))
    assert all(d.num_replicas == 1 and d.ray_actor_options.num_gpus == 0 for d in deployments.values())
    assert sum(d.ray_actor_options.num_cpus for d in deployments.values()) <= 2
    assert ServiceSettings.model_validate(_app(ServeDeploySchema.model_validate(_load("serve_config.yaml"))).args).model == ""


def test_autoscale_config_fits_two_cores_at_its_largest():
    """The thinker and the talker scale between 1 and 2 replicas, every other stage keeps one, and all of them at
    their most still fit on two cores; a removed replica is given longer than Serve's 20 s to finish its replies."""
    config = ServeDeploySchema.model_validate(_load("serve_config.autoscale.yaml"))
    deployments = _deployments(_app(config))
    scaled = {n: d for n, d in deployments.items() if isinstance(d.autoscaling_config, dict)}
    assert set(scaled) == {"thinker", "talker"}
    for d in scaled.values():
        scaling = d.autoscaling_config
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2) and scaling["target_ongoing_requests"] == 1
        assert d.graceful_shutdown_timeout_s > 20
    most = {n: d.autoscaling_config["max_replicas"] if n in scaled else d.num_replicas for n, d in deployments.items()}
    assert sum(most[n] * d.ray_actor_options.num_cpus for n, d in deployments.items()) <= 2
    assert all(d.ray_actor_options.num_gpus == 0 for d in deployments.values())
    assert ServiceSettings.model_validate(_app(config).args).model == ""


def test_gpu_config_one_gpu_per_stage_with_autoscaling():
    deployments = _deployments(_app(ServeDeploySchema.model_validate(_load("serve_config.gpu.yaml"))))
    for name, d in deployments.items():
        expected_gpus = 0 if name == "ingress" else 1
        assert d.ray_actor_options.num_gpus == expected_gpus, name
        scaling = d.autoscaling_config
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] >= scaling["min_replicas"], name
        assert scaling["target_ongoing_requests"] > 0, name
        assert scaling["target_ongoing_requests"] <= d.max_ongoing_requests, name


def test_packed_config_fits_one_gpu():
    deployments = _deployments(_app(ServeDeploySchema.model_validate(_load("serve_config.gpu_packed.yaml"))))
    gpus = [d.ray_actor_options.num_gpus for d in deployments.values()]
    assert sum(gpus) <= 1.0 and all(0 < g < 1 for g, n in zip(gpus, deployments) if n != "ingress")


def test_cluster_config_against_ray_schema():
    cluster = _load("cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the file as written
    validate_config(prepare_config(cluster))  # and as `ray up` sees it, with the provider's defaults filled in
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types[cluster["head_node_type"]].get("resources", {}).get("GPU", 0) == 0  # a CPU head
    # every accelerator the GPU serve config asks for is offered by a worker type
    gpu = _deployments(_app(ServeDeploySchema.model_validate(_load("serve_config.gpu.yaml"))))
    wanted = {d.ray_actor_options.accelerator_type for d in gpu.values()} - {None}
    offered = {k.split(":", 1)[1] for t in types.values() for k in t["resources"] if k.startswith("accelerator_type:")}
    assert wanted <= offered
    assert sum(t.get("min_workers", 0) for t in types.values()) >= sum(
        d.autoscaling_config["min_replicas"] for n, d in gpu.items() if n != "ingress"
    )


def test_rayservice_manifest():
    manifest = _load("k8s/rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == _load("serve_config.gpu.yaml")  # no drift between the two
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].startswith("2.")
    assert all(
        c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]
    )
