"""`eqrlhf <stage> -c CONFIG [key=value ...]`: one entry point for every stage.

The config is loaded and validated before anything else happens, so a typo in
a key fails in milliseconds instead of after a Ray cluster has started.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from eqrlhf.config import ConfigError, load_config

# stage name -> (module, function, one-line help). Imported lazily: `eqrlhf --help`
# should not pay for importing torch and Ray.
STAGES = {
    "categorize": ("eqrlhf.data.categorize_stage", "run_categorize", "stream sources and label EHD/IHD/MHD/none"),
    "categorize-train": ("eqrlhf.data.categorizers.embedding", "train_head", "fit the embedding categorizer head"),
    "mix": ("eqrlhf.data.mix", "run_mix", "build a training mixture from categorized data"),
    "pairs": ("eqrlhf.data.pairs", "run_pairs", "turn prompts into preference pairs"),
    "score": ("eqrlhf.data.score", "run_score", "add AMA token scores and reference log-probs"),
    "train": ("eqrlhf.train", "run_train", "Ray Train + DeepSpeed training (SFT, DPO family, BFPO, RM, cost)"),
    "evaluate": ("eqrlhf.evaluate", "run_evaluate", "harmful compliance, over-refusal and helpfulness of a model"),
    "control-data": ("eqrlhf.control.selfgen", "run_control_data", "self-generated, level-tagged data (controllable)"),
    "control-generate": ("eqrlhf.control.serve", "run_control_generate", "generate at chosen control levels"),
    "sweep": ("eqrlhf.tune", "run_sweep", "Ray Tune sweep over data ratios, scale and AMA settings"),
    "pipeline": ("eqrlhf.pipeline", "run_pipeline", "run the stages in order, skipping unchanged ones"),
}

# Errors that mean "your input is wrong": one line, no traceback (EQRLHF_DEBUG=1 shows it).
USER_ERRORS = (ConfigError, FileNotFoundError, KeyError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqrlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", help="YAML config file (defaults when omitted)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mix.counts.EHD=100")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"eqrlhf: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    module, func, _ = STAGES[args.stage]
    run = getattr(importlib.import_module(module), func)
    try:
        run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("EQRLHF_DEBUG"):
            traceback.print_exc()
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"eqrlhf {args.stage}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
