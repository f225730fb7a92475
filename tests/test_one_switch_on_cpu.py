"""One AMA switch and one engine selector (issue 18, item 6).

AMA is on exactly when the loss name says so (``ama_dpo``, ``ama_ppo``, ...: ``eqrlhf.algorithms.catalog.ama_on``),
for the score stage, the pipeline's plan and both trainers; ``generation.engine`` chooses the engine of every
stage that generates, in process and in the rollout pool. The old spellings, ``ama.enabled`` and
``rollout.engine``, fail at load naming what replaced them.
"""

from __future__ import annotations

import pytest
import torch

from eqrlhf.algorithms.catalog import ama_on
from eqrlhf.config import ConfigError, load_config
from eqrlhf.data.score import scoring_needed
from eqrlhf.pipeline import plan
from eqrlhf.restricted_config import restrict
from eqrlhf.stages import STAGES, effective_config

QUICKSTART = "configs/quickstart.yaml"


# ---- the old spellings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["ama.enabled=true", "ama.enabled=false"])
def test_ama_enabled_fails_at_load_naming_the_loss_names(override):
    with pytest.raises(ConfigError, match=r"'ama.enabled' was removed: the loss name turns AMA on: set algorithm.loss"):
        load_config(QUICKSTART, [override])
    with pytest.raises(ConfigError, match=r"one of ama_dpo, ama_ipo, ama_cdpo, ama_sft, ama_ppo, ama_ppo_lagrangian"):
        load_config(None, [override])


def test_an_old_ama_ppo_file_names_both_replacements(tmp_path):
    old = tmp_path / "old_ama_ppo.yaml"
    old.write_text("algorithm: {loss: ppo}\nama: {enabled: true, scorer: critic}\nrollout: {engine: vllm}\n")
    with pytest.raises(ConfigError) as err:
        load_config(old)
    message = str(err.value)
    assert "'ama.enabled' was removed" in message and "ppo with ama.enabled=true is algorithm.loss=ama_ppo" in message
    assert "'rollout.engine' was removed: set generation.engine instead" in message


def test_the_ama_scorer_must_fit_the_loss_at_load():
    with pytest.raises(ConfigError, match=r"'ama.scorer' is reward_prefix, but algorithm.loss=ama_ppo masks tokens"):
        load_config("configs/ppo_cpu.yaml", ["algorithm.loss=ama_ppo"])
    with pytest.raises(ConfigError, match=r"'ama.scorer' is critic, but critic values exist only in PPO training"):
        load_config(QUICKSTART, ["ama.scorer=critic"])
    # AMA off: the ama section's settings are unused, whatever they say
    assert not ama_on(load_config(QUICKSTART, ["algorithm.loss=dpo", "ama.scorer=critic"]))


# ---- the one AMA switch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "overrides", "ama", "scored"),
    [
        (QUICKSTART, [], True, True),  # ama_dpo: the score stage writes the token scores
        (QUICKSTART, ["algorithm.loss=ama_sft"], True, True),
        (QUICKSTART, ["algorithm.loss=dpo", "algorithm.reference=in_trainer"], False, False),
        ("configs/ppo_ama_cpu.yaml", [], True, False),  # ama_ppo: the critic's values, no score stage
        ("configs/ppo_cpu.yaml", [], False, False),
    ],
)
def test_the_loss_name_turns_ama_on_for_the_score_stage_and_the_plan(tmp_path, config, overrides, ama, scored):
    cfg = load_config(config, [f"run.output_dir={tmp_path}", *overrides])
    assert ama_on(cfg) is ama
    assert scoring_needed(cfg) is scored and STAGES["score"].applies(cfg) is scored
    assert ("score" in [d.stage.name for d in plan(cfg)]) is scored


def test_the_offline_trainer_masks_exactly_when_the_loss_is_an_ama_loss():
    from eqrlhf.train.loop import StepSpec

    assert StepSpec.from_config(load_config(QUICKSTART)).ama
    assert not StepSpec.from_config(load_config(QUICKSTART, ["algorithm.loss=dpo"])).ama


def test_ppo_masks_its_policy_loss_exactly_when_the_loss_is_ama_ppo():
    from eqrlhf.train.ppo_experience import finish_advantages

    def policy_mask(cfg):
        # two episodes of four tokens: one with a positive advantage, one with a negative one
        batch = {
            "mask": torch.ones(2, 4),
            "advantages": torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]),
            "values": torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.5, -0.5, 0.5, -0.5]]),
        }
        metrics = finish_advantages(batch, cfg, lam=1.0)
        return batch["policy_mask"], metrics

    mask, metrics = policy_mask(load_config("configs/ppo_ama_cpu.yaml"))
    # the sign rule: V_t > 0 kept where the advantage is positive, V_t < 0 where it is negative
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]] and metrics["ama/kept_fraction"] == 0.5
    mask, metrics = policy_mask(load_config("configs/ppo_cpu.yaml"))
    assert mask.tolist() == [[1.0] * 4] * 2 and not any(k.startswith("ama/") for k in metrics)


# ---- the one engine selector ----------------------------------------------------------------------------------


@pytest.fixture
def built(monkeypatch):
    """make_engine's engine classes replaced by recorders: (kind, model, cpu_bind) per engine built."""
    import eqrlhf.rollout as rollout
    from eqrlhf.rollout import hf_engine, vllm_engine

    monkeypatch.setattr(hf_engine, "HFEngine", lambda model, **kw: ("hf", model, None))
    monkeypatch.setattr(
        vllm_engine.VLLMEngine,
        "from_config",
        classmethod(lambda cls, cfg, model=None, cpu_bind=None: ("vllm", model, cpu_bind)),
    )
    monkeypatch.setattr(rollout, "check_engine", lambda cfg: None)  # vLLM itself need not be installed


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_generation_engine_chooses_the_engine_of_every_stage(built, engine):
    from eqrlhf.data.pairs import PairGenerator
    from eqrlhf.rollout import make_engine
    from eqrlhf.rollout.engine_actor import EngineActor

    cfg = load_config(QUICKSTART, [f"generation.engine={engine}"])
    # the pairs stage's Ray Data actors (from the config the stage holds: its declared keys) and the judge
    # categorizer build theirs in process
    seen = effective_config(cfg, "pairs")
    pairs = PairGenerator(restrict(seen, STAGES["pairs"].reads(seen), "pairs"))
    assert pairs.engine[0] == engine
    assert make_engine(effective_config(cfg, "categorize"), model="judge")[:2] == (engine, "judge")
    # the rollout pool's actors (evaluation, PPO rollouts) build theirs from the same setting
    for stage in ("evaluate", "train"):
        actor = EngineActor(effective_config(cfg, stage), "/models/policy", slot=1, slots=2)
        assert (actor.kind, actor.engine[:2]) == (engine, (engine, "/models/policy"))
    ppo = load_config("configs/ppo_ama_gpu_1x8.yaml")  # the shipped vLLM pool: generation.engine=vllm
    assert EngineActor(ppo, "/models/llama").engine[0] == "vllm"


def test_several_vllm_engines_on_one_cpu_machine_get_their_own_cores(built, monkeypatch):
    from eqrlhf.rollout.engine_actor import EngineActor

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cfg = load_config(QUICKSTART, ["generation.engine=vllm"])
    binds = [EngineActor(cfg, "/m", slot=slot, slots=2).engine[2] for slot in (0, 1)]
    assert binds == ["0,1", "2,3"]
    on_gpu = load_config(QUICKSTART, ["generation.engine=vllm", "rollout.gpus_per_engine=1"])
    assert EngineActor(on_gpu, "/m", slot=1, slots=2).engine[2] is None  # GPU engines: vLLM places them
