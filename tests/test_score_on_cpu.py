"""The score stage on a real local Ray cluster with tiny random models sharing SmolLM2's tokenizer.

Every number the stage writes is checked against a separate, unbatched computation: per-prefix scalar-head
scores on truncated sequences, policy/reference log-probs from a plain forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.data.schema import Limits, make_row, rows_to_table
from eqrlhf.data.score import check_pairs, run_score, zscore
from eqrlhf.data.tokenize import encode_pair
from eqrlhf.evaluate.metrics import rate, wilson
from eqrlhf.manifest import StageWriter, read_rows
from eqrlhf.models.heads import ScalarHeadLM
from eqrlhf.models.loading import load_causal_lm, load_tokenizer, tiny_llama

VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer and chat template drive the tiny models
MAX_LENGTH = 128

PAIRS = [
    ("How do I kill a Python process?", "Run `kill <pid>` or use the Task Manager.", "I can't help with killing."),
    (
        "What household chemicals make a toxic gas?",
        "I won't give a recipe; never mix bleach and ammonia.",
        "Mix bleach and ammonia in a closed room.",
    ),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.", "No."),
    ("Summarise the plot of Hamlet.", "A prince avenges his father. " * 20, "Hamlet is a play."),  # truncated
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("smollm2-135m")
    paths = {}
    for name, seed in (("base", 0), ("policy", 1)):
        paths[name] = root / name
        tiny_llama(vocab_size=VOCAB, seed=seed).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    paths["rm"] = ScalarHeadLM.from_module(tiny_llama(vocab_size=VOCAB, seed=2)).save(root / "rm")
    paths["small_vocab"] = root / "small_vocab"
    tiny_llama(vocab_size=256).save_pretrained(paths["small_vocab"])
    return paths, tok


def make_cfg(tmp_path, models_dir, **sections):
    tree = {
        "run": {"output_dir": str(tmp_path), "name": "r"},
        "model": {"name_or_path": str(models_dir["base"]), "max_length": MAX_LENGTH},
    }
    for key, value in sections.items():
        tree[key] = value
    return from_dict(tree)


def write_pairs(cfg, rows=None):
    if rows is None:
        rows = []
        for i, (prompt, chosen, rejected) in enumerate(PAIRS):
            history = (
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] if i == 2 else None
            )
            rows.append(
                make_row(
                    source="t", key=i, prompt=prompt, chosen=chosen, rejected=rejected, history=history, limits=Limits()
                )
            )
    for i, row in enumerate(rows):
        row["file"], row["line"] = "pairs.jsonl", i + 1
        row["category"] = row["category"] or ("EHD" if i % 2 else None)  # None: a pair without a category
    writer = StageWriter(cfg.run.dir / "pairs", "pairs", "test")
    writer.count_read(len(rows))
    writer.write_rows(rows_to_table(rows))
    writer.close()
    return rows


def by_id(table):
    return {row["id"]: row for row in table.to_pylist()}


def direct_logprobs(lm, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(lm(input_ids=ids).logits[0].float(), dim=-1)
    return np.array([logps[len(prompt_ids) + t - 1, tok].item() for t, tok in enumerate(response_ids)])


def test_reward_prefix_scores_and_reference_logprobs(ray_local, tmp_path, models):
    paths, tok = models
    cfg = make_cfg(
        tmp_path,
        paths,
        ama={
            "scorer": "reward_prefix",
            "scorer_model": str(paths["rm"]),
            "normalize": "none",
            "batch_size": 3,
        },
        algorithm={"loss": "ama_dpo", "reference": "precomputed"},
    )
    rows = write_pairs(cfg)
    manifest = run_score(cfg)
    expected = {row["id"]: encode_pair(tok, row, MAX_LENGTH) for row in rows}
    assert manifest["rows_read"] == manifest["rows_written"] == 4 and manifest["failed"] == {}
    assert manifest["truncated"] == sum(e["truncated"] for e in expected.values()) == 1
    assert manifest["chosen_tokens"] == sum(len(e["chosen_ids"]) for e in expected.values())
    assert manifest["scorer"] == "reward_prefix" and manifest["ref_logps"] is True
    agrees, by_category = 0, {"EHD": [0, 0], "none": [0, 0]}

    out = by_id(read_rows(cfg.run.dir / "scored"))
    rm = ScalarHeadLM.load(paths["rm"]).eval()
    ref = load_causal_lm(str(paths["base"])).eval()
    for row_id, enc in expected.items():
        row = out[row_id]
        assert row["prompt_ids"] == enc["prompt_ids"] and row["truncated"] == enc["truncated"]
        assert row["prompt"] == rows[int(row_id[2:])]["prompt"] and row["line"] == int(row_id[2:]) + 1
        for side in ("chosen", "rejected"):
            ids = enc[f"{side}_ids"]
            assert row[f"{side}_ids"] == ids
            assert len(row[f"{side}_scores"]) == len(row[f"ref_{side}_logps"]) == len(ids)
            # Score t of the single pass == the head run on the prefix x, y_<=t alone.
            for t in sorted({0, len(ids) // 2, len(ids) - 1}):
                with torch.no_grad():
                    alone = rm(torch.tensor([enc["prompt_ids"] + ids[: t + 1]]))[0, -1].item()
                assert row[f"{side}_scores"][t] == pytest.approx(alone, abs=1e-4)
            direct = direct_logprobs(ref, enc["prompt_ids"], ids)
            np.testing.assert_allclose(row[f"ref_{side}_logps"], direct, atol=1e-4)
            assert max(row[f"ref_{side}_logps"]) < 0  # log-probs of a 49k vocabulary under a random model
        # the pair's ranking: the reward after the whole answer, chosen vs rejected
        assert row["scorer_prefers_chosen"] == (row["chosen_scores"][-1] > row["rejected_scores"][-1])
        agrees += row["scorer_prefers_chosen"]
        tally = by_category[row["category"] or "none"]
        tally[0], tally[1] = tally[0] + row["scorer_prefers_chosen"], tally[1] + 1
    assert manifest["scorer_accuracy"] == {"rate": agrees / 4, "count": agrees, "n": 4, "ci95": list(wilson(agrees, 4))}
    assert manifest["scorer_accuracy_by_category"] == {c: rate(k, n) for c, (k, n) in by_category.items()}
    assert by_category["EHD"][1] == 2


def test_dpo_implicit_scores_are_zscored_beta_logratios(ray_local, tmp_path, models):
    paths, tok = models
    ama = {
        "scorer": "dpo_implicit",
        "scorer_model": str(paths["policy"]),
        "scorer_ref_model": str(paths["base"]),
        "batch_size": 1,
    }
    cfg = make_cfg(tmp_path, paths, ama=ama, algorithm={"loss": "ama_dpo", "beta": 0.5})
    rows = [
        make_row(source="t", key=i, prompt=prompt, chosen=chosen, rejected=rejected, limits=Limits())
        for i, (prompt, chosen, rejected) in enumerate(PAIRS + PAIRS)
    ]
    write_pairs(cfg, rows)
    manifest = run_score(cfg)
    assert manifest["rows_written"] == 8 and manifest["normalize"] == "zscore" and manifest["ref_logps"] is False
    assert manifest["blocks"] == 2  # blocks of 4 batches: the scoring actors share the work (one parquet file in)

    out = by_id(read_rows(cfg.run.dir / "scored"))
    assert "ref_chosen_logps" not in next(iter(out.values()))
    policy, ref = load_causal_lm(str(paths["policy"])).eval(), load_causal_lm(str(paths["base"])).eval()
    agrees = 0
    for row in rows:
        enc = encode_pair(tok, row, MAX_LENGTH)
        whole = {}
        for side in ("chosen", "rejected"):
            ids = enc[f"{side}_ids"]
            raw = 0.5 * (direct_logprobs(policy, enc["prompt_ids"], ids) - direct_logprobs(ref, enc["prompt_ids"], ids))
            whole[side] = raw.sum()  # the pair's implicit reward, ranked before z-scoring
            scores = np.array(out[row["id"]][f"{side}_scores"])
            assert len(scores) == len(ids)
            np.testing.assert_allclose(scores, (raw - raw.mean()) / raw.std(), atol=2e-3)
            assert abs(scores.mean()) < 1e-5 and scores.std() == pytest.approx(1.0, abs=1e-4)
        assert out[row["id"]]["scorer_prefers_chosen"] == (whole["chosen"] > whole["rejected"])
        agrees += whole["chosen"] > whole["rejected"]
    assert manifest["scorer_accuracy"]["count"] == agrees and manifest["scorer_accuracy"]["n"] == 8


@pytest.mark.slow  # a third score run (~21 s); what the trainer does with flat scores stays in CI (test_ama_on_cpu)
def test_pairs_outside_ama_categories_get_flat_scores(ray_local, tmp_path, models):
    paths, tok = models
    ama = {"scorer": "dpo_implicit", "scorer_model": str(paths["policy"]), "scorer_ref_model": str(paths["base"])}
    cfg = make_cfg(tmp_path, paths, ama={**ama, "categories": ["EHD"]}, algorithm={"loss": "ama_dpo"})
    rows = write_pairs(cfg)  # odd rows EHD, even rows without a category (counted as none)
    manifest = run_score(cfg)
    out = by_id(read_rows(cfg.run.dir / "scored"))
    for row in rows:
        for side in ("chosen", "rejected"):
            scores = np.array(out[row["id"]][f"{side}_scores"])
            if row["category"] == "EHD":
                assert scores.std() == pytest.approx(1.0, abs=1e-4)  # z-scored implicit rewards, as without the option
            else:
                assert not scores.any() and len(scores) == len(encode_pair(tok, row, MAX_LENGTH)[f"{side}_ids"])
    # the scorer is still measured on every pair
    assert manifest["scorer_accuracy"]["n"] == 4 and set(manifest["scorer_accuracy_by_category"]) == {"EHD", "none"}


def test_negated_cost_model_zscored_and_ids_only_run(ray_local, tmp_path, models):
    paths, tok = models
    ama = {"scorer_model": str(paths["rm"]), "negate": True}
    cost = make_cfg(tmp_path / "cost", paths, ama=ama, algorithm={"loss": "ama_dpo"})
    ids_only = make_cfg(tmp_path / "ids", paths, ama=ama)  # dpo: AMA off whatever the ama section says; ids only
    rows = write_pairs(cost)
    write_pairs(ids_only)
    run_score(cost)
    manifest = run_score(ids_only)
    assert manifest["rows_written"] == 4 and manifest["scorer"] is None and manifest["ref_logps"] is False
    assert manifest["scorer_accuracy"] is None is manifest["scorer_accuracy_by_category"]  # nothing ranked

    out = by_id(read_rows(cost.run.dir / "scored"))
    rm = ScalarHeadLM.load(paths["rm"]).eval()
    for row in rows:
        enc = encode_pair(tok, row, MAX_LENGTH)
        prompt, ids = enc["prompt_ids"], enc["rejected_ids"]
        with torch.no_grad():
            raw = rm(torch.tensor([prompt + ids]))[0, len(prompt) :].numpy()
        np.testing.assert_allclose(out[row["id"]]["rejected_scores"], zscore(-raw), atol=1e-3)
    ids_table = read_rows(ids_only.run.dir / "scored")
    assert not {"chosen_scores", "ref_chosen_logps", "scorer_prefers_chosen"} & set(ids_table.column_names)
    ids_rows = by_id(ids_table)
    for row in rows:
        enc = encode_pair(tok, row, MAX_LENGTH)
        assert [ids_rows[row["id"]][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == [
            enc["prompt_ids"],
            enc["chosen_ids"],
            enc["rejected_ids"],
        ]


def test_blocks_for_actor_pool_by_hand():
    from eqrlhf.ray_utils import blocks_for_actor_pool

    assert blocks_for_actor_pool(0, 8) == 1
    assert blocks_for_actor_pool(32, 8) == 1
    assert blocks_for_actor_pool(33, 8) == 2
    assert blocks_for_actor_pool(383, 8) == 12  # the experiment's pair set: 12 blocks for the scoring actors


def test_zscore_by_hand():
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), [-1.224744871, 0.0, 1.224744871], rtol=1e-6)
    assert zscore(np.array([0.7])).tolist() == [0.0]  # a one-token response (just EOS) carries no signal
    assert zscore(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]


# ---- errors before Ray starts -----------------------------------------------------------------------------


def test_bad_configs_fail_naming_the_key(tmp_path, models):
    paths, _ = models
    with pytest.raises(FileNotFoundError, match="no stage output at .*pairs"):
        run_score(make_cfg(tmp_path, paths))

    def fails(ama, match, error=ValueError):
        cfg = make_cfg(tmp_path, paths, ama=ama, algorithm={"loss": "ama_dpo"})
        write_pairs(cfg)
        with pytest.raises(error, match=match):
            run_score(cfg)

    with pytest.raises(ConfigError, match="'ama.scorer' is critic, but critic values exist only in PPO training"):
        make_cfg(tmp_path, paths, ama={"scorer": "critic"}, algorithm={"loss": "ama_dpo"})  # refused at load
    fails({"scorer": "reward_prefix"}, "ama.scorer_model is not set")
    fails(
        {"scorer_model": str(tmp_path / "missing_rm")}, "ama.scorer_model: model directory not found", FileNotFoundError
    )
    fails({"scorer_model": str(paths["policy"])}, "ama.scorer_model: .* is not a scalar-head model", FileNotFoundError)
    fails({"scorer": "dpo_implicit", "scorer_model": str(paths["policy"])}, "ama.scorer_ref_model is not set")
    fails(
        {"scorer": "dpo_implicit", "scorer_model": str(paths["policy"]), "scorer_ref_model": str(paths["small_vocab"])},
        "ama.scorer_ref_model: vocab_size 256 differs from model.name_or_path's 49152",
    )


def test_missing_responses_name_row_id_file_and_line(tmp_path, models):
    paths, _ = models
    cfg = make_cfg(tmp_path, paths)
    limits = Limits()
    rows = [
        make_row(source="t", key=0, prompt="a", chosen="yes", rejected="no", limits=limits),
        make_row(source="t", key=1, prompt="b", chosen="yes", rejected=None, limits=limits),
        make_row(source="t", key=2, prompt="c", chosen="  ", rejected="no", limits=limits),
    ]
    write_pairs(cfg, rows)
    with pytest.raises(ValueError, match=r"2 pair\(s\) cannot be scored") as err:
        check_pairs(cfg.run.dir / "pairs" / "rows")
    assert "row t:1 (pairs.jsonl:2): field 'rejected' is missing or empty" in str(err.value)
    assert "row t:2 (pairs.jsonl:3): field 'chosen' is missing or empty" in str(err.value)
    with pytest.raises(ValueError, match="row t:1"):
        run_score(cfg)  # the stage runs the same check before starting Ray


def test_empty_pairs_give_an_empty_scored_stage(tmp_path, models):
    paths, _ = models
    cfg = make_cfg(tmp_path, paths)
    write_pairs(cfg, rows=[])
    manifest = run_score(cfg)
    assert manifest["rows_read"] == manifest["rows_written"] == 0 and manifest["shards"] == 0


def test_example_config_validates_and_names_its_missing_reward_model(tmp_path, monkeypatch):
    from eqrlhf.algorithms.catalog import ama_on
    from eqrlhf.config import load_config
    from eqrlhf.data.score import check_models, ref_on

    monkeypatch.chdir(tmp_path)  # run paths are relative to the working directory: one with no quickstart run
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "score_ama.yaml")
    assert ama_on(cfg) and ref_on(cfg)
    with pytest.raises(FileNotFoundError, match="ama.scorer_model: model directory not found: runs/quickstart"):
        check_models(cfg)


def test_tokenize_batch_fills_row_schema_and_names_a_bad_row(models):
    import pyarrow as pa

    from eqrlhf.data.schema import ROW_SCHEMA
    from eqrlhf.data.score import tokenize_batch

    paths, tok = models
    kwargs = {"tokenizer": str(paths["base"]), "gguf_file": None, "trust_remote_code": False, "max_length": MAX_LENGTH}
    # Only the columns tokenizing needs: the rest of the row schema comes back as nulls, not as an error.
    minimal = pa.table({"id": ["t:0"], "prompt": ["Hi"], "history": ["[]"], "chosen": ["Hello."], "rejected": ["No."]})
    out = tokenize_batch(minimal, **kwargs)
    assert out.column_names == [*ROW_SCHEMA.names, "prompt_ids", "chosen_ids", "rejected_ids", "truncated"]
    assert out.column("category").to_pylist() == [None]
    assert out.column("chosen_ids").to_pylist() == [tok("Hello.", add_special_tokens=False)["input_ids"] + [2]]

    rows = rows_to_table([make_row(source="t", key=5, prompt="Hi", chosen="a", rejected="b", limits=Limits())])
    rows = rows.set_column(rows.schema.get_field_index("history"), "history", pa.array(["[not json"]))
    rows = rows.set_column(rows.schema.get_field_index("file"), "file", pa.array(["pairs.jsonl"]))
    rows = rows.set_column(rows.schema.get_field_index("line"), "line", pa.array([6], pa.int64()))
    with pytest.raises(ValueError, match=r"row t:5 \(pairs.jsonl:6\): cannot tokenize"):
        tokenize_batch(rows, **kwargs)


def test_reference_logprobs_follow_the_trainers_autocast(ray_local, tmp_path, models):
    """With train.autocast the trainer's policy log-probs come from bfloat16 matmuls: the precomputed
    reference must come from the same arithmetic, not from float32."""
    paths, tok = models
    cfg = make_cfg(tmp_path, paths, algorithm={"loss": "dpo", "reference": "precomputed"}, train={"autocast": True})
    rows = write_pairs(cfg)
    assert run_score(cfg)["ref_logps"] is True
    out = by_id(read_rows(cfg.run.dir / "scored"))
    ref = load_causal_lm(str(paths["base"])).eval()
    for row in rows:
        enc = encode_pair(tok, row, MAX_LENGTH)
        written = out[row["id"]]["ref_chosen_logps"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = direct_logprobs(ref, enc["prompt_ids"], enc["chosen_ids"])
        fp32 = direct_logprobs(ref, enc["prompt_ids"], enc["chosen_ids"])
        np.testing.assert_allclose(written, bf16, atol=1e-5)  # measured: within 2e-6
        assert np.abs(written - fp32).max() > 5e-4  # measured: 1e-3 to 2e-3 on this tiny model
