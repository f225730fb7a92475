"""Cluster submission as a user does it: `ray start --head` with token authentication and the dashboard on
loopback only, two worker nodes joined with `ray start --address` and a ``trainer_node`` label, pipeline jobs
submitted through the job API with cluster/runtime_env.yaml (the data stages and a short training run whose two
Ray Train workers go to the two worker nodes; a job with a wrong config key that must end FAILED), their outputs
checked, and that cluster (only its processes: other Ray clusters may run on this machine) stopped afterwards."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 600


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def head_processes(temp_dir: str) -> list:
    """The processes of the head started in ``temp_dir``: every one of them names its session dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(temp_dir: str) -> None:
    """`ray stop` would stop every Ray process on the machine; terminate only this head's, by pid."""
    import psutil

    procs = head_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def token_head():
    """A local head with RAY_AUTH_MODE=token, its own ports, its own token file and a short temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="eqrjob")  # short: Ray's unix sockets live under it
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs, dash, client, node, objm, agent, agent_grpc, metrics, renv = free_ports(9)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", "--num-cpus=8", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--node-manager-port={node}", f"--object-manager-port={objm}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={renv}", "--min-worker-port=0", "--max-worker-port=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        try:
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout + started.stderr
            # Two more nodes on this host, as `ray start` on two more machines would add. Each has a temp dir of
            # its own, as a machine has its own disk: sharing the head's, a node's runtime-env agent deleted the
            # job's unpacked working_dir (the driver's cwd) when that node's last worker of the job exited.
            for i in range(2):
                agent, agent_grpc, metrics, renv = free_ports(4)  # the agents' fixed defaults would clash
                join = [
                    RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"trainer_node": 1}',
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
                    "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}/n{i}", "--disable-usage-stats",
                ]  # fmt: skip
                joined = subprocess.run(join, env=env, capture_output=True, text=True, timeout=120)
                assert joined.returncode == 0, joined.stdout + joined.stderr
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the job client reads the token like the CLI
                patch.setenv(key, env[key])
            patch.delenv("RAY_ADDRESS", raising=False)
            yield {
                "address": f"http://127.0.0.1:{dash}",
                "gcs": f"127.0.0.1:{gcs}",
                "dashboard_port": dash,
                "temp_dir": temp_dir,
            }
        finally:
            stop_head(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


# The job SDK caches its auth token per process, and the test process may already have run Ray for other
# tests, so the job is submitted and watched from a fresh process, as `ray job submit` would be.
SUBMIT_AND_WAIT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
address, entrypoint, runtime_env, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
client = JobSubmissionClient(address)
deadline = time.time() + 120
while True:  # the dashboard agent can need seconds before it accepts jobs on a loaded machine
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        break
    except RuntimeError as err:
        if "No available agent" not in str(err) or time.time() > deadline:
            raise
        time.sleep(3)
deadline = time.time() + timeout
while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.time() > deadline:
        break
    time.sleep(2)
print(json.dumps({"job_id": job_id, "status": str(status.value), "logs": client.get_job_logs(job_id)}))
"""


def submit_and_wait(address: str, entrypoint: str, runtime_env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT_AND_WAIT, address, entrypoint, json.dumps(runtime_env), str(JOB_TIMEOUT_S)],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S + 300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def dashboard_listens_on_loopback_only(port: int) -> bool:
    import psutil

    bound = [
        c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"
    ]
    return bool(bound) and all(ip in ("127.0.0.1", "::1") for ip in bound)


def cluster_nodes(gcs: str) -> dict[str, dict]:
    """Node id -> resources of the live nodes, asked from a fresh process (with the fixture's token)."""
    ask = "import json, sys, ray; ray.init(address=sys.argv[1]); print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
    done = subprocess.run([sys.executable, "-c", ask, gcs], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {n["NodeID"]: n["Resources"] for n in json.loads(done.stdout.strip().splitlines()[-1])}


def test_pipeline_job_trains_on_two_worker_nodes_through_the_job_api(token_head, tmp_path):
    """One job: categorize, mix and pairs (Ray Data), then DPO with its two Ray Train workers on the two
    ``trainer_node`` nodes (gloo across nodes); the job ends SUCCEEDED and its outputs are complete."""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    assert dashboard_listens_on_loopback_only(token_head["dashboard_port"])
    nodes = cluster_nodes(token_head["gcs"])
    trainer_nodes = {node for node, resources in nodes.items() if resources.get("trainer_node")}
    assert len(nodes) == 3 and len(trainer_nodes) == 2, nodes
    model = tmp_path / "tiny"
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), seed=0).save_pretrained(model)
    tokenizer.save_pretrained(model)
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)  # the file says "." for `ray job submit` run from the repo root
    out = tmp_path / "runs"
    overrides = [
        "'run.stages=[categorize, mix, pairs, train]'", f"run.output_dir={out}", f"model.name_or_path={model}",
        "'mix.counts={EHD: 5, IHD: 3, MHD: 2}'", "mix.general_ratio=1.0", "pairs.missing=skip",
        "pairs.rejected=instructed", "pipeline.warm_start=null", "algorithm.loss=dpo", "algorithm.reference=in_trainer",
        "train.num_workers=2", "train.cpus_per_worker=1", "'train.resources_per_worker={trainer_node: 1}'",
        "train.micro_batch_size=1", "train.grad_accum=1", "train.max_steps=2",
    ]  # fmt: skip
    entrypoint = f"{sys.executable} jobs/pipeline.py -c configs/quickstart.yaml {' '.join(overrides)}"
    job = submit_and_wait(token_head["address"], entrypoint, runtime_env)
    assert job["status"] == "SUCCEEDED", f"job {job['job_id']}: {job['status']}\n{job['logs'][-3000:]}"
    assert "[pipeline] finished" in job["logs"]

    run = out / "quickstart"
    categorized = json.loads((run / "categorized" / "manifest.json").read_text())
    mixture = json.loads((run / "mixture" / "manifest.json").read_text())
    pairs = json.loads((run / "pairs" / "manifest.json").read_text())
    demo_rows = len((REPO / "eqrlhf" / "data" / "demo_corpus.jsonl").read_text().splitlines())
    assert categorized["rows_written"] == demo_rows  # the whole demo corpus, each row categorized
    assert mixture["rows_written"] == 20  # 5 + 3 + 2 safety rows and as many general rows
    # pairs.missing=skip: rows the mix picked without a source pair are counted, not dropped silently
    assert pairs["rows_written"] + pairs["filtered"].get("no pair", 0) == 20
    trained = json.loads((run / "train" / "manifest.json").read_text())
    assert trained["steps_run"] == 2 and (run / "train" / "final" / "model.safetensors").is_file()
    assert sorted(trained["placement"]["trainer_nodes"]) == sorted(trainer_nodes)  # one worker on each trainer node
    assert all((run / d / "stage_state.json").is_file() for d in ("categorized", "mixture", "pairs", "train"))


def test_a_job_with_a_wrong_config_key_ends_failed_naming_it(token_head, tmp_path):
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    entrypoint = (
        f"{sys.executable} jobs/pipeline.py -c configs/quickstart.yaml run.output_dir={tmp_path} train.lr_rate=1"
    )
    job = submit_and_wait(token_head["address"], entrypoint, runtime_env)
    assert job["status"] == "FAILED" and "train.lr_rate" in job["logs"], job["logs"][-3000:]
    assert not (tmp_path / "quickstart").exists()  # refused before any stage ran


def test_job_api_refuses_a_request_without_the_token(token_head):
    """A plain HTTP request without the bearer token is turned away (the SDK caches its token per process,
    so this goes below it); with the token the same request is answered."""
    import urllib.error
    import urllib.request

    url = token_head["address"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    token = Path(token_head["temp_dir"], "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answered:
        assert answered.status == 200
