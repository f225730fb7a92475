"""Every shipped config, fully resolved (extends applied, defaults filled), matches the committed snapshot:
composing configs from bases and overlays must not change what runs. After a deliberate change, rewrite
the snapshot with

    EQRLHF_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_shipped_configs_on_cpu.py

and review its diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eqrlhf.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "resolved_configs.json"
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def resolved(monkeypatch) -> dict:
    monkeypatch.setenv("EQRLHF_DATA", "/data")  # the default data root comes from the environment
    monkeypatch.chdir(ROOT)
    return {str(p.relative_to(ROOT)): load_config(p.relative_to(ROOT)).model_dump(mode="json") for p in SHIPPED}


def test_every_shipped_config_resolves_to_its_snapshot(monkeypatch):
    got = resolved(monkeypatch)
    if os.environ.get("EQRLHF_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want), "a config was added or removed: rewrite the snapshot (see module doc)"
    for name in want:
        assert got[name] == want[name], f"{name} resolves differently from tests/golden/resolved_configs.json"


def test_extends_merges_mappings_replaces_lists_and_refuses_loops(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lr: 1.0e-5, epochs: 2}\neval: {compare: [a, b]}\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\ntrain: {epochs: 3}\n")
    (tmp_path / "top.yaml").write_text("extends: [mid.yaml]\neval: {compare: [c]}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.train.lr, cfg.train.epochs, cfg.eval.compare) == (1.0e-5, 3, ["c"])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="'extends' loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere.yaml \(extended by .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
