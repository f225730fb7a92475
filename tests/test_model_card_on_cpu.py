"""Model cards generated from a run's files: front matter huggingface_hub can read, the training config, the
mixture by category from the data stages' manifests, the evaluation with intervals, and a licence that
follows the data (the demo corpus is the project's own; a CC-BY-NC source makes the model non-commercial).

The run folder is written by hand in the layout the stages leave (the end-to-end pipeline test checks the
cards of a real tiny run); the evaluations are the quickstart's published ones in docs/results.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from eqrlhf.config import load_config
from eqrlhf.fingerprint import path_digest
from eqrlhf.model_card import write_evaluated_card, write_model_card
from eqrlhf.model_card_data import PROJECT_LICENCE, source_licence
from eqrlhf.train.driver import link_final

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "quickstart"


def stage(folder: Path, per_category: dict, per_source: dict) -> None:
    folder.mkdir(parents=True)
    manifest = {"rows_written": sum(per_category.values()), "per_category": per_category, "per_source": per_source}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def make_run(root: Path, per_source: dict, overrides=()) -> tuple:
    cfg = load_config("configs/quickstart.yaml", [f"run.output_dir={root}", "run.name=qs", *overrides])
    run = root / "qs"
    stage(run / "mixture", {"EHD": 5, "IHD": 3, "MHD": 2, "none": 10}, {"demo": 20})
    stage(run / "pairs", {"EHD": 5, "IHD": 3, "MHD": 2, "none": 8}, per_source)
    stage(run / "scored", {"EHD": 5, "IHD": 3, "MHD": 2, "none": 8}, per_source)
    step = run / "train" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    link_final(run / "train", str(step))
    manifest = {"steps_run": 3, "seconds": 12.5, "final_metrics": {"loss": 0.5, "rewards/accuracy": 0.75}}
    (run / "train" / "manifest.json").write_text(json.dumps(manifest))
    return cfg, run, manifest


def test_card_of_a_quickstart_run_before_and_after_its_evaluation(tmp_path):
    cfg, run, manifest = make_run(tmp_path, {"demo": 18})
    digest = path_digest(run / "train" / "final")
    path = write_model_card(run / "train" / "final", cfg, train_manifest=manifest)
    assert path == (run / "train" / "checkpoints" / "step_3" / "README.md")
    # a card never changes the fingerprint of the model folder later stages read
    assert path_digest(run / "train" / "final") == digest
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0" and card.data.datasets == ["demo"]
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"eqrlhf", "safety", "ama-dpo", "text-generation"} <= set(card.data.tags)
    text = card.text
    assert "| loss | `ama_dpo` (AMA token mask) |" in text and "| learning rate | 3e-06, cosine schedule" in text
    assert "| steps run | 3 in 12 s |" in text and "loss 0.5000, rewards/accuracy 0.7500" in text
    assert "```yaml\nrun:\n  name: qs" in text  # the full config
    # the mixture by category, one column per data stage, from their manifests
    assert "| category | mixture | pairs | trained on |" in text
    assert "| EHD | 5 | 5 | 5 |" in text and "| none | 10 | 8 | 8 |" in text and "| all | 20 | 18 | 18 |" in text
    assert "| demo | `eqrlhf/data/demo_corpus.jsonl` | 18 | Apache-2.0 (eqrlhf's own demo corpus) |" in text
    assert "Not evaluated by its run" in text and "Answers missing from the corpus were generated" in text

    for tag, source in (("trained", "shipped"), ("base", "base")):
        (run / "eval" / tag).mkdir(parents=True)
        shutil.copy(RESULTS / source / "eval.json", run / "eval" / tag / "eval.json")
    entries = {tag: {"eval_json": str(run / "eval" / tag / "eval.json")} for tag in ("trained", "base")}
    text = ModelCard.load(write_evaluated_card(cfg, entries)).text
    assert "| metric | this model | base model |" in text
    assert "| harmful compliance (lower is better) | 51.7% [39.3, 63.8] (31/60) | 86.7% [75.8, 93.1] (52/60) |" in text
    assert "| over-refusal of benign look-alikes (lower is better) | 6.7% [2.6, 15.9] (4/60) |" in text
    assert "| likelihood retention (higher is better) | +0.416 [+0.356, +0.476] (n=60) |" in text
    assert "- refusal judge `rule`: accuracy 0.921 [0.896, 0.941], F1 0.915 (n=560)" in text
    assert "It still complied with 52% of the harmful evaluation prompts." in text
    assert path_digest(run / "train" / "final") == digest


def shared_folder(root: Path) -> Path:
    """A data folder with the manifest format of ../shared/data (licence per file, copied from SOURCES.md)."""
    (root / "safety").mkdir(parents=True)
    for name in ("nc.jsonl", "mit.jsonl", "mystery.jsonl"):
        (root / "safety" / name).write_text("{}\n")
    licences = {"safety/nc.jsonl": {"license": "CC-BY-NC-4.0"}, "safety/mit.jsonl": {"license": "MIT"}}
    (root / "manifest.json").write_text(json.dumps(licences))
    return root


@pytest.mark.parametrize(
    "per_source, licence",
    [({"demo": 8, "nc": 4, "mit": 6}, "cc-by-nc-4.0"), ({"demo": 8, "mit": 6}, "apache-2.0"), ({"odd": 2}, "other")],
)
def test_the_licence_follows_the_data_the_model_was_trained_on(tmp_path, per_source, licence):
    data = shared_folder(tmp_path / "data")
    sources = [
        "{name: demo, path: eqrlhf/data/demo_corpus.jsonl, adapter: generic}",
        "{name: nc, path: '{data_root}/safety/nc.jsonl', adapter: generic}",
        "{name: mit, path: '{data_root}/safety/mit.jsonl', adapter: generic}",
        "{name: odd, path: '{data_root}/safety/mystery.jsonl', adapter: generic}",
    ]
    overrides = [f"data.data_root={data}", f"data.sources=[{', '.join(sources)}]"]
    cfg, run, manifest = make_run(tmp_path / "runs", per_source, overrides)
    card = ModelCard.load(write_model_card(run / "train" / "final", cfg, train_manifest=manifest))
    assert card.data.license == licence and card.data.datasets == list(per_source)  # only sources trained on
    if licence == "cc-by-nc-4.0":
        assert "**Non-commercial use only.** Trained on data licensed CC-BY-NC (nc)" in card.text
    elif licence == "other":
        assert "The licence of odd is not recorded or not permissive: check it before distributing." in card.text
        assert "| odd | `{data_root}/safety/mystery.jsonl` | 2 | unknown |" in card.text
    else:
        assert "Every source allows redistribution; the model is released under Apache-2.0." in card.text


def test_licences_of_the_shared_datasets_come_from_their_manifest(shared_data):
    assert source_licence(shared_data / "safety_training" / "hh_rlhf_harmless_base_test.jsonl.gz") == ("MIT", False)
    licence, _ = source_licence(shared_data / "safety_training" / "pku_saferlhf_sample32.json")
    assert "CC-BY-NC-4.0" in licence  # "Apache-2.0 repo; PKU-SafeRLHF content is CC-BY-NC-4.0"
    assert source_licence(REPO / "eqrlhf" / "data" / "demo_corpus.jsonl") == (PROJECT_LICENCE, True)


def test_the_demo_corpus_licence_is_the_projects():
    declared = re.search(r'^license = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)  # SPDX (PEP 639)
    assert declared and declared.group(1) == PROJECT_LICENCE


def test_a_config_that_trains_on_an_earlier_runs_pairs_takes_that_runs_sources(tmp_path):
    # `eqrlhf train -c configs/train_reward_cpu.yaml` style: train.input is the quickstart run's pairs, and the
    # config lists no data.sources; the pipeline config that run saved does
    data = shared_folder(tmp_path / "data")
    sources = "[{name: nc, path: '{data_root}/safety/nc.jsonl', adapter: generic}]"
    earlier, _, _ = make_run(tmp_path / "runs", {"nc": 18}, [f"data.data_root={data}", f"data.sources={sources}"])
    run = tmp_path / "runs" / "qs"
    (run / "config.json").write_text(json.dumps(earlier.model_dump(mode="json")))
    cfg = load_config(
        "configs/train_reward_cpu.yaml", [f"train.input={run / 'pairs'}", f"train.output={run / 'reward_model'}"]
    )
    assert cfg.data.sources == []
    step = run / "reward_model" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    card = ModelCard.load(write_model_card(step, cfg))
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["nc"]
    assert "| nc | `{data_root}/safety/nc.jsonl` | 18 | CC-BY-NC-4.0 |" in card.text
    # nothing recorded anywhere: the card does not claim a licence
    (run / "config.json").unlink()
    card = ModelCard.load(write_model_card(step, cfg))
    assert card.data.license == "other" and "No data source is recorded for this run" in card.text
