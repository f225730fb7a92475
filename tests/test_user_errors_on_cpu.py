"""Typed user errors: a wrong config or input exits 2 with one line and no traceback, also when a Ray worker
raised it; any other exception is a bug and keeps its traceback; a configured path that is not found names
the rule for relative paths and the absolute path tried."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eqrlhf.cli import main
from eqrlhf.config import load_config
from eqrlhf.control.encoding import ControlError
from eqrlhf.data.readers import SourceError
from eqrlhf.data.schema import RowError
from eqrlhf.errors import (
    PATH_RULE,
    ConfigError,
    InputError,
    InputNotFound,
    UserError,
    find_user_error,
    listing,
    tried,
)
from eqrlhf.manifest import ErrorBudgetExceeded, NothingWritten, read_manifest
from eqrlhf.models.loading import resolve_model
from eqrlhf.train.checkpoint import UnsafeCheckpointError, read_trainer_state

REPO = Path(__file__).resolve().parents[1]


def test_a_user_error_names_file_row_and_field_in_one_line_and_pickles():
    err = InputError("expected text, got int", file="a.jsonl", row=4, field="prompt")
    assert str(err) == "a.jsonl:4: field 'prompt': expected text, got int"
    assert str(ConfigError("must be > 0", field="train.lr")) == "train.lr: must be > 0"  # a config key
    assert str(InputError("no rows", file="x.parquet")) == "x.parquet: no rows"
    back = pickle.loads(pickle.dumps(err))  # how it crosses from a Ray worker to the driver
    assert (type(back), str(back), back.file, back.row, back.field) == (InputError, str(err), "a.jsonl", 4, "prompt")
    row = pickle.loads(pickle.dumps(RowError("prompt", "missing field")))
    assert (str(row), row.field, row.reason) == ("prompt: missing field", "prompt", "missing field")


def test_the_existing_error_classes_are_user_errors_and_keep_their_builtin_base():
    for cls in (ConfigError, InputError, SourceError, RowError, ControlError, ErrorBudgetExceeded, NothingWritten):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(UnsafeCheckpointError, UserError) and issubclass(UnsafeCheckpointError, ValueError)
    assert issubclass(InputNotFound, UserError) and issubclass(InputNotFound, FileNotFoundError)
    assert listing("bad", ["one"]) == "bad: one"
    assert listing("bad", ["one", "two"]) == "bad:\n  one\n  two"


# -- through the CLI ------------------------------------------------------------------------------------------


def test_a_malformed_record_exits_2_with_one_line_naming_file_row_and_field(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"question_y": "How do I bake bread?", "category": "No risk"}, {"category": "EHD"}]))
    code = main(["categorize-train", f"categorize.embedding.train_file={labels}", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"eqrlhf categorize-train: {labels}:2: field 'question_y': missing or empty\n"


def test_a_missing_data_file_exits_2_naming_the_rule_and_the_absolute_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the relative path below resolves here
    source = "data.sources=[{name: mine, path: data/mine.jsonl, adapter: generic, fields: {prompt: q}}]"
    assert main(["categorize", source]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("eqrlhf categorize: invalid data.sources: source 'mine' (data/mine.jsonl): path not found:")
    assert f"data/mine.jsonl (tried {tmp_path / 'data' / 'mine.jsonl'}; {PATH_RULE})" in err


def test_debug_mode_adds_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EQRLHF_DEBUG", "1")
    assert main(["categorize-train", f"categorize.embedding.train_file={tmp_path / 'none.json'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "InputNotFound" in err
    assert err.splitlines()[-1].startswith("eqrlhf categorize-train: labelled training file not found:")


@pytest.mark.parametrize("bug", [KeyError("x"), ValueError("a bug's ValueError"), ZeroDivisionError("division")])
def test_a_bug_is_not_reported_as_a_user_error(bug, monkeypatch):
    from eqrlhf.data.categorizers import embedding

    def train_head(cfg):
        raise bug

    monkeypatch.setattr(embedding, "train_head", train_head)
    with pytest.raises(type(bug)) as info:
        main(["categorize-train"])
    assert info.value is bug


def test_a_bug_exits_1_with_its_traceback():
    script = textwrap.dedent(
        """
        import sys
        from eqrlhf import cli
        from eqrlhf.data.categorizers import embedding
        embedding.train_head = lambda cfg: {}["x"]
        sys.exit(cli.main(["categorize-train"]))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" in run.stderr and run.stderr.rstrip().endswith("KeyError: 'x'")


# -- from Ray workers ---------------------------------------------------------------------------------------


def test_a_user_error_raised_in_a_ray_task_exits_2_with_one_line(ray_local, monkeypatch, capsys):
    import eqrlhf.cli

    @ray_local.remote
    def read_row():
        raise InputError("expected text, got int", file="a.jsonl", row=4, field="prompt")

    @ray_local.remote
    def divide():
        return 1 / 0

    monkeypatch.setattr(eqrlhf.cli, "_runner", lambda args: lambda cfg: ray_local.get(read_row.remote()))
    assert main(["mix"]) == 2
    assert capsys.readouterr().err == "eqrlhf mix: a.jsonl:4: field 'prompt': expected text, got int\n"
    monkeypatch.setattr(eqrlhf.cli, "_runner", lambda args: lambda cfg: ray_local.get(divide.remote()))
    with pytest.raises(ZeroDivisionError):
        main(["mix"])


def test_ray_train_worker_failures_are_unwrapped():
    from ray.train import ControllerError, WorkerGroupError

    user = InputError("bad checkpoint", file="ckpt", field="step")
    assert find_user_error(WorkerGroupError("failed", {1: user, 0: InputError("first rank")})).message == "first rank"
    assert find_user_error(WorkerGroupError("failed", {0: user, 1: ZeroDivisionError()})) is None  # a bug among them
    assert find_user_error(ControllerError(user)) is user
    assert find_user_error(KeyError("x")) is None


# -- paths not found ------------------------------------------------------------------------------------------


def test_paths_not_found_name_the_rule_and_the_absolute_path(tmp_path, monkeypatch):
    assert tried(tmp_path / "x") == str(tmp_path / "x")  # an absolute path is shown as it is
    monkeypatch.chdir(tmp_path)
    assert tried("runs/a") == f"runs/a (tried {tmp_path / 'runs' / 'a'}; {PATH_RULE})"
    with pytest.raises(ConfigError, match=f"config file not found: nope.yaml \\(tried {tmp_path}/nope.yaml; rel"):
        load_config("nope.yaml")
    with pytest.raises(InputNotFound, match=f"no stage output at runs/a/pairs \\(tried {tmp_path}/runs/a/pairs; "):
        read_manifest("runs/a/pairs")
    with pytest.raises(InputNotFound, match=f"^train.resume_from: model directory not found: ./m \\(tried {tmp_path}"):
        resolve_model("train.resume_from", "./m")
    with pytest.raises(InputNotFound, match=f"^eval.model: model directory not found: org/team/m \\(tried {tmp_path}"):
        resolve_model("eval.model", "org/team/m")  # deeper than a hub id's org/name: a local path
    with pytest.raises(InputNotFound, match=f"ckpt \\(tried {tmp_path}/ckpt; .*\\) is not a complete training ch"):
        read_trainer_state(Path("ckpt"))
