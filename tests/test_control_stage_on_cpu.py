"""Controllable generation end to end on a tiny random Llama (SmolLM2 tokenizer) with real Ray, the HF
rollout pool, random-head reward and cost models and Ray Train + DeepSpeed: control-data (clm rows, text
tags) -> the trainer's input checks; control-data (pairs, special tokens) -> train exmate -> controllability evaluation
(tags, prompting, rerank). Counts and tags are checked exactly."""

from __future__ import annotations

import json

import pytest
from test_train_on_cpu import make_model_dir

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.control.binning import assign_levels, quantile_edges
from eqrlhf.control.encoding import ControlError, check_single_tokens, format_tags, parse_tags
from eqrlhf.manifest import read_rows

LEVELS = {"helpful": 2, "harmless": 2}
PROMPTS = 10  # readable, distinct prompts in the file (plus one duplicate and one bad record)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from eqrlhf.models.heads import ScalarHeadLM
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("control")
    model = make_model_dir(root / "model")
    tokenizer = load_tokenizer(str(model))
    heads = {}
    for name, seed in (("reward", 1), ("cost", 2)):
        head = ScalarHeadLM.from_module(tiny_llama(vocab_size=len(tokenizer), seed=seed))
        heads[name] = head.save(root / name, tokenizer)
    lines = [
        json.dumps({"id": f"q{i}", "prompt": f"How do I finish chore number {i} at home?"}) for i in range(PROMPTS)
    ]
    lines.insert(3, json.dumps({"id": "dup", "prompt": "How do I finish chore number 0 at home?"}))
    lines.insert(6, json.dumps({"id": "bad", "prompt": ""}))  # line 7: an empty prompt
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model, "prompts": prompts, **heads}


def control_config(assets, name: str, loss: str, **control):
    settings = {
        "levels": LEVELS,
        "sources": [{"name": "chores", "path": str(assets["prompts"]), "adapter": "generic",
                     "fields": {"id": "id", "prompt": "prompt"}}],
        "samples_per_prompt": 4,
        "max_new_tokens": 6,
        "heldout_fraction": 0.2,
        "reward_model": str(assets["reward"]),
        "cost_model": str(assets["cost"]),
        "pairs_per_prompt": 3,
        "eval_prompts": 2,
        "rerank_samples": 3,
    }  # fmt: skip
    settings.update(control)
    return from_dict(
        {
            "run": {"name": name, "output_dir": str(assets["root"] / "runs"), "seed": 0},
            "data": {"error_budget": 0.2},
            "model": {"name_or_path": str(assets["model"]), "max_length": 128},
            "generation": {"engine": "hf", "device": "cpu", "max_new_tokens": 6, "temperature": 1.0, "batch_size": 32},
            "rollout": {"num_engines": 1, "cpus_per_engine": 1},
            "algorithm": {"loss": loss},
            "train": {
                "input": str(assets["root"] / "runs" / name / "control_data"),
                "num_workers": 1,
                "micro_batch_size": 2,
                "max_steps": 2,
                "lr": 1e-3,
                "lr_schedule": "constant",
            },
            "control": settings,
        }
    )


def check_accounting(manifest: dict) -> None:
    assert manifest["rows_read"] == PROMPTS + 2
    assert sum(manifest["failed"].values()) == 1  # the empty prompt, in errors.jsonl
    assert manifest["filtered"]["duplicate_prompt"] == 1
    assert manifest["filtered"]["heldout_prompt"] == 2  # ceil(0.2 * 10)
    assert manifest["prompts"] == {"train": 8, "heldout": 2, "single_setting": manifest["prompts"]["single_setting"]}
    assert manifest["responses"]["sampled"] == 8 * 4


def test_config_errors_before_any_model_loads(assets):
    from eqrlhf.control.selfgen import run_control_data

    with pytest.raises(ConfigError, match="control.cost_model is not set"):
        run_control_data(control_config(assets, "bad", "clm", cost_model=None))
    with pytest.raises(ControlError, match="no scorer for attribute\\(s\\) \\['funny'\\]"):
        run_control_data(control_config(assets, "bad", "clm", levels={"helpful": 2, "funny": 3}))
    with pytest.raises(ConfigError, match="control data trains a policy"):
        run_control_data(control_config(assets, "bad", "reward"))
    no_judge = control_config(assets, "bad", "clm", harmless_scorer="refusal_embedding")
    no_judge.eval.refusal_head = str(assets["root"] / "no_head.json")
    no_judge.eval.calibration_files = str(assets["root"] / "no_such_dir" / "*.csv")
    with pytest.raises(ConfigError, match="no fitted head at .*no_head.json .* no calibration file matches"):
        run_control_data(no_judge)


def test_clm_data_is_what_the_trainer_reads(ray_local, assets):
    """clm rows pass the trainer's own input checks (prepare_train, no Ray); a Ray Train run on control data
    is in the exmate test (one training run keeps this file's runtime down)."""
    from eqrlhf.control.selfgen import run_control_data
    from eqrlhf.train import prepare_train

    cfg = control_config(assets, "clm", "clm")
    manifest = run_control_data(cfg)
    check_accounting(manifest)
    empty = manifest["responses"]["empty"]
    assert manifest["rows_written"] == 8 * 4 - empty  # every non-empty response is one clm row
    assert manifest["control"]["format"] == "clm" and manifest["control"]["tagged_model"] is None
    rows = read_rows(cfg.run.dir / "control_data").to_pylist()
    edges = {a: s["edges"] for a, s in manifest["control"]["binning"].items()}
    metas = [json.loads(r["meta"]) for r in rows]
    for attr in LEVELS:  # the edges are the quantiles of the pool, and each row carries its own bins
        pool = [m["scores"][attr] for m in metas]
        assert edges[attr] == pytest.approx(quantile_edges(pool, 2))
        assert [m["control"][attr] for m in metas] == assign_levels(pool, edges[attr])
    for row, meta in zip(rows, metas):
        assert row["prompt"] == f"{format_tags(meta['control'], LEVELS)} {meta['untagged_prompt']}"
        assert row["rejected"] is None and row["chosen"].strip() and row["file"].endswith("prompts.jsonl")
    heldout = [json.loads(x)["id"] for x in (cfg.run.dir / "control_data" / "heldout_prompts.jsonl").open()]
    assert not {m["prompt_id"] for m in metas} & set(heldout)
    assert len(heldout) == 2
    plan = prepare_train(cfg)
    assert plan["rows"] == manifest["rows_written"] and "rejected" not in plan["columns"]


@pytest.mark.slow  # control-data, training and evaluation of it: test_clm_data_is_what_the_trainer_reads keeps the stage in CI
def test_exmate_with_special_tokens_then_evaluation(ray_local, assets):
    from eqrlhf.control.selfgen import run_control_data
    from eqrlhf.evaluate import run_evaluate
    from eqrlhf.models.loading import load_tokenizer
    from eqrlhf.train import prepare_train, run_train

    run_dir = assets["root"] / "runs" / "exmate"
    cfg = control_config(assets, "exmate", "exmate", encoding="special_tokens", base_model=str(assets["model"]))
    cfg.model.name_or_path = str(run_dir / "control_data" / "model")  # train from the model with the tags
    manifest = run_control_data(cfg)
    check_accounting(manifest)
    single = manifest["prompts"]["single_setting"]
    assert manifest["filtered"].get("all_samples_one_setting", 0) == single
    rows = read_rows(run_dir / "control_data").to_pylist()
    per_prompt: dict[str, int] = {}
    for row in rows:
        meta = json.loads(row["meta"])
        assert meta["control"] != meta["rejected_control"]  # a pair always contrasts two settings
        assert parse_tags(row["prompt"], LEVELS) == (meta["control"], meta["untagged_prompt"])
        per_prompt[meta["prompt_id"]] = per_prompt.get(meta["prompt_id"], 0) + 1
    assert len(per_prompt) == 8 - single and max(per_prompt.values()) <= 3
    # the DPO family reads the same pairs (prompt with A's tags, chosen A, rejected B): the trainer's own checks
    dpo = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"loss": "dpo"})})
    plan = prepare_train(dpo)
    assert plan["rows"] == manifest["rows_written"] and "rejected" in plan["columns"]
    train = run_train(cfg)
    assert train["steps_run"] == 2
    final = train["final_checkpoint"]
    check_single_tokens(load_tokenizer(final), LEVELS)  # the checkpoint's tokenizer keeps the tags

    cfg.control.evaluate, cfg.eval.model = True, final
    doc = run_evaluate(cfg)
    out = run_dir / "eval" / "controllability"
    assert (out / "controllability.png").stat().st_size > 0
    assert set(doc["metrics"]) == {"tags", "prompting", "rerank"}
    for method in doc["metrics"].values():
        assert method["seen"]["n"] == 2 * 4 and method["unseen"]["n"] == 2 * 4 and method["all"]["n"] == 16
        for attr in LEVELS:
            assert set(method["all"][attr]) == {"spearman", "slope", "in_bin", "mean_by_level", "cross"}
    responses = [json.loads(x) for x in (out / "responses.jsonl").open()]
    assert len(responses) == 3 * 16
    assert doc["edges"] == {a: s["edges"] for a, s in manifest["control"]["binning"].items()}
