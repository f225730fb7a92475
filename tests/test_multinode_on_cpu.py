"""Past one node: Ray Train workers, a rollout engine and weight syncs placed across the nodes of a real
multi-node Ray cluster (several raylets on this host, tests/multinode_cluster.py), each scenario in a child
process with a cluster of its own. Node ids are read where the work ran (each trainer rank, the engine
actor) and checked against the role of the node they name."""

from __future__ import annotations

from pathlib import Path

import pytest
from multinode_cluster import run_scenario  # tests/ is on sys.path under pytest's default import mode
from multinode_train import HOLD_STEP


def test_placement_config_keys_refuse_ray_builtin_names():
    from eqrlhf.config import ConfigError, load_config

    cfg = load_config(None, ["train.resources_per_worker={trainer_node: 1}", "rollout.resources_per_engine={a: 0.5}"])
    assert cfg.train.resources_per_worker == {"trainer_node": 1.0} and cfg.rollout.resources_per_engine == {"a": 0.5}
    with pytest.raises(ConfigError, match="'GPU' is not a custom resource .* have their own keys"):
        load_config(None, ["train.resources_per_worker={GPU: 1}"])
    with pytest.raises(ConfigError, match=r"'rollout.resources_per_engine.engine_node'.*greater than 0"):
        load_config(None, ["rollout.resources_per_engine={engine_node: 0}"])


def test_labels_the_cluster_lacks_fail_at_once_naming_the_key(ray_local, tmp_path):
    """The session's one-node cluster carries no trainer_node or engine_node: Ray would wait for them
    forever, so the trainer and the pool refuse first."""
    from eqrlhf.config import ConfigError, from_dict
    from eqrlhf.models.loading import tiny_llama
    from eqrlhf.rollout.pool import EnginePool
    from eqrlhf.train.driver import check_worker_resources, worker_resources

    cfg = from_dict({"train": {"num_workers": 2, "resources_per_worker": {"trainer_node": 1}}})
    assert worker_resources(cfg.train) == {"CPU": 1.0, "trainer_node": 1.0}
    with pytest.raises(
        ConfigError, match=r"num_workers=2 x 1.0 trainer_node exceeds the cluster's 0 .*resources_per_worker"
    ):
        check_worker_resources(cfg.train)
    tiny_llama(vocab_size=300).save_pretrained(tmp_path / "tiny")
    cfg = from_dict(
        {"model": {"name_or_path": str(tmp_path / "tiny")}, "rollout": {"resources_per_engine": {"engine_node": 1}}}
    )
    with pytest.raises(
        ConfigError, match=r"num_engines=1 x 1.0 engine_node exceeds the cluster's 0 .*resources_per_engine"
    ):
        EnginePool(cfg)


# Five raylets, a two-worker PPO iteration and an engine: 42 s on the idle 2-core machine, 192-531 s at nice 19
# under a load average of 7-14. Not one of issue 20's CI cases (the node-loss tests below place work across
# nodes too), so it stays out of CI's budget: run it with EQRLHF_SLOW=1.
@pytest.mark.slow
def test_ppo_trainer_on_two_nodes_syncs_an_engine_on_a_third_on_cpu(tmp_path):
    result = run_scenario("placement", tmp_path, timeout_s=900)
    roles = result["roles"]  # node id -> head | trainer0-2 | engine0-1
    trainer_nodes = result["placement"]["trainer_nodes"]  # reported by each rank from inside its process
    engine_nodes = result["engine_health_nodes"]  # reported by the engine actor itself
    assert len(trainer_nodes) == 2 and len(set(trainer_nodes)) == 2, trainer_nodes
    assert all(roles[node].startswith("trainer") for node in trainer_nodes), (trainer_nodes, roles)
    assert len(engine_nodes) == 1 and roles[engine_nodes[0]].startswith("engine"), (engine_nodes, roles)
    assert result["placement"]["engine_nodes"] == engine_nodes  # the pool's record matches the actor's
    assert roles[result["driver_node"]] == "head"
    assert len({*trainer_nodes, *engine_nodes, result["driver_node"]}) == 4  # four processes, four nodes
    gaps = result["gaps"]
    # trainer rank 0 pushed the trained policy through the object store to the engine on another node: the
    # engine answers like the final checkpoint, no longer like the initial model
    assert result["sync_mb"] > 1 and gaps["final_after_ppo"] < 1e-4, gaps
    assert gaps["initial_after_ppo"] > 1e-2, gaps  # 0.24 measured: the policy moved
    # then the driver on the head broadcast the initial weights over a gloo group to the engine's node
    assert result["broadcast_bytes"] > 2**20 and gaps["initial_after_broadcast"] < 1e-4, gaps
    assert result["restarts"] == [0]  # no engine was lost on the way


# Three raylets, two engines, four generate calls: 24-29 s on the idle 2-core machine (243 s at nice 19 under a
# load average of ~10). Slow: an engine killed on one node stays in CI (test_rollout_pool_on_cpu), and so does
# a node lost mid-stage (test_multinode_data_on_cpu, categorize).
@pytest.mark.slow
def test_engine_node_lost_mid_rollout_its_prompts_go_to_the_survivor_on_cpu(tmp_path):
    """A stalled weight update across nodes, then engine 0's node is removed (raylet, object store, the engine's
    process) right after engine 0 wrote its marker for a call: its chunk is re-issued to engine 1, which then
    serves both slots."""
    result = run_scenario("engine_node_loss", tmp_path, timeout_s=600)
    removed = result["removed"]
    assert sorted(result["engine_roles"]) == ["engine0", "engine1"]  # one engine per engine node
    # first, a weight update from the head while engine 0 is busy on its node: it fails fast, naming engine 0,
    # which is restarted (on its node, with the update) and answers its whole chunk
    stalled = result["stalled_sync"]
    assert "engine(s) [0] did not finish within rollout.sync_timeout_s=0.5" in (stalled["error"] or ""), stalled
    assert stalled["failed_after_s"] < 15 and stalled["busy_answers"] == 40
    assert stalled["restarts_after"] == [stalled["restarts_before"][0] + 1, stalled["restarts_before"][1]]
    assert len(set(stalled["nodes_after"])) == 2  # still one engine on each engine node
    # proof of a hit: the engine on the removed node had started serving this very call before the node went
    assert result["marker"]["node_id"] == removed["node_id"] and result["marker"]["time"] < removed["at"]
    assert result["reissued"] == [1, 0]  # engine 0's chunk was handed to engine 1, once
    assert result["prompt_indices"] == list(range(16))  # one episode per prompt id: none lost, none twice
    assert result["same_tokens"]  # the survivor answered engine 0's prompts as engine 0 had
    [survivor] = result["health"]
    assert survivor["slot"] == 1 and survivor["node_id"] != removed["node_id"] and survivor["restarts"] == 0
    assert result["gap_after_update"] < 1e-4  # the survivor alone took the next weight update


def _committed(markers: list[dict], first_pids: set[int], cut: int) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the marker of the update that survives into the final checkpoint: steps up to the
    checkpoint ``cut`` the restart continued from come from the first attempt, later ones from the last."""
    committed = {}
    for m in markers:  # oldest first: a redone step's later marker wins
        if m["step"] <= cut and m["pid"] not in first_pids:
            continue
        committed[(m["step"], m["rank"])] = m
    return committed


# Four raylets and two 6-step DPO runs of 2 workers (the reference, then the faulted one with its restart): 71 s
# on the idle 2-core machine; at nice 19, 157 s under a load average of 6-8 (reference 34 s, faulted run 93 s, of
# which 30 s from the node's removal to the restarted workers' step 4) and 672 s under 9-16; 114 s in CI
# on a slow day. Slow: a killed training worker's restart from its checkpoint stays in CI
# (test_train_resume_on_cpu, test_ppo_train_on_cpu), and so do two node-loss cases (categorize, rollout engine).
@pytest.mark.slow
def test_trainer_node_lost_mid_training_restarts_on_the_spare_node_on_cpu(tmp_path):
    """A 2-worker DPO run (ZeRO-2, gloo) on two of three trainer nodes; the node of the rank that finished
    step 5's update first is removed while that rank holds there. Ray Train restarts both workers on the
    survivor and the spare from checkpoint step_3, and the run ends as the uninterrupted one did."""
    script = Path(__file__).with_name("multinode_train.py")
    result = run_scenario("trainer_node_loss", tmp_path, timeout_s=1500, script=script)
    roles, removed, hit = result["roles"], result["removed"], result["marker"]
    faulted, reference = result["faulted"], result["reference"]
    # the hit: the removed node's worker had finished step 5's update (its marker) before the node went
    assert hit["node_id"] == removed["node_id"] and hit["step"] == HOLD_STEP and hit["time"] < removed["at"]
    assert removed["role"].startswith("trainer")
    markers = faulted["markers"]
    first = {m["pid"] for m in markers if m["step"] == 1}  # the first attempt's two workers
    later = {m["pid"] for m in markers} - first
    assert len(first) == 2 and hit["pid"] in first
    # the restart: a second pair of worker processes (restart count 1), world size 2 again, on two trainer
    # nodes without the removed one, which continued from step_3 (their first marker is step 4)
    assert len(later) == 2 and faulted["restarts"] == 1, markers
    assert min(m["step"] for m in markers if m["pid"] in later) == 4
    before = {m["rank"]: m["node_id"] for m in markers if m["pid"] in first}
    after = result["placement"]["after"]
    assert len(after) == 2 and len(set(after)) == 2 and removed["node_id"] not in after
    assert all(roles[node].startswith("trainer") for node in after)
    assert removed["node_id"] in before.values() and set(after) != set(before.values())
    assert {m["node_id"] for m in markers if m["pid"] in later} == set(after)
    # the committed trajectory equals the uninterrupted one; metrics.jsonl holds each step once
    mine = {row["step"]: row["loss"] for row in faulted["steps"]}
    ref = {row["step"]: row["loss"] for row in reference["steps"]}
    assert [row["step"] for row in faulted["steps"]] == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert mine[step] == pytest.approx(ref[step], abs=1e-5), (step, mine, ref)
    assert faulted["checkpoints"] == ["step_3", "step_6"] and faulted["start_step"] == 0
    # sample ids: the committed updates read each pair once per epoch (16 pairs, 4 steps an epoch), the same
    # ids on the same rank at the same step as the uninterrupted run
    committed = _committed(markers, first, cut=3)
    uninterrupted = {(m["step"], m["rank"]): m for m in reference["markers"]}
    assert sorted(committed) == sorted(uninterrupted) == [(s, r) for s in range(1, 7) for r in (0, 1)]
    assert all((m["pid"] in later) == (m["step"] > 3) for m in committed.values())  # 4-6 by the restart
    for key, m in committed.items():
        assert m["ids"] == uninterrupted[key]["ids"], key
    for steps in (range(1, 5), range(5, 7)):
        seen = [i for s in steps for r in (0, 1) for i in committed[(s, r)]["ids"]]
        assert len(seen) == len(set(seen)) == 4 * len(steps)
    assert len({i for m in committed.values() if m["step"] <= 4 for i in m["ids"]}) == 16
