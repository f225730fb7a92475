"""A multi-node Ray cluster on one host, and the scenarios that run on it (tests/test_multinode_on_cpu.py).

``ray.cluster_utils.Cluster`` starts a head and worker nodes as separate raylets on this machine: each has
its own node id, object store and worker processes, so work placed on two nodes talks through Ray's object
manager and TCP, as on two machines (minus the wire). A process is connected to one Ray cluster at a time
and the test session already has its local one (``ray_local`` in tests/conftest.py), so every scenario runs
here, in a child process::

    python tests/multinode_cluster.py <scenario> <workdir>     # writes <workdir>/result.json

:func:`run_scenario` starts that child for a test with its own ``RAY_TMPDIR``: ``Cluster`` records the
head's address in ``$RAY_TMPDIR/ray/ray_current_cluster``, where a plain ``ray.init()`` of any other process
on the machine (another test session, a user's run) would otherwise find this cluster and join it. Once the
child has ended, whatever Ray process of this cluster is left (found by that directory in its command line)
is stopped by pid; nothing else on the machine is touched.

Nodes (one logical CPU each; the labels are custom resources that configs ask for):

=============  ======================  ===========================================================
head           no label                the driver (and Ray Train's controller, which needs no CPU)
trainer0-2     ``{"trainer_node": 1}``  one Ray Train worker each (``train.resources_per_worker``);
                                       three for two workers, so a lost node leaves a spare
engine0-1      ``{"engine_node": 1}``   one rollout engine each (``rollout.resources_per_engine``)
=============  ======================  ===========================================================
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = {
    "head": {},
    **{f"trainer{i}": {"trainer_node": 1} for i in range(3)},
    **{f"engine{i}": {"engine_node": 1} for i in range(2)},
}
OBJECT_STORE_BYTES = 200 * 2**20  # per node; a tiny model's weights are ~13 MB


# ---- the parent side: one scenario in a child process ------------------------------------------------------


def _cluster_processes(ray_tmp: str) -> list:
    """Processes of the cluster started under ``ray_tmp``: every Ray process names its session dir there."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            # workers rename themselves (ray::EngineActor...), but keep the RAY_TMPDIR they inherited
            if (
                any(ray_tmp in part for part in proc.info["cmdline"] or [])
                or proc.environ().get("RAY_TMPDIR") == ray_tmp
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_leftovers(ray_tmp: str) -> None:
    """`ray stop` would stop every Ray cluster on the machine; this stops only this one's processes, by pid."""
    import psutil

    procs = [p for p in _cluster_processes(ray_tmp) if p.pid != os.getpid()]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_scenario(name: str, workdir: Path, timeout_s: float, script: str | Path = __file__) -> dict:
    """Run scenario ``name`` of ``script`` (this file, or another whose ``__main__`` calls :func:`child_main`
    with its scenarios) in a child process with a cluster of its own; its result, or an AssertionError carrying
    the end of the child's log."""
    ray_tmp = tempfile.mkdtemp(prefix="eqmn", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("RAY_ADDRESS", None)  # the child starts its own cluster, it must not join another
    log = Path(workdir) / f"{name}.log"
    started, code = time.time(), None
    try:
        with open(log, "w") as out:
            child = subprocess.Popen(
                [sys.executable, str(script), name, str(workdir)],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                code = f"killed after {timeout_s} s"
    finally:
        stop_leftovers(ray_tmp)
        if code != 0:  # keep Ray's own logs (raylets, workers) next to the child's for the failure report
            for logs in Path(ray_tmp).glob("ray/session_2*/logs"):
                shutil.copytree(logs, Path(workdir) / "ray_logs" / logs.parent.name, dirs_exist_ok=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result = Path(workdir) / "result.json"
    if code != 0 or not result.is_file():
        tail = log.read_text(errors="replace")[-6000:]
        raise AssertionError(f"scenario {name} ended with {code} after {time.time() - started:.0f} s:\n{tail}")
    return json.loads(result.read_text())


# ---- the child side: the cluster -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(layout: dict[str, dict] = LAYOUT, cpus: int = 1, head_cpus: int = 1, store: int = OBJECT_STORE_BYTES):
    """Start the nodes of ``layout`` (``cpus`` logical CPUs each, the head ``head_cpus``) and connect this
    process; returns (cluster, {role: node}, {node id: role})."""
    import ray
    from ray.cluster_utils import Cluster

    # the head's fixed default ports (dashboard agent 52365) could clash with another cluster on this machine
    head = {
        "num_cpus": head_cpus,
        "include_dashboard": False,
        "dashboard_agent_listen_port": _free_port(),
        "object_store_memory": store,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = {"head": cluster.head_node}
    for role, labels in layout.items():
        if role != "head":
            nodes[role] = add_node(cluster, labels, cpus, store)
    # as eqrlhf.ray_utils.init_ray does for a local cluster: its worker setup hook (quiet Ray Train cleaner,
    # RAY_ADDRESS naming this cluster in every worker); init_ray itself then sees Ray started and returns
    hook = {"worker_process_setup_hook": "eqrlhf.ray_utils.setup_local_worker"}
    ray.init(address=cluster.address, runtime_env=hook, log_to_driver=True, configure_logging=False)
    roles = {node.node_id: role for role, node in nodes.items()}
    return cluster, nodes, roles


def add_node(cluster, labels: dict, cpus: int = 1, store: int = OBJECT_STORE_BYTES):
    """One more node (a raylet with its own object store) carrying the custom resources ``labels``."""
    node = cluster.add_node(num_cpus=cpus, resources=labels, object_store_memory=store)
    cluster.wait_for_nodes()
    return node


# ---- the child side: models and prompts --------------------------------------------------------------------

PROMPTS = [[{"role": "user", "content": f"Question {i}: how do I open jar {i}?"}] for i in range(4)]


def make_model(workdir: Path, seed: int = 0, peaked: bool = False) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (hidden 64, one head). ``peaked`` scales
    its output head up, so greedy tokens do not depend on how prompts are batched."""
    import torch

    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    path = workdir / f"policy{seed}{'_peaked' if peaked else ''}"
    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=64, heads=1, seed=seed)
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_prompt_stage(workdir: Path, n: int = 12) -> Path:
    from eqrlhf.data.schema import Limits, make_row, rows_to_table
    from eqrlhf.manifest import StageWriter

    rows = []
    for i in range(n):
        row = make_row(source="fixture", key=i, prompt=f"Question {i}: how do I open jar {i}?", limits=Limits())
        row.update(category=("EHD", "IHD", "MHD", "none")[i % 4], file="prompts.jsonl", line=i + 1)
        rows.append(row)
    writer = StageWriter(workdir / "mixture", "mix", "test")
    writer.count_read(len(rows))
    writer.write_rows(rows_to_table(rows))
    writer.close()
    return workdir / "mixture"


def ppo_config(workdir: Path, model: Path, prompts: Path):
    """One PPO iteration of 2 Ray Train workers on trainer nodes and 1 HF engine on an engine node."""
    from eqrlhf.config import from_dict

    return from_dict(
        {
            "run": {"name": "multinode", "output_dir": str(workdir / "runs"), "seed": 0},
            "model": {"name_or_path": str(model), "max_length": 96},
            "algorithm": {"loss": "ppo"},
            "generation": {"engine": "hf", "batch_size": 8, "device": "cpu"},
            "rollout": {
                "num_engines": 1,
                "cpus_per_engine": 1,
                "resources_per_engine": {"engine_node": 1},
                "sync_timeout_s": 120,
            },
            "train": {
                "num_workers": 2,
                "cpus_per_worker": 1,
                "resources_per_worker": {"trainer_node": 1},  # one per node: the two workers are on two nodes
                "micro_batch_size": 2,
                "lr": 1e-3,
                "lr_schedule": "constant",
                "zero_stage": 2,
            },
            "ppo": {
                "input": str(prompts),
                "iterations": 1,
                "prompts_per_iteration": 4,
                "samples_per_prompt": 2,
                "max_new_tokens": 8,
                "ppo_epochs": 2,
                "reward_rule": "length",
            },
        }
    )


def engine_gap(pool, model) -> float:
    """Mean |trainer - engine| log-prob over greedy completions of PROMPTS: ~0 when the engines hold ``model``."""
    from eqrlhf.rollout.base import Sampling
    from eqrlhf.rollout.weight_sync import completion_logprobs, logprob_gap

    completions = pool.generate(PROMPTS, Sampling(max_new_tokens=8))
    return logprob_gap(completion_logprobs(model, completions), [c.logprobs for c in completions])


# ---- scenarios ---------------------------------------------------------------------------------------------


def scenario_placement(workdir: Path) -> dict:
    """PPO with its Ray Train workers on two trainer nodes and its engine on an engine node: the rollout and
    the weight sync (object store, from trainer rank 0) cross nodes; then a broadcast sync (gloo) from the
    driver on the head to the engine."""
    import ray

    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.rollout.pool import EnginePool
    from eqrlhf.train.ppo import run_ppo

    times = {}
    model, prompts = make_model(workdir), make_prompt_stage(workdir)
    clock = time.perf_counter()
    # three trainer nodes for two workers (one label unit each): the workers must take two of them
    cluster, _, roles = start_cluster(
        {role: LAYOUT[role] for role in ("head", "trainer0", "trainer1", "trainer2", "engine0")}
    )
    times["cluster_start_s"] = time.perf_counter() - clock
    try:
        cfg = ppo_config(workdir, model, prompts)
        clock = time.perf_counter()
        with EnginePool(cfg) as pool:
            times["pool_start_s"] = time.perf_counter() - clock
            clock = time.perf_counter()
            manifest = run_ppo(cfg, pool=pool)
            times["ppo_s"] = time.perf_counter() - clock
            initial, final = load_causal_lm(str(model)), load_causal_lm(manifest["final"])
            gaps = {"final_after_ppo": engine_gap(pool, final), "initial_after_ppo": engine_gap(pool, initial)}
            pool.cfg.rollout.sync_method = "broadcast"  # the driver (head) and the engine form a gloo group
            clock = time.perf_counter()
            stats = pool.update_weights(initial.state_dict().items())
            times["broadcast_sync_s"] = time.perf_counter() - clock
            gaps["initial_after_broadcast"] = engine_gap(pool, initial)
            health = pool.health()
        return {
            "roles": roles,
            "driver_node": ray.get_runtime_context().get_node_id(),
            "placement": manifest["placement"],
            "engine_health_nodes": [h["node_id"] for h in health],
            "restarts": [h["restarts"] for h in health],
            "sync_mb": manifest["history"][-1]["sync/mb"],
            "broadcast_bytes": stats["bytes"],
            "gaps": gaps,
            "times": times,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def stalled_sync(pool, model: Path, prompt) -> dict:
    """A weight update while engine 0 (on its own node) is busy with one long chunk: with a 0.5 s
    ``rollout.sync_timeout_s`` it fails fast naming the engine; the busy call still returns every sample (engine
    0 restarted on its node with the new weights and asked again). The weights are the ones already loaded."""
    import threading

    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.rollout.base import Sampling

    state = load_causal_lm(str(model)).state_dict()
    restarts, box = list(pool.restarts), {}
    busy = threading.Thread(target=lambda: box.update(done=pool.generate([prompt], Sampling(max_new_tokens=48, n=40))))
    busy.start()
    time.sleep(0.5)
    pool.cfg.rollout.sync_timeout_s, error, clock = 0.5, None, time.perf_counter()
    try:
        pool.update_weights(state.items())
    except TimeoutError as err:
        error = str(err)
    failed_after = time.perf_counter() - clock
    pool.cfg.rollout.sync_timeout_s = 120
    busy.join(timeout=300)
    return {
        "error": error,
        "failed_after_s": failed_after,
        "busy_answers": len(box.get("done", [])),
        "restarts_before": restarts,
        "restarts_after": list(pool.restarts),
        "nodes_after": list(pool.node_ids),
    }


def scenario_engine_node_loss(workdir: Path) -> dict:
    """Two engines on two engine nodes; the node of engine 0 is removed while it serves its chunk: its prompts
    go to engine 1 and every prompt is answered once, as the uninterrupted call answered it."""
    import threading

    import ray

    from eqrlhf.config import from_dict
    from eqrlhf.fault_markers import MARKERS_ENV
    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.rollout.base import Sampling
    from eqrlhf.rollout.pool import EnginePool

    markers = workdir / "markers"
    markers.mkdir()
    os.environ[MARKERS_ENV] = str(markers)  # before the nodes start: their workers inherit it
    model = make_model(workdir, peaked=True)
    layout = {"head": {}, "engine0": {"engine_node": 1}, "engine1": {"engine_node": 1}}
    cluster, nodes, roles = start_cluster(layout)
    try:
        cfg = from_dict(
            {
                "model": {"name_or_path": str(model)},
                "generation": {"engine": "hf", "batch_size": 4, "device": "cpu"},
                "rollout": {"num_engines": 2, "resources_per_engine": {"engine_node": 1}, "sync_timeout_s": 120},
            }
        )
        prompts = [[{"role": "user", "content": f"Prompt id {i}: how do I stop process {i}?"}] for i in range(16)]
        sampling = Sampling(max_new_tokens=48)
        with EnginePool(cfg) as pool:
            engine_roles = [roles[node] for node in pool.node_ids]
            expected = [c.token_ids for c in pool.generate(prompts, sampling)]
            stalled = stalled_sync(pool, model, prompts[0])
            victim = pool.node_ids[0]
            seen = set(markers.iterdir())
            box = {}

            def generate():
                try:
                    box["result"] = pool.generate(prompts, sampling)
                except BaseException as err:  # reported by the scenario below
                    box["error"] = repr(err)

            thread = threading.Thread(target=generate)
            thread.start()
            deadline, hit = time.time() + 120, None
            while hit is None and time.time() < deadline:
                for path in set(markers.glob("generate-*.json")) - seen:
                    seen.add(path)
                    marker = json.loads(path.read_text())  # written whole (renamed into place)
                    hit = marker if marker["node_id"] == victim else hit
                time.sleep(0.02)
            assert hit is not None, "engine 0 never started its chunk"
            removed_at = time.time()
            cluster.remove_node(nodes[roles[victim]])  # raylet, object store and the engine's worker: gone
            thread.join(timeout=300)
            assert "result" in box, box.get("error", "generate did not return within 300 s")
            completions = box["result"]
            reissued, health = list(pool.reissued), pool.health()
            # the survivor alone takes the next weight update and answers for both slots
            model1 = load_causal_lm(str(make_model(workdir, peaked=True, seed=1)))
            pool.update_weights(model1.state_dict().items())
            gap_after_update = engine_gap(pool, model1)
        return {
            "engine_roles": engine_roles,
            "stalled_sync": stalled,
            "removed": {"node_id": victim, "role": roles[victim], "at": removed_at},
            "marker": hit,
            "prompt_indices": [c.prompt_index for c in completions],
            "same_tokens": [c.token_ids for c in completions] == expected,
            "reissued": reissued,
            "health": [{k: h[k] for k in ("slot", "node_id", "restarts")} for h in health],
            "gap_after_update": gap_after_update,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"placement": scenario_placement, "engine_node_loss": scenario_engine_node_loss}


def child_main(scenarios: dict) -> None:
    """The child process: run scenario ``argv[1]`` in folder ``argv[2]`` and write its result.json."""
    name, workdir = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = scenarios[name](workdir)
    result["scenario_s"] = time.perf_counter() - started
    (workdir / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    child_main(SCENARIOS)
