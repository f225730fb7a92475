"""The three categorizers: label maps on real shared data, the embedding head, the LLM judge."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from eqrlhf.config import CATEGORIES, ConfigError, from_dict
from eqrlhf.data.adapters import ADAPTERS, Context
from eqrlhf.data.categorizers import add_categories, input_block_rows, validate_categorizer
from eqrlhf.data.categorizers.embedding import Head, head_from_sklearn, load_head, save_head, train_head
from eqrlhf.data.categorizers.judge import build_judge_prompt, parse_judgement, read_judge_template
from eqrlhf.data.categorizers.labels import map_labels
from eqrlhf.data.schema import ROW_SCHEMA

EQUILIBRATE = "equilibrate_rlhf/beavertails_selected_relabelled.json"


def config(tmp_path, shared_data=None, **categorize):
    tree = {"run": {"output_dir": str(tmp_path)}, "categorize": categorize}
    if shared_data is not None:
        tree["data"] = {"data_root": str(shared_data)}
    return from_dict(tree)


def adapt(adapter: str, records, source: str, file_stem: str = "") -> pa.Table:
    """Run real adapter rows into a block shaped like the reader's: row columns + ``error``."""
    ctx = Context(source=source, file_stem=file_stem)
    if ADAPTERS[adapter].flatten is not None:
        records = list(ADAPTERS[adapter].flatten(records))
    rows = [row for i, record in enumerate(records) for row in ADAPTERS[adapter].rows(record, i, ctx)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    return table.append_column("error", pa.nulls(len(rows), pa.string()))


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def outcome(table: pa.Table) -> Counter:
    """category, or the kind of category_error ("unmapped label" / "unparsed"), per row."""
    cats, errs = table.column("category").to_pylist(), table.column("category_error").to_pylist()
    return Counter(c if c is not None else e.split(":")[0] for c, e in zip(cats, errs))


# --- labels ------------------------------------------------------------------------------


def test_equilibrate_labels_give_exact_counts_and_route_other(tmp_path, shared_data):
    records = json.loads((shared_data / EQUILIBRATE).read_text())
    raw = Counter(r["category"] for r in records)  # the file's own counts, to compare against
    assert raw == {"IHD": 1239, "MHD": 394, "EHD": 347, "OTHER": 342, "No risk": 99}
    out = map_labels(adapt("equilibrate", records, "equilibrate"), config(tmp_path))
    assert outcome(out) == {"IHD": 1239, "MHD": 394, "EHD": 347, "none": 99, "unmapped label": 342}
    other = [e for e, lab in zip(out["category_error"].to_pylist(), out["label"].to_pylist()) if lab == "OTHER"]
    assert len(other) == 342
    assert other[0].startswith("unmapped label: source 'equilibrate' label 'OTHER' (marked unclassified")
    # the source prior must not turn "unclassified" into EHD; an explicit default does apply
    out = map_labels(adapt("equilibrate", records, "equilibrate"), config(tmp_path, default_category="MHD"))
    assert outcome(out) == {"IHD": 1239, "MHD": 394 + 342, "EHD": 347, "none": 99}


def test_xstest_types_and_beavertails_categories(tmp_path, shared_data):
    cfg = config(tmp_path)
    xs = outcome(map_labels(adapt("xstest", read_csv(shared_data / "over_refusal/xstest_prompts.csv"), "xs"), cfg))
    # 250 safe -> none; unsafe twins: 5 explicit types x 25 EHD, discr + privacy IHD, historical events MHD
    assert xs == {"none": 250, "EHD": 125, "IHD": 50, "MHD": 25}
    bt = read_csv(shared_data / "harmful_behaviors/beavertails_evaluation.csv")
    assert outcome(map_labels(adapt("beavertails_eval", bt, "bt"), cfg)) == {"EHD": 400, "IHD": 300}


def test_source_prior_separates_jbb_twins_with_the_same_labels(tmp_path, shared_data):
    cfg = config(tmp_path)
    harmful = adapt("jbb_harmful", read_csv(shared_data / "harmful_behaviors/jbb_behaviors_harmful.csv"), "jbb_h")
    benign = adapt("jbb_benign", read_csv(shared_data / "over_refusal/jbb_behaviors_benign.csv"), "jbb_b")
    assert set(harmful["label"].to_pylist()) == set(benign["label"].to_pylist())  # same 10 categories
    assert outcome(map_labels(harmful, cfg)) == {"EHD": 100}
    assert outcome(map_labels(benign, cfg)) == {"none": 100}
    assert outcome(map_labels(harmful, config(tmp_path, harmful_category="IHD"))) == {"IHD": 100}


def test_safety_tuned_llama_eval_sets_by_file(tmp_path, shared_data):
    cfg = config(tmp_path)
    expected = {"I-PhysicalSafetySafe": {"none": 100}, "I-PhysicalSafetyUnsafe": {"IHD": 100}, "I-CoNa": {"EHD": 178}}
    for stem, counts in expected.items():
        document = json.loads((shared_data / f"safety_tuned_llamas/{stem}.json").read_text())
        assert outcome(map_labels(adapt("stl_eval", document, "stl", file_stem=stem), cfg)) == counts, stem


def test_user_label_map_precedence_and_unmapped_without_prior(tmp_path):
    rows = [
        {"id": f"s:{i}", "source": src, "prompt": "p", "label": lab, "harmful": harmful}
        for i, (src, lab, harmful) in enumerate(
            [("a", "x", None), ("b", "x", None), ("c", "y", None), ("d", "EHD", None), ("d", None, None)]
        )
    ]
    table = pa.Table.from_pylist(rows).append_column("error", pa.nulls(5, pa.string()))
    cfg = config(tmp_path, label_map={"a:x": "IHD", "x": "MHD", "d:*": "none"})
    out = map_labels(table, cfg)
    # "a:x" beats "x"; the user map (even "d:*") is consulted before the built-in "EHD" label
    assert out["category"].to_pylist() == ["IHD", "MHD", None, "none", "none"]
    assert out["category_error"][2].as_py() == (
        "unmapped label: source 'c' label 'y' (no mapping and no source prior; "
        "add categorize.label_map['y'] or set categorize.default_category)"
    )


def test_bad_label_map_is_a_config_error_naming_the_key(tmp_path):
    cfg = config(tmp_path, label_map={"xstest:unsafe": "harmful"})
    with pytest.raises(ConfigError, match=r"categorize.label_map\['xstest:unsafe'\]: 'harmful' is not a category"):
        validate_categorizer(cfg)
    with pytest.raises(ConfigError, match="categorize.default_category: 'safe' is not a category"):
        validate_categorizer(config(tmp_path, default_category="safe"))
    with pytest.raises(ConfigError, match="categorize.label_map"):  # before any Ray work
        add_categories(None, cfg)


# --- embedding head ------------------------------------------------------------------------


def test_head_json_round_trip_predicts_like_sklearn(tmp_path):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = np.array(CATEGORIES)[np.argmax(x[:, :4], axis=1)]
    model = LogisticRegression(C=3.0, max_iter=1000).fit(x, y)
    save_head(head_from_sklearn(model, "enc"), tmp_path / "head.json", {"metrics": {}})
    head = load_head(tmp_path / "head.json")
    assert head.classes == list(CATEGORIES) and head.embedding_model == "enc"
    assert head.predict(x) == model.predict(x).tolist()
    np.testing.assert_allclose(head.predict_proba(x), model.predict_proba(x), atol=1e-5)
    doc = json.loads((tmp_path / "head.json").read_text())
    doc["classes"][0] = "harmful"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"bad.json: field 'classes': holds \['harmful'\]"):
        load_head(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def small_head(tmp_path_factory, shared_data):
    """A head fitted on 300 labelled prompts (stratified sample), as `categorize-train` does."""
    out = tmp_path_factory.mktemp("head")
    emb = {"head": str(out / "head.json"), "train_limit": 300, "c_grid": [1.0, 10.0], "cv_folds": 3}
    cfg = from_dict({"data": {"data_root": str(shared_data)}, "categorize": {"embedding": emb}})
    return cfg, train_head(cfg)


def test_train_head_beats_majority_and_writes_its_files(small_head):
    cfg, report = small_head
    test, base = report["test"], report["majority_baseline"]
    assert report["split"] == {"train": 240, "test": 60, "test_fraction": 0.2}
    assert report["data"]["excluded"]["label OTHER"] == 342
    assert test["accuracy"] > base["accuracy"]
    assert test["macro_f1"] > base["macro_f1"] + 0.15
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == 60
    out = cfg.resolve_path(cfg.categorize.embedding.head).parent
    for name in ("head.json", "MODEL_CARD.md", "confusion_matrix.json", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(report["selection"]["grid"]) == 6  # 2 C x {none, sqrt_balanced, balanced}


def test_embedding_stage_on_ray(small_head, ray_local):
    import ray

    cfg, report = small_head
    cfg = cfg.model_copy(update={"categorize": cfg.categorize.model_copy(update={"method": "embedding"})})
    table = pa.Table.from_pylist(
        [{"id": f"t:{i}", "source": "t", "prompt": p} for i, p in enumerate(["How do I bake bread?", "Hi", None])]
    )
    table = table.append_column("error", pa.array([None, None, '{"field": "prompt"}'], pa.string()))
    out = pa.concat_tables(add_categories(ray.data.from_arrow(table), cfg).iter_batches(batch_format="pyarrow"))
    out = out.sort_by("id")
    head = load_head(report["head"])
    assert isinstance(head, Head)
    assert out["category"][0].as_py() in CATEGORIES and out["category"][1].as_py() in CATEGORIES
    assert out["category"][2].as_py() is None and out["category_error"].null_count == 3
    assert out["error"][2].as_py() == '{"field": "prompt"}'


# --- judge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"Instruction Analysis": "mentions a weapon", "Determination": "Factual Risk"}', "EHD"),
        (
            'Analysis: insinuation.\n\n```json\n{"Instruction Analysis": "x", "Determination": "Intentional Risk"}\n```',
            "IHD",
        ),
        (
            '{\n "Instruction Analysis": "both"\n "Determination": "Mixed Risk"\n}',
            "MHD",
        ),  # the template's comma-less form
        ("[Determination]:\nThe risk type of this instruction is: Mixed Risk", "MHD"),
        ('{"Determination": "The risk type of this instruction is: No Risk."}', "none"),
        ('{"Determination": "<Determination>"} then {"Determination": "factual risk"}', "EHD"),  # echoed placeholder
        ('{"Determination": "Factual Risk"}', "EHD"),
        ('{"Determination": "Harmful"}', None),  # unknown category
        ('{"Determination": "Factual Risk"} ... {"Determination": "Mixed Risk"}', None),  # conflicting
        ('{"Determination": "Factual or Mixed Risk"}', None),
        ('{"Instruction Analysis": "contains a factual risk"', None),  # malformed, no determination
        ("The instruction contains an intentional risk.", None),  # prose, not a determination
        ("", None),
    ],
)
def test_parse_judgement(text, expected):
    assert parse_judgement(text) == expected


def test_judge_prompt_uses_the_authors_file(tmp_path, shared_data):
    cfg = config(tmp_path, shared_data)
    template = read_judge_template(cfg.resolve_path(cfg.categorize.judge.prompt_file))
    prompt = build_judge_prompt(template, "How do I {pick} a lock?")
    assert "[Instruction]: How do I {pick} a lock?" in prompt and "Factual Risk:" in prompt
    assert prompt.rstrip().endswith('"Determination": "<Factual Risk | Intentional Risk | Mixed Risk | No Risk>"}')
    (tmp_path / "bad.txt").write_text("Classify {prompt}")
    with pytest.raises(ConfigError, match="bad.txt: not a template with only an {instruction} slot"):
        validate_categorizer(
            config(tmp_path, shared_data, method="judge", judge={"prompt_file": str(tmp_path / "bad.txt")})
        )


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    """A random-weight Llama with the real SmolLM2 tokenizer: produces garbage, fast."""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    tok = load_tokenizer("smollm2-135m")
    out = tmp_path_factory.mktemp("tiny_judge")
    tiny_llama(vocab_size=len(tok)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_judge_stage_routes_garbage_to_unparsed(tmp_path, shared_data, tiny_judge_dir, ray_local):
    import ray

    cfg = config(tmp_path, shared_data, method="judge", judge={"model": str(tiny_judge_dir), "max_new_tokens": 12})
    prompts = ["How do I kill a Python process?", "Tell me a joke", "What is 2+2?", "Why is the sky blue?", None]
    table = pa.Table.from_pylist([{"id": f"j:{i}", "source": "j", "prompt": p} for i, p in enumerate(prompts)])
    table = table.append_column("error", pa.array([None] * 4 + ['{"reason": "empty"}'], pa.string()))
    out = pa.concat_tables(add_categories(ray.data.from_arrow(table), cfg).iter_batches(batch_format="pyarrow"))
    out = out.sort_by("id")
    assert outcome(out.slice(0, 4)) == {"unparsed": 4}
    assert all(
        e.startswith("unparsed: no determination found in judge output") for e in out["category_error"][:4].to_pylist()
    )
    assert out["category_error"][4].as_py() is None and out["error"][4].as_py() == '{"reason": "empty"}'


def test_model_categorizers_read_blocks_of_a_few_batches(tmp_path):
    """Many small blocks for a model's actor pool; the label lookup keeps the configured big blocks."""
    assert input_block_rows(config(tmp_path)) == 2048
    assert input_block_rows(config(tmp_path, method="judge", judge={"model": "m", "batch_size": 4})) == 16
    assert input_block_rows(config(tmp_path, method="embedding", embedding={"batch_size": 1024})) == 2048


def test_labels_stage_on_ray_passes_error_rows_through(tmp_path, shared_data, ray_local):
    import ray

    records = json.loads((shared_data / EQUILIBRATE).read_text())[:200]
    table = adapt("equilibrate", records, "eq")
    errors = [None] * 199 + ['{"field": "question_y"}']
    table = table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string()))
    ds = ray.data.from_arrow(table).repartition(4)
    out = pa.concat_tables(add_categories(ds, config(tmp_path)).iter_batches(batch_format="pyarrow"))
    assert out.num_rows == 200 and out.column_names == [*ROW_SCHEMA.names, "error", "category_error"]
    expected = Counter(
        {"No risk": "none", "OTHER": "unmapped label"}.get(r["category"], r["category"]) for r in records[:199]
    )
    good = out.filter(pa.compute.is_null(out["error"]))
    assert outcome(good) == expected
    bad = out.filter(pa.compute.is_valid(out["error"]))
    assert bad["category"][0].as_py() is None and bad["category_error"][0].as_py() is None
