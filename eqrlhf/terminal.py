"""What a Ray-backed command shows on the driver's terminal, and what it leaves to the log files.

The terminal gets the stages' own lines, one progress bar at a time (Ray Data's whole-dataset bar, the
trainer's step bar, the evaluation's generation bar, each with its ETA) and the pipeline's summary. Lines Ray,
Ray Train, Ray Data, DeepSpeed and transformers print on every run and that say nothing about this run are
left off the terminal: every one of them is still in the Ray session's log files (``logs/worker-*.out|err``,
``logs/ray-data/``, ``logs/train/``), whose folder the pipeline's summary prints. ``--verbose``
(``EQRLHF_VERBOSE=1``) shows them all again, with Ray Data's per-operator bars and its usual progress logs.

Driver only: :func:`before_ray_init` and :func:`after_ray_init` are called by ``eqrlhf.ray_utils.init_ray``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

VERBOSE_ENV = "EQRLHF_VERBOSE"

# Lines that Ray workers stream to the driver and that the terminal leaves out (the worker's log file keeps
# them). Matched with re.search against the line without Ray's "(Actor pid=...)" prefix.
HARMLESS_WORKER_LINES = [
    # Ray Train's controller announcing each step of starting its worker group, and each worker setting up
    # torch.distributed: printed on every run, the train stage prints what it trained on and how
    re.compile(r"^Requesting resources: \{"),
    re.compile(r"^Attempting to start training worker group of size \d+"),
    re.compile(r"^Started training worker group of size \d+"),
    re.compile(r"^- \(ip=[^)]*\) world_rank=\d+, local_rank=\d+, node_rank=\d+"),
    re.compile(r"^Setting up process group for: "),
    # Ray Train confirming each checkpoint and report: the train stage prints the final checkpoint's path
    re.compile(r"^Checkpoint successfully created at: Checkpoint\("),
    re.compile(r"^Reporting training result \d+: TrainingReport\("),
    # Ray's C++ core about Ray Train's own PreemptionWatcher actor (its constructor arguments sit in the
    # object store and it may restart): nothing a user of Ray Train can or needs to change
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*constructor arguments"),
    # DeepSpeed, in each worker, saying it compiled its shared-memory collective op
    re.compile(r"^DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully"),
    # transformers' progress bars for loading and saving a checkpoint, one per worker and load: each arrives
    # as a line of its own, so they stack up instead of moving; the stage's own bar shows its progress
    re.compile(r"^\s*(Loading weights|Loading checkpoint shards|Writing model shards): "),
    # torch 2.13 deprecates all_gather_into_tensor, which DeepSpeed's ZeRO still calls: Python prints the warning
    # and then the source line of torch's deprecation wrapper, once per training worker, often after the
    # pipeline's summary (the worker flushes late). Only DeepSpeed can change it.
    re.compile(r"FutureWarning: `torch\.distributed\.all_gather_into_tensor` is deprecated"),
    re.compile(r"^\s*return func\(\*args, \*\*kwargs\)$"),
    # Ray Data run inside a worker (the driver-side lines are in HARMLESS_DRIVER_RECORDS): see there
    re.compile(r"INFO streaming_executor\.py:\d+ -- (Starting execution of|Execution plan of|✔️  Dataset)"),
]
# DeepSpeed on a cluster without GPUs: it says it uses the CPU, which is the plan there. Left off only when the
# cluster has no GPU (after_ray_init decides): where there are GPUs, the same line means they were not found.
CPU_ACCELERATOR_LINE = re.compile(r"\[real_accelerator\.py:\d+:get_accelerator\] Setting accelerator to CPU\.")

# Messages of the driver's own Ray Data logger that the terminal leaves out (ray-data.log keeps them)
HARMLESS_DRIVER_RECORDS = [
    # once per dataset: where its logs go, its operator plan and how long it took (the stage prints its
    # counts and time; the summary prints where the logs are)
    re.compile(r"^Starting execution of Dataset "),
    re.compile(r"^Execution plan of Dataset "),
    re.compile(r"^✔️  Dataset \S+ execution finished in "),
    # Ray Data's notes on the progress display, which after_ray_init chose on purpose: one bar per dataset, and
    # logged progress (no terminal) at most once a minute
    re.compile(r"^Progress will be logged because stdout is a non-interactive terminal"),
    re.compile(r"^\[dataset\]: A new progress UI is available"),
    re.compile(r"^Progress bars for operators disabled"),
]

# Ray's notice, when it starts a local cluster, that it turned on token authentication (its default): the
# secure setting needs no action. The warning that authentication is *off* is not filtered.
TOKEN_AUTH_NOTICE = re.compile(r"^Token authentication is enabled for this Ray cluster")
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Data's progress when stdout is no terminal (a log file, CI): every 10 s by default, once a minute here
DATA_PROGRESS_INTERVAL_ENV = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"
DATA_PROGRESS_INTERVAL_S = 60

_RAY_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives the driver's worker-log printer


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """``--verbose``: an environment variable, so that every process the command starts sees it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__("eqrlhf.terminal")
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def before_ray_init() -> None:
    """The settings that must be in place before ``ray.init`` (or before Ray Data's first dataset)."""
    if verbose():
        return
    _add_filter_once(logging.getLogger(TOKEN_AUTH_LOGGER), [TOKEN_AUTH_NOTICE])
    os.environ.setdefault(DATA_PROGRESS_INTERVAL_ENV, str(DATA_PROGRESS_INTERVAL_S))


def after_ray_init() -> None:
    """Filter the worker lines the driver prints, Ray Data's driver-side logs and its progress bars."""
    import ray

    drop = [] if verbose() else list(HARMLESS_WORKER_LINES)
    if drop and not ray.cluster_resources().get("GPU"):
        drop.append(CPU_ACCELERATOR_LINE)
    _filter_worker_lines(drop)
    if verbose():
        return
    import ray.data

    # one bar per dataset (its total rows, with an ETA) instead of one more per operator
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            _add_filter_once(handler, HARMLESS_DRIVER_RECORDS)  # the console only: the file handlers keep all


def _add_filter_once(target: logging.Filterer, patterns: list[re.Pattern]) -> None:
    if not any(isinstance(f, _DropMessages) for f in target.filters):
        target.addFilter(_DropMessages(patterns))


def keep_worker_line(line: str, drop: list[re.Pattern]) -> bool:
    """Whether the terminal shows ``line`` from a worker (without Ray's "(Actor pid=...)" prefix)."""
    if not line.strip():
        # a progress bar that closes on a worker ends its line: alone it prints as an empty prefixed line
        return bool(not drop)
    return not any(p.search(line) for p in drop)


class _ClosedBars:
    """Ray's distributed tqdm (ray.experimental.tqdm_ray) sends each bar's state as a JSON line in the worker's
    output; the driver draws a bar for every id it has not seen, closed or not. A state that arrives after its
    bar closed (a line printed twice, or late) so draws a new bar that never closes and is redrawn under every
    later line until the command exits. Those late states are dropped, in verbose mode too."""

    def __init__(self):
        self.ids: set[str] = set()

    def keep(self, line: str) -> bool:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        if RAY_TQDM_MAGIC not in line:
            return True
        try:
            state = json.loads(line)
        except ValueError:
            return True  # Ray reports a line it cannot decode itself
        if state.get("uuid") in self.ids:
            return False
        if state.get("closed"):
            self.ids.add(state.get("uuid"))
        return True


def _filter_worker_lines(drop: list[re.Pattern]) -> None:
    """Wrap the handler ``ray.init(log_to_driver=True)`` registered, which prints the workers' lines on the
    driver, in one that leaves out ``drop`` and late progress-bar states. Ray offers no public hook for this;
    when its private dispatcher changes shape, the terminal simply shows everything."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handlers = dict(getattr(dispatcher, "handlers", []))
    printer = handlers.get(_RAY_PRINT_HANDLER)
    if printer is None or getattr(printer, "eqrlhf_filtered", False):
        return
    closed = _ClosedBars()

    def filtered(data: dict) -> None:
        lines = data.get("lines", [])
        kept = [line for line in lines if closed.keep(line) and keep_worker_line(line, drop)]
        if kept or not lines:
            printer({**data, "lines": kept})

    filtered.eqrlhf_filtered = True
    dispatcher.remove_handler(_RAY_PRINT_HANDLER)
    dispatcher.add_handler(_RAY_PRINT_HANDLER, filtered)


def ray_log_dir() -> Path | None:
    """The Ray session's log folder on this machine (the head node's when the driver joined a cluster):
    every worker's output, Ray Data's and Ray Train's logs. None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray._private.worker._global_node  # what Ray Data's own get_log_directory reads
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (ImportError, AttributeError):
        return None
