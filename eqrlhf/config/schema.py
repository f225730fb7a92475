"""The whole config: one field per section, checks across sections, paths and the config hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field, model_validator

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.config.base import Section
from eqrlhf.config.control import ControlSection
from eqrlhf.config.data_stages import CategorizeSection, DataSection, MixSection, PairsSection
from eqrlhf.config.evaluation import EvalSection
from eqrlhf.config.experiment import PipelineSection, RunSection, SweepSection, TrackingSection
from eqrlhf.config.generation import GenerationSection, RolloutSection
from eqrlhf.config.training import AlgorithmSection, AmaSection, ModelSection, PPOSection, TrainSection
from eqrlhf.restricted_config import whole_config_for_records


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    categorize: CategorizeSection = Field(default_factory=CategorizeSection)
    mix: MixSection = Field(default_factory=MixSection)
    pairs: PairsSection = Field(default_factory=PairsSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    model: ModelSection = Field(default_factory=ModelSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    ama: AmaSection = Field(default_factory=AmaSection)
    train: TrainSection = Field(default_factory=TrainSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    control: ControlSection = Field(default_factory=ControlSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _ama_scorer_fits_the_loss(self) -> Config:
        # critic scores are PPO's value estimates, alive only inside PPO training; offline AMA losses read
        # scores that the score stage wrote before training
        loss, scorer = self.algorithm.loss, self.ama.scorer
        info = loss_info(loss)
        if info.ama and info.kind == "online" and scorer != "critic":
            raise ValueError(
                f"'ama.scorer' is {scorer}, but algorithm.loss={loss} masks tokens with the critic's values: "
                "set ama.scorer=critic"
            )
        if info.ama and info.kind != "online" and scorer == "critic":
            raise ValueError(
                f"'ama.scorer' is critic, but critic values exist only in PPO training (ama_ppo): algorithm.loss="
                f"{loss} takes its token scores from the score stage (ama.scorer=reward_prefix or dpo_implicit)"
            )
        return self

    @model_validator(mode="after")
    def _autocast_offline_only(self) -> Config:
        # PPO's ratios and KL compare log-probs from several models and passes: not yet one arithmetic for all
        if self.train.autocast and loss_info(self.algorithm.loss).kind == "online":
            raise ValueError(
                f"'train.autocast' is true, but algorithm.loss={self.algorithm.loss} is online (PPO): autocast is "
                "supported for the offline losses (DPO family, sft, reward); set train.autocast=false"
            )
        return self

    def resolve_path(self, path: str) -> Path:
        return Path(path.replace("{data_root}", self.data.data_root)).expanduser()

    def stage_dir(self, explicit: str | None, default_name: str) -> Path:
        return self.resolve_path(explicit) if explicit else self.run.dir / default_name

    def hash(self) -> str:
        """Stable hash of the resolved config (written into every manifest); of the whole config also when a
        stage holds a restricted copy: it is a record of the run."""
        text = json.dumps(whole_config_for_records(self).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
