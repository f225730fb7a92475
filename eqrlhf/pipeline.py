"""Run stages (eqrlhf.stages), skipping one whose fingerprint matches its last successful run.

``eqrlhf pipeline`` runs every stage that applies (or ``run.stages``) in order, then writes a before/after
report; ``eqrlhf <stage>`` runs one stage through :func:`run_stage`, so it skips the same way;
``eqrlhf pipeline --plan`` prints what would run and why without running anything.

A stage's state (its fingerprint parts) is written to ``<output>/stage_state.json`` after the stage
succeeds and removed before it starts. A stage runs when its state is missing, when any declared key, input
file or the package version changed, or when an earlier stage that writes one of its inputs runs in the
same plan (its inputs will change).

Stages write their output beside the old one and swap it in when complete (eqrlhf.atomic), so a stage that
fails or is interrupted leaves the previous output, without its state: the next run redoes the stage. Ctrl-C
raises :class:`StageInterrupted` (a KeyboardInterrupt naming the stage), which ``eqrlhf`` prints as one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from eqrlhf.atomic import INTERRUPTED_SUFFIX, write_json
from eqrlhf.config import Config, ConfigError
from eqrlhf.errors import UserError, listing
from eqrlhf.fingerprint import changed_parts, clear_state, fingerprint, read_state, write_state
from eqrlhf.model_card import write_evaluated_card
from eqrlhf.pipeline_report import summary_screen, write_report
from eqrlhf.restricted_config import restrict
from eqrlhf.stages import PIPELINE, Stage, effective_config
from eqrlhf.terminal import ray_log_dir
from eqrlhf.tracking import PipelineRun, check_tracking

MANIFEST = "manifest.json"


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C while a stage ran. Its output is written beside the previous one (eqrlhf.atomic), so the previous
    output is untouched; its state was cleared before it started, so the next run redoes it. ``eqrlhf`` prints
    the message as one line and exits 130."""

    def __init__(self, stage: str, out_dir: Path, in_place: bool = False):
        kept = out_dir.with_name(out_dir.name + INTERRUPTED_SUFFIX)
        if in_place:  # evaluate, and training that continues its own checkpoints, write where they are
            where = f"{out_dir} may be partly rewritten"
        else:
            where = f"{out_dir} is as it was before the stage started"
            where += f"; this attempt is kept in {kept}" if kept.exists() else ""  # training: its checkpoints
        super().__init__(f"interrupted during the {stage} stage: {where}; the next run redoes the {stage} stage")
        self.stage = stage


def _writes_in_place(stage: Stage, cfg: Config) -> bool:
    """Stages that do not write their output beside the old one: evaluate (one folder per evaluated model,
    each file replaced whole) and a training run continuing its own checkpoints (``resume`` without
    ``resume_from``)."""
    if stage.name == "evaluate":
        return True
    settings = {"train": cfg.train, "warm_start": cfg.pipeline.warm_start, "reward": cfg.pipeline.reward_train}
    train = settings.get(stage.name)
    return train is not None and train.resume and not train.resume_from


@dataclass
class Decision:
    stage: Stage
    run: bool
    reasons: list[str]  # why it runs ("config mix.counts changed", "never ran", ...); empty when skipped


def selected_stages(cfg: Config) -> list[Stage]:
    wanted = set(cfg.run.stages) if cfg.run.stages is not None else None
    return [s for s in PIPELINE if (s.name in wanted if wanted is not None else s.applies(cfg))]


def _reason(part: str) -> str:
    kind, _, name = part.partition(":")
    return {"config": f"config {name} changed", "file": f"input {name} changed", "code": "eqrlhf version changed"}.get(
        kind, part
    )


def decide(stage: Stage, cfg: Config, rerun_outputs: set[Path] = frozenset(), force: bool = False) -> Decision:
    """Whether ``stage`` must run for ``cfg``; ``rerun_outputs`` are outputs of earlier stages that run."""
    inputs = stage.inputs(cfg)
    parts = fingerprint(cfg.model_dump(mode="json"), stage.reads(cfg), inputs)
    reasons = ["forced"] if force else [_reason(p) for p in changed_parts(read_state(stage.output(cfg)), parts)]
    reasons += [
        f"input {p} is rewritten by an earlier stage"
        for p in inputs
        if any(p == out or out in p.parents for out in rerun_outputs)
    ]
    reasons = list(dict.fromkeys(reasons))  # one file may be two inputs (the warm start: policy and scorer)
    return Decision(stage, bool(reasons), reasons)


def plan(cfg: Config, stages: list[Stage] | None = None) -> list[Decision]:
    """The decision for each selected stage, in order, without running anything."""
    stages = stages if stages is not None else selected_stages(cfg)  # the raw config decides the reward stage
    rerun: set[Path] = set()
    out = []
    for stage in stages:
        stage_cfg = effective_config(cfg, stage.name)
        decision = decide(stage, stage_cfg, rerun)
        if decision.run:
            rerun.add(stage.output(stage_cfg))
        out.append(decision)
    return out


def print_plan(decisions: list[Decision]) -> None:
    for d in decisions:
        why = "; ".join(d.reasons) if d.run else "unchanged since the last run"
        print(f"[plan] {d.stage.name}: {'run' if d.run else 'skip'} ({why})")


def run_stage(stage: Stage, cfg: Config, force: bool = False, label: str = "") -> dict:
    """Run ``stage`` unless its fingerprint is unchanged (``force`` runs it anyway); returns its manifest,
    with ``skipped: true`` when it was skipped."""
    decision = decide(stage, cfg, force=force)
    out_dir = stage.output(cfg)
    prefix = f"[{label or stage.name}]"
    if not decision.run:
        print(f"{prefix} {stage.name}: unchanged since the last run, skipped (--force runs it)")
        return {"skipped": True, **json.loads((out_dir / MANIFEST).read_text())}
    print(f"{prefix} {stage.name}: running ({'; '.join(decision.reasons)})", flush=True)
    clear_state(out_dir)
    try:
        # the stage sees only its declared keys; the fingerprint above and below is of the whole config
        manifest = stage.run(restrict(cfg, stage.reads(cfg), stage.name))
    except KeyboardInterrupt:
        raise StageInterrupted(stage.name, out_dir, _writes_in_place(stage, cfg)) from None
    # recomputed after the run: a stage may write an input it reads (the refusal judge's head on first use)
    write_state(out_dir, stage.name, fingerprint(cfg.model_dump(mode="json"), stage.reads(cfg), stage.inputs(cfg)))
    return manifest


def check_all(stages: list[Stage], cfg: Config) -> None:
    """Every selected stage's own checks before any stage runs; all problems in one error. ``cfg`` is the
    raw config: each stage is checked with the config it will see (effective_config)."""
    problems = []
    for stage in stages:
        try:
            if stage.check is not None:
                stage.check(effective_config(cfg, stage.name))
        except UserError as err:  # a bug in a check keeps its traceback
            problems.append(f"{stage.name}: " + str(err).replace("\n", "\n    "))
    if problems:
        raise ConfigError(listing(f"the pipeline did not start, {len(problems)} problem(s)", problems))


def run_pipeline(cfg: Config, plan_only: bool = False) -> dict:
    """Run the selected stages (skipping unchanged ones); print and return per-stage manifests.

    Ends with a one-screen summary (eqrlhf.pipeline_report.summary_screen): each stage's time and outcome, the
    outputs and the Ray session's log folder. When the evaluate stage is selected, also writes
    ``<run>/report.md`` (base vs trained), rewrites the trained model's card with its evaluation
    (``report["model_card"]``) and puts the before/after numbers on that screen; ``report["report"]`` holds the
    report's path.
    """
    stages = selected_stages(cfg)  # before the reward model's path is filled in: it decides the reward stage
    if plan_only:
        decisions = plan(cfg, stages)
        print_plan(decisions)
        return {d.stage.name: {"run": d.run, "reasons": d.reasons} for d in decisions}
    check_tracking(cfg)
    check_all(stages, cfg)  # the raw config: each stage gets its own effective_config below
    shown = effective_config(cfg)  # the run's config as written and reported
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg.run.dir / "config.json", shown.model_dump(mode="json"))
    tracked = PipelineRun(shown)  # the MLflow / W&B parent run (eqrlhf.tracking); a no-op when tracking is off
    try:
        report = _run_selected(cfg, stages, shown, tracked)
    except BaseException:
        tracked.finish(None)
        raise
    tracked.finish(report)
    return report


def _run_selected(cfg: Config, stages: list[Stage], shown: Config, tracked: PipelineRun) -> dict:
    report, timings, started_all = {}, {}, time.time()
    for stage in stages:
        started = time.time()
        report[stage.name] = run_stage(stage, effective_config(cfg, stage.name), label="pipeline")
        tracked.stage(stage.name, report[stage.name], stage.output(effective_config(cfg, stage.name)))
        skipped = report[stage.name].get("skipped", False)
        timings[stage.name] = None if skipped else round(time.time() - started, 1)
        if not skipped:
            print(f"[pipeline] {stage.name}: done in {timings[stage.name]:.1f}s", flush=True)
    seconds = time.time() - started_all
    print(f"[pipeline] finished in {seconds:.1f}s; outputs in {cfg.run.dir}")
    path = None
    if "evaluate" in report:
        path = write_report(shown, report, timings, seconds)
        report["report"] = str(path)
        card = write_evaluated_card(effective_config(cfg, "train"), report["evaluate"])
        if card is not None:
            report["model_card"] = str(card)
            print(f"[pipeline] model card: {card}")
    print(summary_screen(shown, report, timings, seconds, path, ray_log_dir()), flush=True)
    return report
