"""Bad settings are refused at load, before Ray starts, naming the key; boundary values are accepted.

Every case runs through the real CLI (``eqrlhf pipeline`` or ``eqrlhf train``) in one fresh process, which
reports each exit code, its time and its message, and whether Ray was ever imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from eqrlhf.config import load_config

# (command, override, the key the message must name)
BAD = [
    ("train", "train.max_steps=0", "train.max_steps"),
    ("train", "train.lr=-1e-5", "train.lr"),
    ("train", "train.lr=0", "train.lr"),
    ("train", "train.grad_accum=0", "train.grad_accum"),
    ("train", "train.epochs=0", "train.epochs"),
    ("train", "train.micro_batch_size=0", "train.micro_batch_size"),
    ("train", "train.num_workers=0", "train.num_workers"),
    ("train", "train.warmup_steps=-1", "train.warmup_steps"),
    ("train", "train.weight_decay=-0.1", "train.weight_decay"),
    ("train", "train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train", "train.lora.r=-4", "train.lora.r"),
    ("train", "train.lora.dropout=1.0", "train.lora.dropout"),
    ("train", "algorithm.beta=0", "algorithm.beta"),
    ("train", "algorithm.label_smoothing=0.5", "algorithm.label_smoothing"),
    ("train", "algorithm.bfpo_tau=0", "algorithm.bfpo_tau"),
    ("train", "model.max_length=0", "model.max_length"),
    ("pipeline", "ama.tau=-0.1", "ama.tau"),
    ("pipeline", "mix.counts.EHD=-3", "mix.counts.EHD"),
    ("pipeline", "mix.counts.XHD=3", "mix.counts"),
    ("pipeline", "mix.general_ratio=-1", "mix.general_ratio"),
    ("pipeline", "mix.ratios={EHD: 0, IHD: 0}", "mix.ratios"),
    ("pipeline", "data.error_budget=1.5", "data.error_budget"),
    ("pipeline", "data.sources.0.limit=0", "data.sources.0.limit"),
    ("pipeline", "generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("pipeline", "eval.limit=0", "eval.limit"),
    ("pipeline", "categorize.embedding.test_fraction=1", "categorize.embedding.test_fraction"),
    ("pipeline", "pipeline.reward_train.lr=-1", "pipeline.reward_train.lr"),
    ("pipeline", "run.name=", "run.name"),
    ("pipeline", "algorithm.loss=ama_dop", "algorithm.loss"),
    ("train", "algorithm.loss=dpoo", "algorithm.loss"),
    ("pipeline", "ama.enabled=true", "ama.enabled"),  # removed: the loss name (ama_dpo, ama_ppo) turns AMA on
    ("train", "rollout.engine=vllm", "rollout.engine"),  # removed: generation.engine chooses every engine
    ("train", "ama.scorer=critic", "ama.scorer"),  # the quickstart's ama_dpo reads the score stage's scores
]

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys, time
    started = time.perf_counter()
    from eqrlhf.cli import build_parser, main
    build_parser()  # the one-off import of the stage registry, timed apart from the cases
    warmup = time.perf_counter() - started
    out = []
    for command, override in json.loads(sys.argv[1]):
        err = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main([command, "-c", "configs/quickstart.yaml", override])
        out.append({"code": code, "seconds": time.perf_counter() - started, "message": err.getvalue()})
    print(json.dumps({"results": out, "warmup": warmup, "ray_imported": "ray" in sys.modules}))
    """
)


def test_bad_settings_exit_2_naming_the_key_before_ray():
    cases = [[command, override] for command, override, _ in BAD]
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for (command, override, key), result in zip(BAD, report["results"]):
        assert result["code"] == 2, (command, override, result)
        assert f"'{key}'" in result["message"], (override, result["message"])
        assert result["seconds"] < 5, (override, result["seconds"])
    assert not report["ray_imported"]
    assert report["warmup"] < 30  # imports only (about 1 s on an idle 2-core machine): no model, no Ray


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=1e-12",
        "train.grad_accum=1",
        "train.max_steps=1",
        "train.epochs=1",
        "train.warmup_steps=0",
        "train.max_failures=-1",
        "train.grad_clip=0",
        "mix.ratios={EHD: 0.0, IHD: 1.0}",
        "mix.counts={EHD: 0, IHD: 3}",
        "mix.general_ratio=0",
        "data.error_budget=0",
        "data.error_budget=1",
        "algorithm.label_smoothing=0.49",
        "ama.tau=0",
        "model.max_length=16",
    ],
)
def test_boundary_values_are_accepted(override):
    load_config("configs/quickstart.yaml", [override])
