"""The config schema fails fast and precisely, before any Ray resource is taken."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eqrlhf.cli import main
from eqrlhf.config import ConfigError, load_config


def test_overrides_are_typed_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: demo\nmix:\n  counts: {EHD: 10}\n")
    cfg = load_config(path, ["mix.counts.IHD=3", "train.zero_stage=3", "train.lr=1e-5", "train.bf16=true"])
    assert cfg.run.name == "demo"
    assert cfg.mix.counts == {"EHD": 10, "IHD": 3}
    assert cfg.train.zero_stage == 3 and cfg.train.lr == pytest.approx(1e-5) and cfg.train.bf16 is True


def test_unknown_key_suggests_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'train.zero_stag' \(did you mean 'train.zero_stage'\?\)"):
        load_config(None, ["train.zero_stag=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'tran' \(did you mean 'train'\?\)"):
        load_config(None, ["tran.lr=1"])


def test_wrong_type_names_the_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.lr'.*got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"'train.zero_stage'"):
        load_config(None, ["train.zero_stage=4"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"])


def test_autocast_is_one_precision_and_offline_only():
    assert load_config(None, ["train.autocast=true"]).train.autocast is True
    with pytest.raises(ConfigError, match=r"'train'.*'autocast' and 'bf16' are both true"):
        load_config(None, ["train.autocast=true", "train.bf16=true"])
    with pytest.raises(ConfigError, match=r"'pipeline.warm_start'.*'autocast' and 'bf16'"):
        load_config("configs/quickstart.yaml", ["pipeline.warm_start.autocast=true", "pipeline.warm_start.bf16=true"])
    with pytest.raises(ConfigError, match=r"'train.autocast' is true, but algorithm.loss=ppo is online"):
        load_config(None, ["train.autocast=true", "algorithm.loss=ppo"])


def test_hash_changes_with_content_only():
    a, b = load_config(None, ["mix.counts.EHD=1"]), load_config(None, ["mix.counts.EHD=1"])
    assert a.hash() == b.hash() != load_config(None, ["mix.counts.EHD=2"]).hash()


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["mix", "mix.countz.EHD=3"]) == 2
    assert "did you mean 'mix.counts'" in capsys.readouterr().err


def test_cli_does_not_import_ray_for_a_config_error():
    # A typo must fail before Ray (or torch) is even imported: it takes milliseconds.
    code = (
        "import sys; from eqrlhf.cli import main; rc = main(['train', 'train.lrr=1']); print(rc, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "False"]


def test_overrides_reach_list_items_and_a_bad_index_is_named():
    cfg = load_config("configs/quickstart.yaml", ["data.sources.0.path=/data/mine.jsonl", "data.sources.0.limit=5"])
    assert (cfg.data.sources[0].path, cfg.data.sources[0].limit) == ("/data/mine.jsonl", 5)
    with pytest.raises(ConfigError, match=r"'data.sources' is a list of 1; '2' is not an index in it"):
        load_config("configs/quickstart.yaml", ["data.sources.2.path=x"])
    with pytest.raises(ConfigError, match=r"'run.name' is not a section"):
        load_config("configs/quickstart.yaml", ["run.name.first=x"])


def test_a_misspelled_key_inside_a_list_item_gets_the_nested_suggestion():
    with pytest.raises(
        ConfigError, match=r"unknown key 'data.sources.0.feilds' \(did you mean 'data.sources.0.fields'\?\)"
    ):
        load_config("configs/quickstart.yaml", ["data.sources=[{name: a, path: x.jsonl, feilds: {prompt: q}}]"])
