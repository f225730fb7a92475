"""Run the stages in order; skip a stage whose inputs and config did not change.

categorize -> mix -> pairs -> reward -> score -> train -> evaluate, then a before/after report.

Each stage's fingerprint hashes the config sections it reads plus the fingerprint
of the stage before it, so changing `mix.counts` re-runs mix and everything after
it, but not categorize. Fingerprints live in `<run>/pipeline_state.json`.

Some stages read paths that earlier stages write: with AMA scores from a reward model and no
`ama.scorer_model` given, the `reward` stage trains one on the pairs (`pipeline.reward_train`) and the
score stage and the evaluation read its final checkpoint. :func:`effective_config` fills those paths in.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eqrlhf.config import AlgorithmSection, Config

STATE_FILE = "pipeline_state.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    function: str
    sections: tuple[str, ...]  # config sections (dotted paths allowed) the stage reads: its fingerprint
    output: Callable[[Config], Path]
    applies: Callable[[Config], bool] = lambda cfg: True


def _scoring_needed(cfg: Config) -> bool:
    from eqrlhf.data.score import ama_on, ref_on

    return ama_on(cfg) or ref_on(cfg)


def reward_stage_needed(cfg: Config) -> bool:
    """AMA token scores from a reward model that the config does not name: the pipeline trains one."""
    from eqrlhf.data.score import ama_on

    return ama_on(cfg) and cfg.ama.scorer == "reward_prefix" and not cfg.ama.scorer_model


def reward_model_dir(cfg: Config) -> Path:
    return cfg.run.dir / "reward_model"


def effective_config(cfg: Config) -> Config:
    """The config the stages see: the pipeline's reward model filled in where the config leaves it open."""
    if not reward_stage_needed(cfg):
        return cfg
    final = str(reward_model_dir(cfg) / "final")
    ama = cfg.ama.model_copy(update={"scorer_model": final})
    ev = cfg.eval if cfg.eval.reward_model else cfg.eval.model_copy(update={"reward_model": final})
    return cfg.model_copy(update={"ama": ama, "eval": ev})


def reward_config(cfg: Config) -> Config:
    """The reward-model stage's config: Bradley-Terry loss on this run's pairs, `pipeline.reward_train` settings."""
    train = cfg.pipeline.reward_train.model_copy(
        update={"input": str(cfg.stage_dir(cfg.pairs.output, "pairs")), "output": str(reward_model_dir(cfg))}
    )
    return cfg.model_copy(update={"algorithm": AlgorithmSection(loss="reward"), "train": train})


def run_reward(cfg: Config) -> dict:
    from eqrlhf.train import run_train

    return run_train(reward_config(cfg))


def run_pipeline_evaluate(cfg: Config) -> dict:
    from eqrlhf.pipeline_report import evaluate_before_after

    return evaluate_before_after(cfg)


PIPELINE = [
    Stage(
        "categorize",
        "eqrlhf.data.categorize_stage",
        "run_categorize",
        ("data", "categorize"),
        lambda c: c.stage_dir(c.categorize.output, "categorized"),
    ),
    Stage("mix", "eqrlhf.data.mix", "run_mix", ("mix",), lambda c: c.stage_dir(c.mix.output, "mixture")),
    Stage(
        "pairs",
        "eqrlhf.data.pairs",
        "run_pairs",
        ("pairs", "generation", "model"),
        lambda c: c.stage_dir(c.pairs.output, "pairs"),
    ),
    Stage(
        "reward",
        "eqrlhf.pipeline",
        "run_reward",
        ("pipeline.reward_train", "model"),
        reward_model_dir,
        reward_stage_needed,
    ),
    Stage(
        "score",
        "eqrlhf.data.score",
        "run_score",
        ("ama", "algorithm", "model"),
        lambda c: c.stage_dir(c.ama.output, "scored"),
        _scoring_needed,
    ),
    Stage(
        "train",
        "eqrlhf.train",
        "run_train",
        ("train", "algorithm", "ama", "model"),
        lambda c: c.stage_dir(c.train.output, "train"),
    ),
    Stage(
        "evaluate",
        "eqrlhf.pipeline",
        "run_pipeline_evaluate",
        ("eval", "generation", "model", "categorize", "pipeline.evaluate_base"),
        lambda c: c.stage_dir(c.eval.output, "eval"),
    ),
]


def _pick(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def fingerprint(cfg: Config, sections: tuple[str, ...], upstream: str) -> str:
    tree = cfg.model_dump(mode="json")
    picked = {name: _pick(tree, name) for name in sections}
    picked["seed"] = tree["run"]["seed"]
    text = json.dumps(picked, sort_keys=True) + upstream
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def selected_stages(cfg: Config) -> list[Stage]:
    wanted = set(cfg.run.stages) if cfg.run.stages is not None else None
    return [s for s in PIPELINE if (s.name in wanted if wanted is not None else s.applies(cfg))]


def _run_stage(stage: Stage, cfg: Config) -> dict:
    return getattr(importlib.import_module(stage.module), stage.function)(cfg)


def run_pipeline(cfg: Config) -> dict:
    """Run the selected stages (skipping unchanged ones); print and return per-stage manifests.

    When the evaluate stage is selected, also writes ``<run>/report.md`` (base vs trained) and prints a
    one-screen before/after summary; ``report["report"]`` holds its path.
    """
    stages = selected_stages(cfg)  # before the reward model's path is filled in: it decides the reward stage
    cfg = effective_config(cfg)
    state_file = cfg.run.dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    upstream, report, timings, started_all = "", {}, {}, time.time()
    for stage in stages:
        fp = fingerprint(cfg, stage.sections, upstream)
        manifest_path = stage.output(cfg) / "manifest.json"
        if state.get(stage.name) == fp and manifest_path.is_file():
            print(f"[pipeline] {stage.name}: unchanged since the last run, skipped")
            report[stage.name] = {"skipped": True, **json.loads(manifest_path.read_text())}
            timings[stage.name] = None
        else:
            started = time.time()
            print(f"[pipeline] {stage.name}: running", flush=True)
            state.pop(stage.name, None)  # a stage that fails half-way must not look finished next time
            state_file.write_text(json.dumps(state, indent=2))
            report[stage.name] = _run_stage(stage, cfg)
            state[stage.name] = fp
            state_file.write_text(json.dumps(state, indent=2))
            timings[stage.name] = round(time.time() - started, 1)
            print(f"[pipeline] {stage.name}: done in {timings[stage.name]:.1f}s", flush=True)
        upstream = fp
    seconds = time.time() - started_all
    print(f"[pipeline] finished in {seconds:.1f}s; outputs in {cfg.run.dir}")
    if "evaluate" in report:
        from eqrlhf.pipeline_report import summary_screen, write_report

        path = write_report(cfg, report, timings, seconds)
        report["report"] = str(path)
        print(summary_screen(cfg, report, timings, seconds, path))
    return report
