"""Multi-node scenarios of Ray Train itself (tests/test_multinode_on_cpu.py), on the cluster of
tests/multinode_cluster.py; run in a child process like its scenarios::

    python tests/multinode_train.py <scenario> <workdir>     # writes <workdir>/result.json
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from multinode_cluster import LAYOUT, child_main, start_cluster  # tests/ is sys.path[0] of this script

# The reference DPO run of tests/test_train_resume_on_cpu.py, its two workers on two of the three trainer
# nodes: 16 pairs, global batch 4 (4 steps an epoch), 6 steps, a checkpoint at step 3.
TRAIN = {
    "num_workers": 2,
    "resources_per_worker": {"trainer_node": 1},
    "zero_stage": 2,
    "max_steps": 6,
    "save_every": 3,
    "lr_schedule": "cosine",
    "warmup_steps": 1,
    "max_failures": 1,
}
HOLD_STEP = 5  # after the checkpoint at step 3 and past step 4: steps 4-5 are lost and redone


def _steps(run_dir: Path) -> list[dict]:
    """metrics.jsonl as written: every line, so a step logged twice shows up."""
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [{"step": row["step"], "loss": row["loss"]} for row in map(json.loads, lines)]


def _train_markers(folder: Path) -> list[dict]:
    from eqrlhf.fault_markers import read_markers

    keep = ("step", "rank", "ids", "node_id", "pid", "time")
    return [{k: m[k] for k in keep} for m in read_markers(folder, "train_step")]


def scenario_trainer_node_loss(workdir: Path) -> dict:
    """An uninterrupted 2-worker DPO run, then the same run with the node of the rank that finished step 5's
    update first removed while that rank holds there (its update done, step 5's metrics not yet averaged):
    Ray Train restarts both workers, on the spare trainer node and the survivor, from checkpoint step_3."""
    import ray
    from test_train_on_cpu import make_model_dir, pair_rows, train_config, write_stage

    from eqrlhf.data.schema import rows_to_table
    from eqrlhf.fault_markers import HOLD_ENV, HOLD_S_ENV, MARKERS_ENV, held_marker
    from eqrlhf.train import run_train

    model = make_model_dir(workdir / "model")
    pairs = write_stage(workdir / "pairs", rows_to_table(pair_rows()))
    layout = {role: LAYOUT[role] for role in ("head", "trainer0", "trainer1", "trainer2")}
    cluster, nodes, roles = start_cluster(layout)
    try:
        # the workers get the driver's EQRLHF_* variables at each run's start (eqrlhf.train.driver.worker_env),
        # so each run gets its own marker folder, and only the second one holds
        ref_markers, markers = workdir / "markers_reference", workdir / "markers"
        ref_markers.mkdir()
        markers.mkdir()
        os.environ[MARKERS_ENV] = str(ref_markers)
        reference = train_config(workdir / "runs" / "reference", model, input=str(pairs), **TRAIN)
        clock = time.perf_counter()
        ref_manifest = run_train(reference)
        reference_s = time.perf_counter() - clock

        os.environ.update({MARKERS_ENV: str(markers), HOLD_ENV: f"train_step@{HOLD_STEP}", HOLD_S_ENV: "600"})
        faulted = train_config(workdir / "runs" / "faulted", model, input=str(pairs), **TRAIN)
        box = {}

        def train():
            try:
                box["manifest"] = run_train(faulted)
            except BaseException as err:  # reported below
                box["error"] = repr(err)

        clock = time.perf_counter()
        thread = threading.Thread(target=train)
        thread.start()
        deadline, hit = time.time() + 600, None
        while hit is None and thread.is_alive() and time.time() < deadline:
            hit = held_marker(markers, f"train_step@{HOLD_STEP}")
            time.sleep(0.05)
        assert hit is not None, box.get("error", f"no worker reached step {HOLD_STEP}")
        victim = hit["node_id"]
        removed_at = time.time()
        cluster.remove_node(nodes[roles[victim]])  # raylet, object store and the held worker: gone
        thread.join(timeout=900)
        assert "manifest" in box, box.get("error", "the faulted run did not finish within 900 s")
        faulted_s = time.perf_counter() - clock
        manifest = box["manifest"]
        train_markers = _train_markers(markers)
        # Ray Train 2.60 (v2) keeps its restart count in the controller's failure policy, which ends with fit()
        # and is not in the Result; each start of the worker group runs new worker processes, so the restarts
        # are the distinct rank-0 processes that marked a step, less the first
        restarts = len({m["pid"] for m in train_markers if m["rank"] == 0}) - 1
        return {
            "roles": roles,
            "removed": {"node_id": victim, "role": roles[victim], "at": removed_at},
            "marker": hit,
            "placement": {
                "reference": ref_manifest["placement"]["trainer_nodes"],
                "after": manifest["placement"]["trainer_nodes"],  # recorded by the ranks of the last start
            },
            "reference": {"steps": _steps(reference.run.dir), "markers": _train_markers(ref_markers)},
            "faulted": {
                "steps": _steps(faulted.run.dir),
                "markers": train_markers,
                "restarts": restarts,
                "checkpoints": [p.rsplit("/", 1)[1] for p in manifest["checkpoints"]],
                "start_step": manifest["start_step"],
            },
            "times": {"reference_s": reference_s, "faulted_s": faulted_s},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"trainer_node_loss": scenario_trainer_node_loss}

if __name__ == "__main__":
    child_main(SCENARIOS)
