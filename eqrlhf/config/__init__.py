"""One typed configuration schema for every stage.

A config is a YAML file plus dotted ``key=value`` overrides. It is validated
completely before any Ray resource is taken: an unknown key fails with the
closest valid key, a wrong type names the key and the expected type.

The sections live by what they configure: ``data_stages`` (corpora, categorize, mix, pairs), ``generation``
(the engines and the rollout pool), ``training`` (model, algorithm, AMA, trainer, PPO), ``evaluation``,
``control``, ``experiment`` (run, pipeline, sweep, tracking); ``schema`` joins them into ``Config`` and
``loading`` reads, composes, overrides and validates. Import the names from here.
"""

from __future__ import annotations

from eqrlhf.config.base import CATEGORIES, Section
from eqrlhf.config.control import ControlSection
from eqrlhf.config.data_stages import (
    CategorizeSection,
    DataSection,
    EmbeddingSection,
    JudgeSection,
    MixSection,
    PairsSection,
    ResponsePolicy,
    SourceSection,
    default_data_root,
)
from eqrlhf.config.evaluation import EvalSection, EvalSuiteSection, default_eval_suites
from eqrlhf.config.experiment import (
    PipelineSection,
    RunSection,
    StageName,
    SweepParam,
    SweepSection,
    TrackingSection,
)
from eqrlhf.config.generation import GenerationSection, RolloutSection
from eqrlhf.config.loading import REMOVED_KEYS, apply_override, from_dict, load_config
from eqrlhf.config.schema import Config
from eqrlhf.config.training import (
    AlgorithmSection,
    AmaSection,
    LoraSection,
    ModelSection,
    PPOSection,
    TrainSection,
)
from eqrlhf.errors import ConfigError

__all__ = [
    "CATEGORIES",
    "REMOVED_KEYS",
    "AlgorithmSection",
    "AmaSection",
    "CategorizeSection",
    "Config",
    "ConfigError",
    "ControlSection",
    "DataSection",
    "EmbeddingSection",
    "EvalSection",
    "EvalSuiteSection",
    "GenerationSection",
    "JudgeSection",
    "LoraSection",
    "MixSection",
    "ModelSection",
    "PPOSection",
    "PairsSection",
    "PipelineSection",
    "ResponsePolicy",
    "RolloutSection",
    "RunSection",
    "Section",
    "SourceSection",
    "StageName",
    "SweepParam",
    "SweepSection",
    "TrackingSection",
    "TrainSection",
    "apply_override",
    "default_data_root",
    "default_eval_suites",
    "from_dict",
    "load_config",
]
