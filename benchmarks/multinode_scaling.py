"""Multi-node overhead on one host: rollout tokens/s with 1, 2, 3 engines on separate nodes, and categorize
rows/s with 1, 2, 3 data nodes, each as a ratio to one node.

    nice -n 19 python benchmarks/multinode_scaling.py [--prompts 48] [--max-new-tokens 32] [--rows 20000]
                                                      [--repeats 2] [--out runs/bench/multinode_scaling.json]

Every node is a separate raylet (own node id, object store and worker processes) of a
``ray.cluster_utils.Cluster`` on this machine (tests/multinode_cluster.py, the multi-node test fixture),
and every node gets 2 logical CPUs. All nodes share the same physical cores, so a second node adds no
compute: **this measures what spreading work over nodes costs (placement, cross-node object transfer,
more processes competing for the same cores), not a speed-up.** On a 2-core host one engine or one data
node already has both cores; a ratio near 1.0 means spreading is nearly free, below 1.0 is overhead. On
real machines each node adds its own cores, and the ratios here bound the per-node loss.

* rollout: an ``EnginePool`` of k transformers engines (``rollout.resources_per_engine: {engine_node: 1}``,
  each engine node carrying one ``engine_node``, so every engine is on a node of its own; 2 CPUs per engine,
  so one engine may use both cores), greedy, a tiny random Llama with SmolLM2's vocabulary by default
  (``--model`` for another); tokens/s of the best of ``--repeats`` calls after a warm-up.
* categorize: ``run_categorize`` (labels categorizer) on a synthetic corpus of ``--rows`` rows in 8 shards
  (benchmarks/data_throughput.py's generator); the head has no CPU, so every Ray Data task runs on the k
  data nodes; rows/s of the best of ``--repeats`` runs after a warm-up run.

The cluster runs under its own ``RAY_TMPDIR``, so no other Ray user on the machine sees it; its processes are
stopped by pid at the end. Prints a markdown table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "tests"))  # the multi-node fixture
sys.path.insert(0, str(REPO / "benchmarks"))  # the synthetic corpus

NODE_CPUS = 2
STORE = 300 * 2**20


def prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about topic {i} in a few sentences."}] for i in range(count)]


def tiny_model(workdir: Path) -> str:
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    path = workdir / "tiny"
    if not (path / "config.json").is_file():
        tokenizer = load_tokenizer("smollm2-135m")
        tiny_llama(vocab_size=len(tokenizer), hidden=64, heads=1, seed=0).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def best_of(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: worker start-up, first model calls
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def measure_rollout(args, workdir: Path) -> list[dict]:
    import ray
    from multinode_cluster import add_node, start_cluster

    from eqrlhf.config import from_dict
    from eqrlhf.rollout.base import Sampling
    from eqrlhf.rollout.pool import EnginePool

    model = args.model or tiny_model(workdir)
    cluster, _, roles = start_cluster({"head": {}}, head_cpus=1, store=STORE)
    rows, batch, sampling = [], prompts(args.prompts), Sampling(max_new_tokens=args.max_new_tokens)
    try:
        for k in (1, 2, 3):
            node = add_node(cluster, {"engine_node": 1}, NODE_CPUS, STORE)
            roles[node.node_id] = f"engine{k - 1}"
            cfg = from_dict(
                {
                    "model": {"name_or_path": model},
                    "generation": {"engine": "hf", "batch_size": 8, "device": "cpu"},
                    "rollout": {
                        "num_engines": k,
                        "cpus_per_engine": NODE_CPUS,
                        "resources_per_engine": {"engine_node": 1},
                    },
                }
            )
            with EnginePool(cfg) as pool:
                nodes = [roles[n] for n in pool.node_ids]
                assert len(set(nodes)) == k, f"engines not on {k} separate nodes: {nodes}"
                seconds, completions = best_of(lambda: pool.generate(batch, sampling), args.repeats)
            tokens = sum(len(c.token_ids) for c in completions)
            rows.append(
                {"nodes": k, "engine_nodes": nodes, "tokens": tokens, "seconds": seconds, "rate": tokens / seconds}
            )
            print(f"rollout, {k} engine node(s): {tokens} tokens in {seconds:.2f} s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


def measure_categorize(args, workdir: Path) -> list[dict]:
    import ray
    from data_throughput import generate, make_config
    from multinode_cluster import add_node, start_cluster

    from eqrlhf.data.categorize_stage import run_categorize

    generate(workdir / f"corpus-{args.rows}", args.rows, shards=8)
    cfg = make_config(workdir, args.rows, "multinode")
    cluster, _, _ = start_cluster({"head": {}}, head_cpus=0, store=STORE)  # no CPU: data tasks go to data nodes
    rows = []
    try:
        for k in (1, 2, 3):
            add_node(cluster, {"data_node": 1}, NODE_CPUS, STORE)
            seconds, manifest = best_of(lambda: run_categorize(cfg), args.repeats)
            read = manifest["rows_read"]
            rows.append({"nodes": k, "rows": read, "seconds": seconds, "rate": read / seconds})
            print(f"categorize, {k} data node(s): {read} rows in {seconds:.2f} s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


def table(rollout: list[dict], categorize: list[dict]) -> str:
    lines = [
        "One host: every node shares the same cores, so these ratios measure the overhead of spreading work",
        "over nodes (placement, cross-node object transfer, more processes), not a speed-up.",
        "",
        "| nodes | rollout tokens/s | ratio to 1 node | categorize rows/s | ratio to 1 node |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r, c in zip(rollout, categorize):
        lines.append(
            f"| {r['nodes']} | {r['rate']:,.1f} | {r['rate'] / rollout[0]['rate']:.2f}x | "
            f"{c['rate']:,.0f} | {c['rate'] / categorize[0]['rate']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="engine model (default: a tiny random Llama with SmolLM2's vocabulary)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/eqrlhf_multinode_bench"))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "multinode_scaling.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # before Ray is imported anywhere: Cluster records its address under RAY_TMPDIR, where another process's
    # plain ray.init() would otherwise find and join it
    ray_tmp = tempfile.mkdtemp(prefix="eqmb", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.pop("RAY_ADDRESS", None)
    from multinode_cluster import stop_leftovers

    try:
        rollout = measure_rollout(args, args.workdir)
        categorize = measure_categorize(args, args.workdir)
    finally:
        stop_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result = {"rollout": rollout, "categorize": categorize, "node_cpus": NODE_CPUS, "cores": os.cpu_count()}
    result["load_avg_1m"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(rollout, categorize))
    print(f"\n{os.cpu_count()} cores, load average {result['load_avg_1m']:.1f} at the end; JSON: {args.out}")


if __name__ == "__main__":
    main()
