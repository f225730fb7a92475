"""`eqrlhf <stage> -c CONFIG [key=value ...]`: one entry point for every stage.

The config is loaded and validated before anything else happens, so a typo in
a key fails in milliseconds instead of after a Ray cluster has started.
``eqrlhf export RUN_DIR OUT_DIR`` and ``eqrlhf compare RUN_DIR...`` read a run's outputs and take no config.

Exit status: 0 done; 2 the config or the input is wrong (an ``eqrlhf.errors.UserError``, also one raised in a
Ray worker), printed as one message without a traceback (``EQRLHF_DEBUG=1`` shows it); 130 interrupted
(Ctrl-C), one line naming the stage; anything else is a bug and propagates with its traceback (Python exits 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from eqrlhf.config import ConfigError, load_config
from eqrlhf.errors import find_user_error
from eqrlhf.terminal import set_verbose

# commands that are not pipeline stages (eqrlhf.stages declares those): name -> (module, function, help).
# Imported on use: the sweep and control modules pull in Ray Tune and torch, which --help should not pay for.
COMMANDS = {
    "categorize-train": ("eqrlhf.data.categorizers.embedding", "train_head", "fit the embedding categorizer head"),
    "evaluate": ("eqrlhf.evaluate", "run_evaluate", "harmful compliance, over-refusal and helpfulness of a model"),
    "control-data": ("eqrlhf.control.selfgen", "run_control_data", "self-generated, level-tagged data (controllable)"),
    "control-generate": ("eqrlhf.control.serve", "run_control_generate", "generate at chosen control levels"),
    "sweep": ("eqrlhf.tune", "run_sweep", "Ray Tune sweep over data ratios, scale and AMA settings"),
    "pipeline": ("eqrlhf.pipeline", "run_pipeline", "run the stages in order, skipping unchanged ones"),
}
# single stages run through the registry (skipped when unchanged); the pipeline-only ones are left out
SINGLE_STAGES = ("categorize", "mix", "pairs", "score", "train")
# commands that read a run's outputs instead of a config: name -> (module, function, help); the function
# takes the parsed arguments as keywords
TOOLS = {
    "export": ("eqrlhf.export", "main_export", "write a run's final model for serving: weights, tokenizer, card"),
    "compare": ("eqrlhf.evaluate.compare", "main_compare", "compare evaluated runs: table, paired tests, plot"),
}


def _add_tool_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "export":
        p.add_argument("run_dir", help="a pipeline run folder, a train stage's output folder or a checkpoint")
        p.add_argument("out_dir", help="where to write the export (must not exist or be empty)")
    else:
        p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated runs; the first is the baseline")
        p.add_argument("--plot", default="compare_safety_plane.png", help="the safety-helpfulness plane PNG")
        p.add_argument("--json", help="also write the numbers to this file")


def build_parser() -> argparse.ArgumentParser:
    from eqrlhf.stages import STAGES

    parser = argparse.ArgumentParser(prog="eqrlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {name: STAGES[name].help for name in SINGLE_STAGES} | {k: v[2] for k, v in COMMANDS.items()}
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", help="YAML config file (defaults when omitted)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mix.counts.EHD=100")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument(
            "--verbose",
            action="store_true",
            help="show every line Ray prints and Ray Data's per-operator progress (the log files keep them anyway)",
        )
        if name in SINGLE_STAGES:
            p.add_argument("--force", action="store_true", help="run even when nothing it reads has changed")
        if name == "pipeline":
            p.add_argument("--plan", action="store_true", help="print which stages would run or skip, and why")
    for name, (_, _, help_text) in TOOLS.items():
        _add_tool_arguments(name, sub.add_parser(name, help=help_text))
    return parser


def _runner(args):
    if args.stage in SINGLE_STAGES:
        from eqrlhf.pipeline import run_stage
        from eqrlhf.stages import STAGES

        return lambda cfg: run_stage(STAGES[args.stage], cfg, force=args.force)
    if args.stage == "pipeline":
        from eqrlhf.pipeline import run_pipeline

        return lambda cfg: run_pipeline(cfg, plan_only=args.plan)
    module, func, _ = COMMANDS[args.stage]
    return getattr(importlib.import_module(module), func)


def _run_tool(args) -> int:
    module, func, _ = TOOLS[args.stage]
    keywords = {k: v for k, v in vars(args).items() if k != "stage"}
    return _guarded(args.stage, lambda: getattr(importlib.import_module(module), func)(**keywords))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage in TOOLS:
        return _run_tool(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"eqrlhf: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    set_verbose(args.verbose)  # before anything starts Ray (eqrlhf.terminal)
    run = _runner(args)
    return _guarded(args.stage, lambda: run(cfg))


def _guarded(command: str, call) -> int:
    """Run ``call``; a user error (also one raised in a Ray worker) prints one line and gives exit status 2."""
    try:
        call()
    except KeyboardInterrupt as err:  # Ctrl-C: one line (which stage, what the next run does), no traceback
        print(f"eqrlhf {command}: {str(err) or 'interrupted'}", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise  # a bug: the traceback is what its report needs
        if os.environ.get("EQRLHF_DEBUG"):
            traceback.print_exc()
        print(f"eqrlhf {command}: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
