"""Each stage gets only what it declares: a read of an undeclared key fails loudly, in the stage and in the
Ray tasks, actors and workers it starts, instead of leaking past the stage's fingerprint (a stale skip).

The real stages run restricted in tests/test_pipeline_on_cpu.py (every stage of the quickstart pipeline)
and tests/test_sweep_on_cpu.py (training and evaluation in a Tune trial).
"""

from __future__ import annotations

import pickle

import pytest

from eqrlhf.config import TrainSection, load_config
from eqrlhf.errors import UserError, find_user_error
from eqrlhf.pipeline import run_stage
from eqrlhf.restricted_config import UndeclaredConfigRead, restrict, whole_config_for_records
from eqrlhf.stages import PIPELINE, Stage

CONFIG = "configs/quickstart.yaml"


def _probe(tmp_path, reads: tuple[str, ...], run) -> Stage:
    out = tmp_path / "probe"

    def write_manifest(cfg):
        result = run(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")
        return result

    return Stage("probe", write_manifest, "a test stage", lambda c: reads, lambda c: [], lambda c: out)


def test_a_stage_reading_an_undeclared_key_fails_naming_the_key_and_where_to_declare_it(tmp_path):
    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}"])
    stage = _probe(tmp_path, ("generation.engine",), lambda c: c.generation.top_p)
    with pytest.raises(UndeclaredConfigRead) as caught:
        run_stage(stage, cfg)
    message = str(caught.value)
    assert "stage 'probe' read 'generation.top_p'" in message and "eqrlhf/stages.py" in message
    # a bug in the code, not the user's: the CLI keeps its traceback instead of printing one line
    assert not isinstance(caught.value, UserError) and find_user_error(caught.value) is None
    # not an AttributeError: getattr with a default and hasattr must not fall back silently
    restricted = restrict(cfg, ("generation.engine",), "probe")
    with pytest.raises(UndeclaredConfigRead, match="'pairs'"):
        getattr(restricted, "pairs", None)
    with pytest.raises(UndeclaredConfigRead, match="'generation.top_p'"):
        hasattr(restricted.generation, "top_p")


def test_declared_keys_whole_sections_and_the_output_paths_read_fine(tmp_path):
    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}", "generation.top_p=0.5"])
    read = _probe(
        tmp_path,
        ("generation.top_p", "mix"),
        lambda c: (c.generation.top_p, c.mix.counts, c.stage_dir(c.mix.output, "mixture"), c.hash()),
    ).run
    top_p, counts, folder, digest = read(restrict(cfg, ("generation.top_p", "mix"), "probe"))
    assert (top_p, counts, folder) == (0.5, cfg.mix.counts, cfg.run.dir / "mixture")
    assert digest == cfg.hash()  # the manifests' config hash stays the whole run's
    with pytest.raises(ValueError, match="'mix.countz'"):  # a declared key must exist
        restrict(cfg, ("mix.countz",), "probe")


def test_a_restricted_config_refuses_a_partial_dump_and_records_the_whole_run(tmp_path):
    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}"])
    restricted = restrict(cfg, ("train", "algorithm", "model"), "warm_start")
    # a dump would miss every undeclared key, and from_dict would fill them with defaults in a worker
    with pytest.raises(UndeclaredConfigRead, match="dumped the config whole"):
        restricted.model_dump(mode="json")
    assert restricted.train.model_dump() == cfg.train.model_dump()  # a wholly declared section dumps
    # the stage may replace a section (the warm start trains with its own settings): records show its values
    own = restricted.model_copy(update={"train": TrainSection(lr=1e-3)})
    record = whole_config_for_records(own)
    assert record.train.lr == 1e-3 and record.data == cfg.data and record.pairs == cfg.pairs
    assert own.hash() == record.hash() != cfg.hash()


def test_the_restriction_survives_pickling_into_a_ray_task(tmp_path, ray_local):
    ray = ray_local
    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}", "generation.temperature=0.7"])
    restricted = restrict(cfg, ("generation.temperature",), "probe")
    assert pickle.loads(pickle.dumps(restricted)).generation.temperature == 0.7

    def read(config, key: str):  # defined here: cloudpickle sends it by value (workers cannot import tests/)
        section, field = key.split(".")
        return getattr(getattr(config, section), field)

    task = ray.remote(read)
    assert ray.get(task.remote(restricted, "generation.temperature")) == 0.7
    with pytest.raises(UndeclaredConfigRead, match="stage 'probe' read 'generation.top_p'"):
        ray.get(task.remote(restricted, "generation.top_p"))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["generation.engine=vllm", "pairs.judge=true", "categorize.method=judge"],
        ["algorithm.loss=ppo", "ppo.reward_rule=refusal", "train.autocast=false"],
        ["pipeline.warm_start={}", "pairs.rejected=on_policy", "algorithm.loss=ama_dpo"],
    ],
)
def test_every_declared_key_of_every_stage_is_a_config_key(overrides):
    cfg = load_config(CONFIG, overrides)
    for stage in PIPELINE:
        restrict(cfg, stage.reads(cfg), stage.name)  # a declared key that does not exist raises ValueError
