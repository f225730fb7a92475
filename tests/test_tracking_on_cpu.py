"""Experiment tracking (eqrlhf.tracking): settings checked before Ray starts, and helpers that read back what
the real MLflow and W&B (offline) wrote. The end-to-end checks ride on runs other tests already make: the
tiny pipeline (MLflow, then W&B offline on a rerun that retrains, tests/test_pipeline_on_cpu.py), the threshold
sweep (MLflow, one run per Tune trial) beside a 2-trial Tune run through the sweep's W&B callbacks
(tests/test_sweep_on_cpu.py), and the reward model's training on 2 workers (W&B offline,
tests/test_train_on_cpu.py)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from eqrlhf.config import ConfigError, load_config
from eqrlhf.pipeline import run_pipeline
from eqrlhf.tracking import check_tracking, evaluation_metrics, flatten, stage_metrics


def test_an_unknown_backend_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match="tracking.backend"):
        load_config("configs/quickstart.yaml", ["tracking.backend=comet"])


@pytest.mark.parametrize("backend,module", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_backend_whose_package_is_missing_fails_before_ray(monkeypatch, tmp_path, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # what importlib reports for a package that is not there
    cfg = load_config("configs/quickstart.yaml", [f"run.output_dir={tmp_path}", f"tracking.backend={backend}"])
    with pytest.raises(ConfigError, match=r"tracking\.backend.*eqrlhf\[tracking\]"):
        check_tracking(cfg)
    with pytest.raises(ConfigError, match="tracking.backend"):
        run_pipeline(cfg)  # before any stage starts
    assert not (tmp_path / "quickstart").exists()
    check_tracking(load_config("configs/quickstart.yaml", ["tracking.backend=tensorboard"]))  # nothing to install


def test_config_params_and_manifest_counts_are_flat():
    assert flatten({"train": {"lr": 1e-5, "lora": {"target_modules": ["q_proj"]}}, "run": {"name": "x"}}) == {
        "train.lr": "1e-05",
        "train.lora.target_modules": '["q_proj"]',
        "run.name": "x",
    }
    manifest = {"rows_read": 10, "per_category": {"EHD": 3}, "filtered": {"no pair": 2}, "config_hash": "ab", "x": True}
    assert stage_metrics("pairs", manifest) == {
        "pairs/rows_read": 10.0,
        "pairs/per_category/EHD": 3.0,
        "pairs/filtered/no pair": 2.0,
    }


def test_evaluation_metrics_carry_the_intervals(tmp_path):
    doc = {"headline": {"over_refusal": {"rate": 0.5, "count": 1, "n": 2, "ci95": [0.1, 0.9]}}}
    (tmp_path / "eval.json").write_text(json.dumps(doc))
    assert evaluation_metrics({"trained": {"eval_json": str(tmp_path / "eval.json")}, "seconds": 3}) == {
        "eval/trained/over_refusal": 0.5,
        "eval/trained/over_refusal_ci_low": 0.1,
        "eval/trained/over_refusal_ci_high": 0.9,
        "eval/trained/over_refusal_n": 2.0,
    }


# ---- reading back what the trackers wrote ------------------------------------------------------------------


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client, client.search_runs([found.experiment_id])


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``; the installed wandb reads it only in its Go
    core): a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks of 32 KiB whose chunks (crc32,
    length, type 1 full / 2 first / 3 middle / 4 last) carry serialized ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_offline_run(folder: Path) -> dict:
    """One offline run's name, group, job type, config, logged history, summary, saved files (paths under the
    run's ``files/``) and exit code, read from its .wandb file."""
    (log,) = Path(folder).glob("run-*.wandb")
    out = {"history": [], "config": {}, "summary": {}, "files": [], "exit_code": None}

    def items(updates) -> dict:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}

    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
            out["config"].update(items(record.run.config.update))
        elif kind == "config":
            out["config"].update(items(record.config.update))
        elif kind == "history":
            out["history"].append(items(record.history.item))
        elif kind == "summary":
            out["summary"].update(items(record.summary.update))
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wandb_offline_runs(root: Path) -> list[dict]:
    """Every offline run under ``root/wandb`` (``folder``: its offline-run-* folder)."""
    return [{**wandb_offline_run(f), "folder": f} for f in sorted(Path(root, "wandb").glob("offline-run-*"))]
