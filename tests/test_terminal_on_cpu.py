"""What a person reads on the terminal of a Ray-backed command (eqrlhf.terminal): one progress bar per stage with
its ETA and none redrawn after the stage ends, none of the lines Ray prints on every run, and the pipeline's
summary at the end; the Ray session's log files keep what the terminal leaves out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_train_on_cpu import make_model_dir, pair_rows, write_stage

from eqrlhf.cli import build_parser
from eqrlhf.data.schema import rows_to_table
from eqrlhf.terminal import HARMLESS_WORKER_LINES, _ClosedBars, keep_worker_line

REPO = Path(__file__).resolve().parents[1]
# a tqdm bar as the driver draws it: "train loss 0.6931:  50%|#####     | 2.00/4.00 [00:02<00:02, 1.47s/step]"
BAR = re.compile(r"train( loss [-\d.]+)?: +\d+%\|.*\| [\d.]+/[\d.]+ \[")
RAY_NOISE = [
    "PlacementGroupCleaner",  # its State API warning every second, or its thread's traceback
    "Failed to query Ray Train Controller actor state",
    "Exception in thread",
    "Token authentication is enabled",
    "Started training worker group",
    "Setting up process group for",
    "Checkpoint successfully created at",
    "deepspeed_shm_comm_op built successfully",
    "Loading weights:",
]


def test_pipeline_terminal_one_bar_no_ray_noise_and_a_summary(tmp_path):
    """`eqrlhf pipeline` run for real in a fresh process (its own local Ray cluster) on a tiny random Llama: the
    train stage's Ray Train run, 3 steps, with the output read as a terminal log would keep it."""
    model = make_model_dir(tmp_path / "tiny")
    write_stage(tmp_path / "quickstart" / "pairs", rows_to_table(pair_rows(8)))
    one_worker = ["num_workers=1", "zero_stage=0", "micro_batch_size=1", "grad_accum=1", "max_steps=3"]
    command = [
        *("pipeline", "-c", "configs/quickstart.yaml", f"run.output_dir={tmp_path}", f"model.name_or_path={model}"),
        *("run.stages=[train]", "pipeline.warm_start=null", "algorithm.loss=dpo", "algorithm.reference=in_trainer"),
        *[f"train.{o}" for o in one_worker],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EQRLHF_VERBOSE")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "eqrlhf.cli", *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in the order a terminal shows it
        text=True,
        timeout=600,
    )
    text = done.stdout
    assert done.returncode == 0, text[-4000:]
    for noise in RAY_NOISE:
        assert noise not in text, noise
    lines = re.split(r"[\r\n]", text)  # a bar redraws itself after a carriage return
    (ended,) = [i for i, line in enumerate(lines) if "[pipeline] train: done in" in line]
    bars = [i for i, line in enumerate(lines) if BAR.search(line)]
    assert bars and max(bars) < ended, "a progress bar drawn again after its stage ended"
    assert len({re.search(r"\(pid=(\d+)\)", lines[i]).group(1) for i in bars}) == 1  # one bar, the rank 0 worker's
    assert any(re.search(r"3(\.00)?/3(\.00)? \[\d\d:\d\d<\d\d:\d\d", lines[i]) for i in bars)  # finished, with its ETA
    # the summary screen: each stage's time and outcome, where the outputs and the full logs are
    summary = text[text.index("eqrlhf pipeline 'quickstart' (dpo) finished in") :].splitlines()
    assert re.fullmatch(r"train +\d+ s  3 steps, final loss \d\.\d{4}", summary[2])
    assert f"outputs: {tmp_path / 'quickstart'}" in summary
    (logs_line,) = [line for line in summary if line.startswith("logs:")]
    logs = Path(logs_line.split()[1])
    kept = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.suffix in (".out", ".err", ".log"))
    assert "Started training worker group" in kept and "deepspeed_shm_comm_op built successfully" in kept


def test_what_the_terminal_leaves_out_and_verbose():
    assert build_parser().parse_args(["pipeline", "--verbose"]).verbose
    assert not build_parser().parse_args(["train", "-c", "x.yaml"]).verbose
    harmless = [
        "Started training worker group of size 2: ",
        "- (ip=192.0.2.2, pid=5446) world_rank=0, local_rank=0, node_rank=0",
        "Loading weights:   0%|          | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|##| 21/21",
        "[2026-12-05 22:50:47,177 E 5315 5355] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
        "ID: 'e1e5' has constructor arguments in the object store and max_restarts > 0.",
        "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is "
        "deprecated. Please use `torch.distributed.all_gather_single` instead.",
        "  return func(*args, **kwargs)",
        "",
    ]
    kept = [
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory",
        "loss went NaN at step 3",
        "/x/y.py:3: FutureWarning: `foo` is deprecated",
    ]
    for line in harmless:
        assert not keep_worker_line(line, HARMLESS_WORKER_LINES) and keep_worker_line(line, []), line
    for line in kept:
        assert keep_worker_line(line, HARMLESS_WORKER_LINES), line
    # a bar's state that arrives after the bar closed would draw a bar nobody closes: dropped
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    def state(x: int, closed: bool) -> str:
        return json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "uuid": "u1", "x": x, "closed": closed})

    bars = _ClosedBars()
    assert [bars.keep(s) for s in (state(1, False), state(3, True), state(3, True), state(3, False))] == [
        True,
        True,
        False,
        False,
    ]
    assert bars.keep("an ordinary line")
