"""`eqrlhf control-data`: self-generated, self-labelled training rows for controllable generation.

No new human labels (Tuan et al. 2024, sec. 3): for each prompt, sample k responses from the current
model through the rollout pool, score each (helpfulness = reward model, harmlessness = -cost or a
refusal judge; :mod:`eqrlhf.control.scorers`), bin every attribute's scores into levels by quantiles over
the whole pool (:mod:`eqrlhf.control.binning`; the edges go into the manifest and are reused by the
evaluation), and tag each response with its own levels. Rows are in the ordinary pair schema, so the
existing trainer reads them unchanged:

- sft-kind losses (``clm``, ``sft``): one row per response, prompt = ``<its tags> <prompt>``,
  chosen = the response, rejected = null;
- preference losses (``exmate``, ``dpo``, ...): for one prompt, ordered pairs (A, B) of responses whose
  settings differ: prompt = ``<tags of A> <prompt>``, chosen = A, rejected = B; at most
  ``control.pairs_per_prompt`` pairs per prompt, picked by a seeded shuffle.

Accounting: prompts read, held out, sampled; responses sampled, empty (filtered); prompts whose samples
all share one setting (filtered for preference losses: no pair has differing tags). A fraction
``control.heldout_fraction`` of the prompts (seeded, by id) is never sampled: ``heldout_prompts.jsonl``
holds them (the "unseen" prompts of the evaluation), ``train_prompts.jsonl`` the others.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.config import Config, ConfigError
from eqrlhf.control.binning import assign_levels, binning_summary, quantile_edges
from eqrlhf.control.encoding import all_settings, check_levels, prepare_tagged_model, tag_prompt
from eqrlhf.control.scorers import scorer_names
from eqrlhf.errors import InputError, InputNotFound

TAGGED_MODEL = "model"  # <output>/model with encoding: special_tokens


def output_dir(cfg: Config) -> Path:
    return cfg.stage_dir(cfg.control.output, "control_data")


def base_model(cfg: Config) -> str:
    return cfg.control.base_model or cfg.model.name_or_path


def row_format(cfg: Config) -> str:
    """'clm' (one tagged response per row) for sft-kind losses, else 'pairs'."""
    kind = loss_info(cfg.algorithm.loss).kind
    if kind == "scalar":
        raise ConfigError(f"algorithm.loss={cfg.algorithm.loss}: control data trains a policy, not a scalar head")
    return "clm" if kind == "sft" else "pairs"


# ---- prompts -----------------------------------------------------------------------------------------------


def check_prompt_input(cfg: Config) -> list | Path:
    """Read plans of ``control.sources``, or the stage dir to read (default <run>/mixture)."""
    from eqrlhf.data.readers import SourceError
    from eqrlhf.data.sources import plan_source
    from eqrlhf.manifest import read_manifest

    if cfg.control.sources:
        try:
            return [plan_source(src, cfg) for src in cfg.control.sources]
        except SourceError as err:
            raise ConfigError(f"control.sources: {err}") from None
    stage = cfg.stage_dir(cfg.control.input, "mixture")
    try:
        read_manifest(stage)
    except InputNotFound as err:
        raise InputNotFound(f"{err.message} (or give prompt files in control.sources)", field="control.input") from None
    return stage


def read_prompts(cfg: Config, where: list | Path) -> tuple[list[dict], list[dict], dict]:
    """(rows, error records, counts): every readable prompt once; duplicates counted, errors kept."""
    from eqrlhf.data.sources import limits_of, source_rows
    from eqrlhf.manifest import read_rows

    errors: list[dict] = []
    if isinstance(where, Path):
        candidates = read_rows(where).to_pylist()
    else:
        candidates = []
        for plan in where:
            for row in source_rows(plan, limits_of(cfg), cfg.data.rows_per_block):
                error = row.pop("error")
                if error is not None:
                    errors.append(json.loads(error))
                    continue
                candidates.append(row)
    from eqrlhf.evaluate.suites import normalized_prompt

    rows, seen, duplicates = [], set(), 0
    for row in candidates:
        key = normalized_prompt(row["prompt"])
        if row.get("dup_of") or key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(row)
    return rows, errors, {"read": len(candidates) + len(errors), "duplicate_prompt": duplicates}


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): the ceil(fraction * n) rows with the smallest seeded key of their id are held out."""
    from eqrlhf.data.mix import sample_key

    count = math.ceil(fraction * len(rows))
    held = {r["id"] for r in sorted(rows, key=lambda r: sample_key(seed, r["id"]))[:count]}
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


# ---- tagged rows -------------------------------------------------------------------------------------------


def bin_pool(scores: dict[str, list[float]], levels: dict[str, int]) -> tuple[dict, dict]:
    """Edges per attribute over the pool and each response's level: ({attr: summary}, {attr: [level]})."""
    summaries, assigned = {}, {}
    for name, values in scores.items():
        edges = quantile_edges(values, levels[name])
        summaries[name] = binning_summary(values, edges)
        assigned[name] = assign_levels(values, edges)
    return summaries, assigned


def derived_row(row: dict, suffix: str, prompt: str, chosen: str, rejected: str | None, meta: dict) -> dict:
    """A training row from prompt row ``row``: provenance (source, category, file, line) kept."""
    return {
        **row,
        "id": f"{row['id']}#{suffix}",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_safe": None,
        "rejected_safe": None,
        "dup_of": None,
        "meta": json.dumps(meta, ensure_ascii=False),
    }


def clm_rows(row: dict, samples: list[dict], levels: dict[str, int]) -> list[dict]:
    """One row per response: its own tags in front of the prompt, the response as ``chosen``."""
    out = []
    for j, s in enumerate(samples):
        meta = {"prompt_id": row["id"], "control": s["levels"], "scores": s["scores"], "untagged_prompt": row["prompt"]}
        out.append(derived_row(row, f"s{j}", tag_prompt(row["prompt"], s["levels"], levels), s["text"], None, meta))
    return out


def pair_rows(row: dict, samples: list[dict], levels: dict[str, int], limit: int, seed: int) -> list[dict]:
    """Up to ``limit`` ordered pairs (A, B) with different settings: A's tags, chosen A, rejected B."""
    from eqrlhf.data.mix import sample_key

    candidates = [
        (a, b) for a in range(len(samples)) for b in range(len(samples)) if samples[a]["levels"] != samples[b]["levels"]
    ]
    rng = random.Random(sample_key(seed, row["id"]))
    rng.shuffle(candidates)
    out = []
    for a, b in sorted(candidates[:limit]):
        A, B = samples[a], samples[b]
        meta = {
            "prompt_id": row["id"],
            "control": A["levels"],
            "rejected_control": B["levels"],
            "scores": A["scores"],
            "rejected_scores": B["scores"],
            "untagged_prompt": row["prompt"],
        }
        out.append(
            derived_row(row, f"p{a}>{b}", tag_prompt(row["prompt"], A["levels"], levels), A["text"], B["text"], meta)
        )
    return out


def tagged_rows(cfg: Config, prompts: list[dict], samples: list[list[dict]], fmt: str) -> tuple[list[dict], int]:
    """Rows for every prompt; and how many prompts had all samples in one setting (filtered for pairs)."""
    levels, single = cfg.control.levels, 0
    out = []
    for row, mine in zip(prompts, samples, strict=True):
        if len({json.dumps(s["levels"], sort_keys=True) for s in mine}) < 2:
            single += 1
            if fmt == "pairs":
                continue
        if fmt == "clm":
            out.extend(clm_rows(row, mine, levels))
        else:
            out.extend(pair_rows(row, mine, levels, cfg.control.pairs_per_prompt, cfg.run.seed))
    return out, single


# ---- the stage -------------------------------------------------------------------------------------------


def check_control_data(cfg: Config) -> dict:
    """Everything that can be wrong, before a model loads or Ray starts."""
    from eqrlhf.control.scorers import check_scorers
    from eqrlhf.models.loading import resolve_model
    from eqrlhf.rollout import check_engine

    check_levels(cfg.control.levels)
    fmt = row_format(cfg)
    check_scorers(cfg)
    model = resolve_model("control.base_model", base_model(cfg))
    check_engine(cfg)
    return {"format": fmt, "model": model, "input": check_prompt_input(cfg)}


def sample_and_score(cfg: Config, model: str, prompts: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """k completions per prompt (prompt-major) through the rollout pool, then their attribute scores."""
    from eqrlhf.control.scorers import Scorers
    from eqrlhf.evaluate.generation import generate
    from eqrlhf.rollout import Sampling

    c = cfg.control
    sampling = Sampling(c.max_new_tokens, c.temperature, c.top_p, n=c.samples_per_prompt, seed=cfg.run.seed)
    texts = [comp.text for comp in generate(cfg, model, prompts, sampling)]
    expanded = [p for p in prompts for _ in range(c.samples_per_prompt)]
    return texts, Scorers(cfg, model).score(expanded, texts)


def run_control_data(cfg: Config) -> dict:
    from eqrlhf.data.schema import rows_to_table
    from eqrlhf.manifest import StageWriter

    plan = check_control_data(cfg)
    c = cfg.control
    rows, errors, counts = read_prompts(cfg, plan["input"])
    if c.limit is not None:
        from eqrlhf.evaluate.suites import seeded_sample

        counts["sampled_out"] = max(0, len(rows) - c.limit)
        rows = seeded_sample(rows, c.limit, cfg.run.seed)
    train, heldout = split_heldout(rows, c.heldout_fraction, cfg.run.seed)
    if not train:
        raise InputError(f"control-data: no prompts left to sample after holding out {len(heldout)}")
    out = output_dir(cfg)
    with StageWriter(out, "control_data", cfg.hash()) as writer:
        writer.count_read(counts["read"])
        writer.write_errors(errors)
        writer.check_budget(cfg.data.error_budget)
        for reason in ("duplicate_prompt", "sampled_out"):
            if counts.get(reason):
                writer.filter(reason, counts[reason])
        writer.filter("heldout_prompt", len(heldout))
        writer.side_output("heldout_prompts", heldout)
        writer.side_output("train_prompts", train)

        texts, scores = sample_and_score(cfg, plan["model"], train)
        k = c.samples_per_prompt
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        kept = sorted(set(range(len(texts))) - set(empty))
        if not kept:
            raise InputError("control-data: every sampled response is empty")
        summaries, assigned = bin_pool({a: [v[i] for i in kept] for a, v in scores.items()}, c.levels)
        level_of = {i: {a: assigned[a][n] for a in c.levels} for n, i in enumerate(kept)}
        samples = [
            [
                {"text": texts[i], "levels": level_of[i], "scores": {a: scores[a][i] for a in c.levels}}
                for i in range(p * k, (p + 1) * k)
                if i in level_of
            ]
            for p in range(len(train))
        ]
        out_rows, single = tagged_rows(cfg, train, samples, plan["format"])
        if empty:
            writer.filter("empty_response", len(empty))
        if single and plan["format"] == "pairs":
            writer.filter("all_samples_one_setting", single)
        writer.write_rows(rows_to_table(out_rows))  # extra keys of the input rows are not columns: dropped
        tagged_model = None
        if c.encoding == "special_tokens":
            # written with the rest of the output beside the old one; the manifest names where it will be
            prepare_tagged_model(plan["model"], writer.work_dir / TAGGED_MODEL, c.levels, cfg.model.dtype)
            tagged_model = str(out / TAGGED_MODEL)
        manifest = writer.close(
            control={
                "levels": c.levels,
                "encoding": c.encoding,
                "format": plan["format"],
                "binning": summaries,
                "scorers": scorer_names(cfg),
                "base_model": base_model(cfg),
                "tagged_model": tagged_model,
                "settings": len(all_settings(c.levels)),
            },
            prompts={"train": len(train), "heldout": len(heldout), "single_setting": single},
            responses={"sampled": len(texts), "empty": len(empty), "kept": len(kept)},
        )
    edges = "; ".join(f"{a} edges {[round(e, 3) for e in s['edges']]}" for a, s in summaries.items())
    print(
        f"control-data: {len(train)} prompts x {k} samples -> {manifest['rows_written']} {plan['format']} rows "
        f"({len(heldout)} prompts held out; {edges}) in {out}"
    )
    if tagged_model and cfg.resolve_path(cfg.model.name_or_path) != Path(tagged_model):
        print(f"control-data: train from the model with the control tokens: model.name_or_path={tagged_model}")
    return manifest


def read_control_manifest(cfg: Config) -> dict:
    """The control-data manifest (levels, binning edges) that evaluation and serving reuse."""
    from eqrlhf.manifest import read_manifest

    manifest = read_manifest(output_dir(cfg))
    if "control" not in manifest:
        raise InputError(f"{output_dir(cfg)} is not a control-data stage (no 'control' in its manifest)")
    if manifest["control"]["levels"] != cfg.control.levels:
        raise ConfigError(
            f"control.levels {cfg.control.levels} differ from the levels the data was binned with "
            f"({manifest['control']['levels']} in {output_dir(cfg)})"
        )
    return manifest
