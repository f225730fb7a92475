"""Scenarios: a data node removed while a Ray Data stage runs on it (tests/test_multinode_data_on_cpu.py).

Run in a child process by :func:`multinode_cluster.run_scenario` (``script=__file__``). The head has no CPU,
so every Ray Data task and actor runs on a data node (``{"data_node": 1}``, one CPU each). The stage's
per-batch function marks its place (eqrlhf.fault_markers): the first batch cluster-wide then holds there,
the scenario removes the node that wrote that marker (raylet, object store, workers) and lets the stage
finish on the other nodes. Nothing in the stage is told about the loss: Ray Data retries the lost task (tasks
``max_retries=-1``, actors ``max_restarts=-1`` and ``max_task_retries=-1`` by default in Ray 2.60, see
ray/data/_internal/remote_fn.py and actor_pool_map_operator.py). The held batch is the node's first, so the
node dies with no finished block in its object store: rebuilding lost finished blocks from lineage is not
exercised here. The result names the removed node, the held marker and its row ids, every output row's id,
the manifest and the error records, so the test can check each input row came out once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from multinode_cluster import child_main, make_model, start_cluster

DATA_LAYOUT = {"head": {}, **{f"data{i}": {"data_node": 1} for i in range(3)}}


def hold_here(place: str, workdir: Path) -> Path:
    """Markers on, and the first batch of ``place`` held; set before the nodes start so their workers inherit
    it."""
    from eqrlhf.fault_markers import HOLD_ENV, MARKERS_ENV

    markers = workdir / "markers"
    markers.mkdir()
    os.environ[MARKERS_ENV], os.environ[HOLD_ENV] = str(markers), place
    return markers


def remove_held_node(markers: Path, place: str, cluster, nodes: dict, roles: dict, box: dict) -> None:
    """Watcher thread: wait for the held marker of ``place``, then remove the node that wrote it."""
    from eqrlhf.fault_markers import held_marker

    deadline = time.time() + 300
    while time.time() < deadline:
        marker = held_marker(markers, place)
        if marker:
            box["marker"] = marker
            box["removed"] = {"node_id": marker["node_id"], "role": roles[marker["node_id"]], "at": time.time()}
            cluster.remove_node(nodes[roles[marker["node_id"]]])
            return
        time.sleep(0.05)
    box["watch_error"] = f"no batch of {place} was held within 300 s"


def run_with_node_loss(place: str, markers: Path, stage) -> dict:
    """Start the data cluster, run ``stage()`` here (the driver, on the head) while the watcher removes the
    held node, and stop the cluster."""
    import ray

    cluster, nodes, roles = start_cluster(DATA_LAYOUT, head_cpus=0)
    try:
        return _run_while_watching(place, markers, cluster, nodes, roles, stage)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_while_watching(place: str, markers: Path, cluster, nodes, roles, stage) -> dict:
    import ray

    from eqrlhf.fault_markers import read_markers

    box: dict = {}
    # a daemon: should the stage fail before any batch holds, the child must not wait out the watcher
    watcher = threading.Thread(target=remove_held_node, args=(markers, place, cluster, nodes, roles, box), daemon=True)
    watcher.start()
    started = time.perf_counter()
    manifest = stage()
    stage_s = time.perf_counter() - started
    watcher.join(timeout=10)
    assert "marker" in box, box.get("watch_error", "the watcher did not finish")
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}  # as Ray's GCS sees the cluster now
    return {
        "roles": roles,
        "removed": box["removed"],
        "removed_alive": box["removed"]["node_id"] in alive,
        "alive_roles": sorted(roles[node] for node in alive),
        "marker": box["marker"],
        # every batch of the stage: where it ran, when, which rows (the retried ones reappear on other nodes)
        "markers": [{k: m[k] for k in ("node_id", "pid", "time", "ids")} for m in read_markers(markers, place)],
        "manifest": manifest,
        "stage_s": stage_s,
    }


def stage_outputs(out_dir: Path) -> dict:
    """Ids of the rows a stage wrote, and whatever it wrote to its error and side files."""
    from eqrlhf.manifest import read_rows

    side = {}
    for name in ("errors.jsonl", "unparsed.jsonl"):
        path = out_dir / name
        side[name] = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {"output_ids": read_rows(out_dir).column("id").to_pylist(), **side}


# ---- categorize --------------------------------------------------------------------------------------------

SHARDS, ROWS_PER_SHARD = 6, 100  # six read tasks (one per file), each a block that map_labels labels whole


def write_corpus(folder: Path) -> list[str]:
    """Six JSONL shards of harmful/benign records; returns the row ids the categorize stage gives them."""
    folder.mkdir(parents=True)
    ids = []
    for shard in range(SHARDS):
        with open(folder / f"shard-{shard}.jsonl", "w") as out:
            for k in range(ROWS_PER_SHARD):
                i = shard * ROWS_PER_SHARD + k
                label = "harmful" if i % 3 == 0 else "benign"
                record = {
                    "id": i,
                    "prompt": f"Question {i}: how do I open jar {i}?",
                    "chosen": "Gently.",
                    "label": label,
                }
                out.write(json.dumps(record) + "\n")
                ids.append(f"synth:{i}")
    return ids


def scenario_data_node_loss_categorize(workdir: Path) -> dict:
    """categorize (labels: read and label fused into one task per shard) over 600 rows on three data nodes;
    the node of the first task to label a block is removed while that task holds."""
    from eqrlhf.config import from_dict
    from eqrlhf.data.categorize_stage import run_categorize

    markers = hold_here("categorize", workdir)
    input_ids = write_corpus(workdir / "corpus")
    out_dir = workdir / "categorized"
    cfg = from_dict(
        {
            "run": {"output_dir": str(workdir / "runs"), "name": "dataloss"},
            "data": {
                "sources": [
                    {
                        "name": "synth",
                        "path": str(workdir / "corpus" / "shard-*.jsonl"),
                        "adapter": "generic",
                        "fields": {"id": "id", "prompt": "prompt", "chosen": "chosen", "label": "label"},
                    }
                ]
            },
            "categorize": {
                "method": "labels",
                "label_map": {"harmful": "EHD", "benign": "none"},
                "output": str(out_dir),
            },
        }
    )
    result = run_with_node_loss("categorize", markers, lambda: run_categorize(cfg))
    return {"input_ids": input_ids, **result, **stage_outputs(out_dir)}


# ---- pairs -------------------------------------------------------------------------------------------------

PAIR_ROWS, COMPLETE_ROWS = 64, 16  # the first 16 hold a pair (written by the driver); 48 lack the rejected side


def write_mixture(folder: Path) -> list[str]:
    from eqrlhf.data.schema import Limits, make_row, rows_to_table
    from eqrlhf.manifest import StageWriter

    rows = []
    for i in range(PAIR_ROWS):
        rejected = "Sure, here it is." if i < COMPLETE_ROWS else None
        rows.append(
            make_row(
                source="mix",
                key=i,
                prompt=f"Question {i}: how do I stop process {i}?",
                limits=Limits(),
                category=("EHD", "IHD", "MHD", "none")[i % 4],
                chosen="Use kill.",
                rejected=rejected,
            )
        )
    writer = StageWriter(folder, "mix", "test")
    writer.count_read(len(rows))
    writer.write_rows(rows_to_table(rows))
    writer.close()
    return [row["id"] for row in rows]


def scenario_data_node_loss_pairs(workdir: Path) -> dict:
    """pairs.missing=generate: 48 rows without a rejected side go through two HF engine actors (a tiny random
    Llama) on two of three data nodes; the node of the actor that takes the first batch is removed while it
    holds, and Ray restarts the actor on the third node, which redoes its batches."""
    from eqrlhf.config import from_dict
    from eqrlhf.data.pairs import run_pairs

    markers = hold_here("pairs", workdir)
    model = make_model(workdir)
    input_ids = write_mixture(workdir / "mixture")
    out_dir = workdir / "pairs"
    cfg = from_dict(
        {
            "run": {"output_dir": str(workdir / "runs"), "name": "dataloss", "seed": 0},
            "model": {"name_or_path": str(model)},
            # eight new tokens: a random model's answer is almost never blank (a blank one is an error row)
            "generation": {"engine": "hf", "batch_size": 4, "max_new_tokens": 8, "device": "cpu", "concurrency": 2},
            "pairs": {"input": str(workdir / "mixture"), "output": str(out_dir), "missing": "generate"},
        }
    )
    result = run_with_node_loss("pairs", markers, lambda: run_pairs(cfg))
    return {"input_ids": input_ids, "generated_ids": input_ids[COMPLETE_ROWS:], **result, **stage_outputs(out_dir)}


SCENARIOS = {
    "data_node_loss_categorize": scenario_data_node_loss_categorize,
    "data_node_loss_pairs": scenario_data_node_loss_pairs,
}

if __name__ == "__main__":
    child_main(SCENARIOS)
