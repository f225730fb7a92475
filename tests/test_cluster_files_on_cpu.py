"""The cluster files cannot start a cloud or Kubernetes cluster here, so check what can be checked without one:
the launcher YAML against Ray's own cluster-config schema, the configs the job entry points name against our
config schema, and the security defaults the guide promises (auth on, nothing exposed beyond the cluster)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import yaml

from eqrlhf.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_launcher_yaml_passes_rays_schema_and_keeps_the_api_private():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)  # what `ray up` validates first
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    ranges = [r["CidrIp"] for p in cfg["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert "0.0.0.0/0" not in ranges
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_rayjob_is_authenticated_cluster_internal_and_runs_a_valid_config():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert spec["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "jobs/pipeline.py", "-c"] and (REPO / argv[1]).is_file()
    load_config(REPO / argv[3], argv[4:])  # the entry point's config and overrides load without error
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_runtime_env_is_plain_yaml_without_secrets():
    text = (REPO / "cluster" / "runtime_env.yaml").read_text()
    env = yaml.safe_load(text)
    assert isinstance(env, dict)
    lowered = text.lower()
    assert "hf_token" not in lowered and "api_key" not in lowered and "password" not in lowered
