"""Search spaces over config keys, trial configs, and the resources one trial needs.

Everything here is checked before Ray starts: a searched key that is not a config key, a range that
the schema rejects, a grid over a continuous range, a metric no suite can measure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

from eqrlhf.config import Config, ConfigError, SweepParam, from_dict

DIRECTIONS = {"harmful_compliance": "min", "over_refusal": "min", "helpfulness": "max"}
# keys a trial sets itself (its run dir and stage paths); searching them would make trials collide
RESERVED_PREFIXES = ("run.", "sweep.", "pipeline.")
PER_TRIAL_PATHS = (
    "mix.output",
    "pairs.input",
    "pairs.output",
    "ama.input",
    "ama.output",
    "train.input",
    "train.output",
    "eval.output",
)
# settings that may change between an interrupted sweep and its resumption
RESUMABLE_SETTINGS = ("resume", "max_concurrent_trials", "cpus_per_trial", "gpus_per_trial")


def set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep.space key '{dotted}': '{part}' is not a section")
    node[leaf] = value


def sample_values(name: str, param: SweepParam) -> list:
    """Values that stand for the range (its ends, or every choice) when checking a key against the schema."""
    where = f"sweep.space['{name}']"
    if param.type == "choice":
        if not param.values:
            raise ConfigError(f"{where}: type choice needs a non-empty 'values' list")
        return list(param.values)
    if param.low is None or param.high is None:
        raise ConfigError(f"{where}: type {param.type} needs 'low' and 'high'")
    if param.low > param.high:
        raise ConfigError(f"{where}: low {param.low} is above high {param.high}")
    if param.log and param.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {param.low}")
    if param.type == "int" and (param.low != int(param.low) or param.high != int(param.high)):
        raise ConfigError(f"{where}: type int needs whole-number bounds, got {param.low}..{param.high}")
    cast = int if param.type == "int" else float
    return [cast(param.low), cast(param.high)]


def validate_space(cfg: Config) -> None:
    """Every searched key must be a config key that accepts the values it may take."""
    sweep = cfg.sweep
    if not sweep.space:
        raise ConfigError("sweep.space is empty: name at least one config key to search, e.g. mix.counts.EHD")
    base = cfg.model_dump(mode="json")
    for name, param in sweep.space.items():
        if name.startswith(RESERVED_PREFIXES) or name in PER_TRIAL_PATHS:
            raise ConfigError(f"sweep.space key '{name}' is set per trial by the sweep and cannot be searched")
        if sweep.search == "grid" and param.type != "choice":
            raise ConfigError(f"sweep.space['{name}']: sweep.search=grid needs type choice (a list of values)")
        for value in sample_values(name, param):
            tree = copy.deepcopy(base)
            set_dotted(tree, name, value)
            try:
                from_dict(tree, f"sweep.space['{name}'] = {value!r}")
            except ConfigError as err:
                raise ConfigError(str(err).replace("unknown key", "sweep.space names unknown key")) from None


def validate_objectives(cfg: Config) -> None:
    sweep = cfg.sweep
    if not sweep.objectives:
        raise ConfigError("sweep.objectives is empty")
    unknown = sorted(set(sweep.weights) - set(DIRECTIONS))
    if unknown:
        raise ConfigError(f"sweep.weights: unknown metric(s) {unknown}; known: {sorted(DIRECTIONS)}")
    needed = set(sweep.objectives) | {k for k, w in sweep.weights.items() if w}
    kinds = {s.kind for s in cfg.eval.suites}
    for metric, kind in (("harmful_compliance", "harmful"), ("over_refusal", "benign"), ("helpfulness", "helpful")):
        if metric in needed and kind not in kinds:
            raise ConfigError(f"sweep measures {metric}, but eval.suites has no suite of kind '{kind}'")
    if "helpfulness" in needed and sweep.helpfulness == "reward" and not cfg.eval.reward_model:
        from eqrlhf.stages import reward_stage_needed

        if not reward_stage_needed(cfg):
            raise ConfigError("sweep.helpfulness=reward needs eval.reward_model (a ScalarHeadLM dir)")
    if sweep.evaluations > 1 and cfg.train.lr_schedule != "constant":
        raise ConfigError(
            f"sweep.evaluations={sweep.evaluations} trains each trial in {sweep.evaluations} resumed chunks, and a "
            f"'{cfg.train.lr_schedule}' schedule would decay to zero at the end of every chunk: "
            "set train.lr_schedule=constant (or sweep.evaluations=1)"
        )


def tune_domain(param: SweepParam, grid: bool):
    from ray import tune

    if param.type == "choice":
        return tune.grid_search(list(param.values)) if grid else tune.choice(list(param.values))
    if param.type == "int":
        low, high = int(param.low), int(param.high)
        return tune.lograndint(low, high + 1) if param.log else tune.randint(low, high + 1)  # upper bound exclusive
    return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)


def param_space(cfg: Config) -> dict:
    grid = cfg.sweep.search == "grid"
    return {name: tune_domain(param, grid) for name, param in cfg.sweep.space.items()}


def trial_config(base: dict, params: dict, trial_dir: Path, shared: dict) -> Config:
    """The config of one trial: the sweep's config, the sampled values, and the trial's own run dir.

    ``shared`` holds paths the sweep driver prepared once for every trial (``mix.input``,
    ``ama.scorer_model``, ``eval.reward_model``, and ``train.input`` with ``eval.training_data`` when the
    data stages are shared), applied only where the config leaves them unset.
    """
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    tree["run"].update(output_dir=str(trial_dir.parent), name=trial_dir.name, stages=None)
    for key in PER_TRIAL_PATHS:
        set_dotted(tree, key, None)
    for key, value in shared.items():
        section, field = key.split(".")
        if tree[section].get(field) in (None, []):
            tree[section][field] = value
    return from_dict(tree, f"sweep trial {trial_dir.name}")


def sweep_hash(cfg: Config) -> str:
    """What must match for an interrupted sweep to be resumed: everything but resources and the resume flag."""
    tree = cfg.model_dump(mode="json")
    for key in RESUMABLE_SETTINGS:
        tree["sweep"].pop(key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def trial_resources(cfg: Config) -> tuple[dict, dict]:
    """(what the trial's own process asks Tune for, what the trial uses at its peak).

    The trial process generates and judges during evaluation (``generation.num_gpus``); its Ray Train
    workers are placed by Ray Train, not by Tune, so the peak adds them: ``train.num_workers`` x
    (``train.cpus_per_worker`` CPUs, ``train.gpus_per_worker`` GPUs with ``train.use_gpu``). ``sweep.cpus_per_trial`` and
    ``sweep.gpus_per_trial`` replace the derived peak.
    """
    train, sweep = cfg.train, cfg.sweep
    own = {"CPU": 1.0, "GPU": float(cfg.generation.num_gpus)}
    peak = {
        "CPU": sweep.cpus_per_trial or own["CPU"] + train.num_workers * train.cpus_per_worker,
        "GPU": sweep.gpus_per_trial
        if sweep.gpus_per_trial is not None
        else own["GPU"] + (train.num_workers * train.gpus_per_worker if train.use_gpu else 0),
    }
    return own, peak


def max_concurrent(cfg: Config, cluster: dict) -> int:
    """How many trials fit at once: the cluster's CPUs and GPUs over one trial's peak, capped by config."""
    _, peak = trial_resources(cfg)
    fits = []
    for resource in ("CPU", "GPU"):
        if peak[resource] > 0:
            fits.append(math.floor(cluster.get(resource, 0) / peak[resource] + 1e-9))
    n = min(fits) if fits else 1
    if n < 1:
        raise ConfigError(
            f"one sweep trial needs {peak['CPU']:g} CPU and {peak['GPU']:g} GPU at its peak "
            f"(sweep.cpus_per_trial / sweep.gpus_per_trial, or train.* and generation.num_gpus); "
            f"the cluster has {cluster.get('CPU', 0):g} CPU and {cluster.get('GPU', 0):g} GPU"
        )
    if cfg.sweep.max_concurrent_trials:
        n = min(n, cfg.sweep.max_concurrent_trials)
    return n


def eval_points(total_steps: int, evaluations: int) -> list[int]:
    """Optimizer steps after which a trial is evaluated: evenly spaced fractions of its own training."""
    points = sorted({max(1, round(total_steps * k / evaluations)) for k in range(1, evaluations + 1)})
    return [p for p in points if p <= total_steps]
