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


def test_quickstart_dev_replaces_only_the_eval_suites(monkeypatch):
    """configs/quickstart_dev.yaml is the quickstart with the dev split of the bundled suites: the suite list
    is replaced (not appended to), everything else, run.name included, resolves as in quickstart.yaml, so
    `eqrlhf evaluate -c configs/quickstart_dev.yaml eval.model=... eval.tag=dev_trained` writes the run's
    runs/quickstart/eval/dev_trained; the suites read 60 rows each, categorized by their own labels."""
    from eqrlhf.evaluate.suites import load_suites

    monkeypatch.setenv("EQRLHF_DATA", "/data")
    monkeypatch.chdir(ROOT)
    test = load_config("configs/quickstart.yaml")
    overrides = ["eval.model=runs/quickstart/train/final", "eval.tag=dev_trained"]
    dev = load_config("configs/quickstart_dev.yaml", overrides)
    got, want = dev.model_dump(mode="json"), test.model_dump(mode="json")
    suites = got["eval"].pop("suites")
    for key in ("suites", "model", "tag"):
        want["eval"].pop(key)
    assert (got["eval"].pop("model"), got["eval"].pop("tag")) == ("runs/quickstart/train/final", "dev_trained")
    assert got == want
    names = [f"quickstart_dev_{kind}" for kind in ("harmful", "benign", "helpful")]
    assert [(s["name"], s["kind"]) for s in suites] == [(n, n.rsplit("_", 1)[1]) for n in names]
    assert [s["sources"][0]["path"] for s in suites] == [f"configs/suites/{n}.jsonl" for n in names]
    assert dev.stage_dir(dev.eval.output, "eval") / dev.eval.tag == Path("runs/quickstart/eval/dev_trained")
    read = {s.name: s for s in load_suites(dev)}
    assert {n: len(s.rows) for n, s in read.items()} == dict.fromkeys(names, 60)
    harmful = [r["category"] for r in read["quickstart_dev_harmful"].rows]
    assert {c: harmful.count(c) for c in ("EHD", "IHD", "MHD")} == {"EHD": 24, "IHD": 20, "MHD": 16}
    assert all(r["category"] == "none" for n in names[1:] for r in read[n].rows)
