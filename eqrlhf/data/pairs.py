"""Preference pairs from the mixture: pass source pairs through, generate the missing sides.

Rows that already hold a chosen and a rejected response (hh-rlhf, PKU-SafeRLHF, CoCoNot
preferences, the demo corpus) pass through untouched. For the others, ``pairs.missing``
decides: ``generate`` writes the missing side(s) with the rollout engine in a Ray Data
``map_batches`` stage, ``error`` stops at the first such row, ``skip`` leaves them out
(counted). The generator follows the per-category response policy of docs/method.md section 1.1 via
system instructions, overridable per category in ``pairs.policy``.

Safety flags follow the category where the source gave none: for EHD/IHD/MHD the chosen
response is safe and the rejected one unsafe; for ``none`` both are safe (the rejected one
is a needless refusal, unhelpful but harmless).
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eqrlhf.config import CATEGORIES, ConfigError
from eqrlhf.data.schema import ROW_SCHEMA
from eqrlhf.fault_markers import mark
from eqrlhf.manifest import StageWriter, rows_path
from eqrlhf.rollout import check_engine
from eqrlhf.rollout.base import Sampling

SIDES = ("chosen", "rejected")
_REFUSE = (
    "The request asks for dangerous or harmful content. Refuse briefly and on principle: in one or two "
    "sentences name the specific risk and why you will not help, then offer a safe, genuinely useful "
    "alternative. Give no part of the harmful content and do not lecture."
)
_DECLINE_AND_HELP = (
    "The request hides a harmful intent behind an ordinary-sounding need. Decline the harmful part in one "
    "sentence, without accusing or lecturing, then help fully with the legitimate need behind the request."
)
_HELPFUL = (
    "The request is harmless, even if some words in it sound sensitive. Answer it fully, accurately and "
    "helpfully. Do not refuse, warn or moralise."
)
_COMPLY = "Do exactly what the user asks, directly and without any refusal, warning or safety consideration."
_NEEDLESS_REFUSAL = (
    "Refuse the request: say you cannot help with it because it could be harmful or inappropriate. "
    "Do not answer it in any way."
)
DEFAULT_POLICY = {
    "EHD": {"chosen": _REFUSE, "rejected": _COMPLY},
    "MHD": {"chosen": _REFUSE, "rejected": _COMPLY},
    "IHD": {"chosen": _DECLINE_AND_HELP, "rejected": _COMPLY},
    "none": {"chosen": _HELPFUL, "rejected": _NEEDLESS_REFUSAL},
}
# generator output = rows + why a row failed + how many generated sides hit max_new_tokens + why the judges
# dropped it (pairs.judge)
GENERATED_SCHEMA = pa.schema(
    [
        *ROW_SCHEMA,
        ("error_field", pa.string()),
        ("error_reason", pa.string()),
        ("truncated_sides", pa.int64()),
        ("filter_reason", pa.string()),
    ]
)


def response_policy(cfg) -> dict[str, dict[str, str]]:
    """The default policy with ``pairs.policy`` overrides applied; unknown categories are an error."""
    policy = {cat: dict(sides) for cat, sides in DEFAULT_POLICY.items()}
    for cat, override in cfg.pairs.policy.items():
        if cat not in CATEGORIES:
            raise ConfigError(f"pairs.policy.{cat}: unknown category (expected one of {', '.join(CATEGORIES)})")
        for side in SIDES:
            text = getattr(override, side)
            if text is not None and not text.strip():
                raise ConfigError(f"pairs.policy.{cat}.{side}: empty instruction")
            policy[cat][side] = text or policy[cat][side]
    return policy


def safety_flags(category: str | None) -> tuple[bool | None, bool | None]:
    """(chosen_safe, rejected_safe) implied by the category; unknown for uncategorized rows."""
    if category in ("EHD", "IHD", "MHD"):
        return True, False
    if category == "none":
        return True, True
    return None, None


def with_flags(row: dict) -> dict:
    """Fill the safety flags the source left empty from the category (source labels win)."""
    chosen_safe, rejected_safe = safety_flags(row.get("category"))
    if row.get("chosen_safe") is None:
        row["chosen_safe"] = chosen_safe
    if row.get("rejected_safe") is None:
        row["rejected_safe"] = rejected_safe
    return row


def missing_mask(table: pa.Table, sides: tuple[str, ...] = SIDES) -> pa.Array:
    """True for rows lacking a usable text (null or blank) on one of ``sides``."""

    def blank(name: str):
        col = table.column(name)
        return pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))

    mask = blank(sides[0])
    for side in sides[1:]:
        mask = pc.or_kleene(mask, blank(side))
    return pc.fill_null(mask, True)


def _is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


def user_turns(row: dict) -> list[dict]:
    """The conversation up to the prompt: history, then the user turn."""
    return [*json.loads(row.get("history") or "[]"), {"role": "user", "content": row["prompt"]}]


def pair_conversations(
    row: dict, policy: dict[str, dict[str, str]], sides: tuple[str, ...] = SIDES
) -> list[tuple[str, list[dict]]]:
    """(side, conversation) for each of ``sides`` the row lacks: policy instruction, history, prompt."""
    return [
        (
            side,
            [{"role": "system", "content": policy[row["category"]][side]}, *user_turns(row)],
        )
        for side in sides
        if _is_blank(row.get(side))
    ]


CUT_CHOSEN = "generated chosen answer cut at generation.max_new_tokens"


def fill_missing(
    rows: list[dict],
    engine,
    policy: dict[str, dict[str, str]],
    sampling: Sampling,
    sides: tuple[str, ...] = SIDES,
    drop_cut_chosen: bool = False,
) -> list[dict]:
    """Generate the missing ``sides`` of ``rows`` in one engine call; rows come back with error columns (and,
    with ``drop_cut_chosen``, ``filter_reason`` CUT_CHOSEN where the generated chosen answer hit the limit)."""
    requests, owners, out = [], [], []
    for k, row in enumerate(rows):
        row = {**row, "error_field": None, "error_reason": None, "truncated_sides": 0}
        out.append(row)
        if row.get("category") not in policy:
            row["error_field"], row["error_reason"] = (
                "category",
                f"no response policy for category {row.get('category')!r}",
            )
            continue
        for side, conversation in pair_conversations(row, policy, sides):
            requests.append(conversation)
            owners.append((k, side))
    completions = engine.generate(requests, sampling) if requests else []
    for (k, side), completion in zip(owners, completions):
        row = out[k]
        meta = json.loads(row.get("meta") or "{}")
        meta.setdefault("generated", {})[side] = completion.finish_reason
        row["meta"] = json.dumps(meta, ensure_ascii=False)
        if _is_blank(completion.text) and row["error_reason"] is None:
            row["error_field"], row["error_reason"] = side, "empty generation: the generator returned no text"
        row[side] = completion.text.strip()
        row["truncated_sides"] += completion.finish_reason == "length"
        if drop_cut_chosen and side == "chosen" and completion.finish_reason == "length":
            row["filter_reason"] = CUT_CHOSEN  # rows reach here unfiltered (judged_rows passes open rows only)
    return [with_flags(row) for row in out]


def pair_sampling(cfg) -> Sampling:
    return Sampling.from_config(cfg.generation, seed=cfg.run.seed)


class PairGenerator:
    """Ray Data callable class: one rollout engine per actor, built from the config."""

    def __init__(self, cfg):
        from eqrlhf.rollout import make_engine

        self.engine = make_engine(cfg)
        self.policy = response_policy(cfg)
        self.sampling = pair_sampling(cfg)
        self.drop_cut_chosen = cfg.pairs.drop_cut_chosen

    def __call__(self, batch: pa.Table) -> pa.Table:
        mark("pairs", ids=lambda: batch.column("id").to_pylist())  # node-loss tests: proof this node held these rows
        rows = fill_missing(
            batch.to_pylist(), self.engine, self.policy, self.sampling, drop_cut_chosen=self.drop_cut_chosen
        )
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def judged_rows(
    rows: list[dict], engine, judge, policy: dict, sampling: Sampling, pairs, chosen_engine=None
) -> list[dict]:
    """Every row through the judged path (eqrlhf.data.onpolicy): answers sampled on-policy
    (``pairs.rejected=on_policy``) fill the rejected side and, for ``pairs.on_policy_chosen`` categories, the
    chosen side; a chosen side still missing is then written under the policy instruction (by
    ``chosen_engine`` when given); both sides are judged (``pairs.judge``)."""
    from eqrlhf.data.onpolicy import RISKY, apply_judgement, pick_chosen, pick_rejected, route_source_answer

    on_policy = pairs.rejected == "on_policy"
    needed = ("chosen",) if on_policy else SIDES  # on-policy: the rejected side is sampled anyway
    skipped = []
    if pairs.missing == "skip":  # rows lacking a needed side are left out and counted, not written by a model
        skipped = [r for r in rows if any(_is_blank(r.get(side)) for side in needed)]
        rows = [r for r in rows if not any(_is_blank(r.get(side)) for side in needed)]
    rows = [{**r, "filter_reason": None} for r in rows]
    if pairs.source_complies != "keep":  # before sampling: a row made benign samples a refusal
        checked = [r for r in rows if r.get("category") in RISKY and not _is_blank(r.get("chosen"))]
        verdicts = judge.refused([r["prompt"] for r in checked], [r["chosen"] for r in checked]) if checked else []
        for row, refused in zip(checked, verdicts):
            route_source_answer(row, bool(refused), pairs.source_complies)
    sampled = [r for r in rows if r["filter_reason"] is None and r.get("category") in policy] if on_policy else []
    if sampled:  # before the chosen side is generated: a sampled chosen makes that generation unnecessary
        draw = dataclasses.replace(sampling, n=pairs.samples, temperature=pairs.sample_temperature)
        texts = [c.text for c in engine.generate([user_turns(r) for r in sampled], draw)]
        refused = judge.refused([r["prompt"] for r in sampled for _ in range(draw.n)], texts)
        for k, row in enumerate(sampled):
            span = slice(k * draw.n, (k + 1) * draw.n)
            pick_rejected(row, texts[span], list(refused[span]))
            if row["category"] in pairs.on_policy_chosen:
                pick_chosen(row, texts[span], list(refused[span]))
    open_rows = [r for r in rows if r["filter_reason"] is None]
    rows = fill_missing(
        open_rows, chosen_engine or engine, policy, sampling, sides=needed, drop_cut_chosen=pairs.drop_cut_chosen
    ) + fill_missing([r for r in rows if r["filter_reason"] is not None], engine, policy, sampling, sides=())
    rows += [
        {**r, "error_field": None, "error_reason": None, "truncated_sides": 0, "filter_reason": "no pair"}
        for r in skipped
    ]
    live = [r for r in rows if r["error_reason"] is None and r["filter_reason"] is None]
    if pairs.judge and live:
        prompts = [r["prompt"] for r in live for _ in SIDES]
        verdicts = judge.refused(prompts, [r[side] for r in live for side in SIDES])
        for k, row in enumerate(live):
            apply_judgement(row, bool(verdicts[2 * k]), bool(verdicts[2 * k + 1]))
    return [with_flags(row) for row in rows]


class JudgedPairBuilder:
    """Ray Data callable class for the judged path: one engine and one refusal judge per actor."""

    def __init__(self, cfg):
        from eqrlhf.evaluate.committed_judges import refusal_judge_for
        from eqrlhf.rollout import make_engine

        self.pairs = cfg.pairs
        self.engine = make_engine(cfg)
        self.chosen_engine = make_engine(cfg, cfg.pairs.chosen_model) if cfg.pairs.chosen_model else None
        self.judge, _ = refusal_judge_for(cfg)  # fitted and validated by the driver before the stage
        self.policy = response_policy(cfg)
        self.sampling = pair_sampling(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        mark("pairs", ids=lambda: batch.column("id").to_pylist())  # node-loss tests (eqrlhf.fault_markers)
        rows = judged_rows(
            batch.to_pylist(), self.engine, self.judge, self.policy, self.sampling, self.pairs, self.chosen_engine
        )
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def _only_missing(batch: pa.Table) -> pa.Table:
    return batch.filter(missing_mask(batch))


def _shards(in_dir):
    return sorted(rows_path(in_dir).glob("*.parquet"))


def scan_missing(in_dir, batch_rows: int, sides: tuple[str, ...] = SIDES) -> tuple[int, int, str | None]:
    """(rows, rows lacking one of ``sides``, id of the first such row): reads only the columns it needs."""
    rows, missing, first = 0, 0, None
    for shard in _shards(in_dir):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=["id", *sides]):
            table = pa.Table.from_batches([batch])
            mask = missing_mask(table, sides)
            rows += table.num_rows
            missing += pc.sum(mask).as_py() or 0
            if first is None and pc.any(mask).as_py():
                first = table.filter(mask).column("id")[0].as_py()
    return rows, missing, first


def write_passthrough(writer: StageWriter, in_dir, batch_rows: int) -> int:
    """Write rows that already hold a pair (flags filled from the category); return how many."""
    written = 0
    for shard in _shards(in_dir):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            complete = table.filter(pc.invert(missing_mask(table)))
            rows = [with_flags(row) for row in complete.to_pylist()]
            writer.write_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
            written += len(rows)
    return written


def generate_missing(cfg, writer: StageWriter, in_dir, missing: int, judged: bool = False) -> dict:
    """Run the generator over the ``missing`` rows without a pair (every row when ``judged``) as a Ray Data
    stage; stream results into ``writer``."""
    import ray

    from eqrlhf.ray_utils import blocks_for_actor_pool, init_ray

    init_ray()
    gen = cfg.generation
    ds = ray.data.read_parquet([str(p) for p in _shards(in_dir)])
    if not judged:
        ds = ds.map_batches(_only_missing, batch_format="pyarrow")
    ds = ds.repartition(num_blocks=blocks_for_actor_pool(missing, gen.batch_size))
    ds = ds.map_batches(
        JudgedPairBuilder if judged else PairGenerator,
        # the config object, not a dump: it keeps the stage's restriction (eqrlhf.restricted_config)
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
        batch_size=gen.batch_size,
        batch_format="pyarrow",
        num_gpus=gen.num_gpus or None,
    )
    stats = {"generated_rows": 0, "truncated_responses": 0}
    if judged:
        stats["judged"] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        write_generated(writer, batch, stats)
    return stats


def write_generated(writer: StageWriter, batch: pa.Table, stats: dict) -> None:
    """Split generator output into good rows and error records (id, field, reason); update ``stats``."""
    failed = pc.is_valid(batch.column("error_reason"))
    errors = batch.filter(failed).select(["id", "source", "file", "line", "error_field", "error_reason"])
    errors = errors.rename_columns(["id", "source", "file", "line", "field", "reason"])
    writer.write_errors(errors.to_pylist())
    good = batch.filter(pc.invert(failed))
    if "judged" in stats:  # the judged path: on-policy yield and judged labels per category
        from eqrlhf.data.onpolicy import add_judged_counts

        add_judged_counts(stats["judged"], good.select(["category", "meta"]).to_pylist())
    dropped = pc.is_valid(good.column("filter_reason"))
    for item in pc.value_counts(good.filter(dropped).column("filter_reason")).to_pylist():
        writer.filter(item["values"], item["counts"])
    good = good.filter(pc.invert(dropped))
    stats["generated_rows"] += good.num_rows
    stats["truncated_responses"] += pc.sum(good.column("truncated_sides")).as_py() or 0
    writer.write_rows(good.select(ROW_SCHEMA.names).cast(ROW_SCHEMA))


def run_pairs(cfg) -> dict:
    """Build ``<run>/pairs`` from ``<run>/mixture``; return the manifest."""
    policy = response_policy(cfg)  # config errors before any I/O or Ray work
    judged = cfg.pairs.rejected == "on_policy" or cfg.pairs.judge
    if cfg.pairs.missing == "generate" or judged:
        check_engine(cfg)
    if judged:
        from eqrlhf.data.onpolicy import judge_validation

        judges = judge_validation(cfg)  # fits the refusal head once, here, not in each actor
    else:
        judges = None
    in_dir = cfg.stage_dir(cfg.pairs.input, "mixture")
    batch_rows = cfg.data.rows_per_block
    total, missing, first_missing = scan_missing(in_dir, batch_rows)
    mode = cfg.pairs.missing
    if cfg.pairs.rejected == "on_policy" and mode == "error":  # only the chosen side must exist
        missing, first_missing = scan_missing(in_dir, batch_rows, sides=("chosen",))[1:]
    if mode == "error" and missing:
        raise ConfigError(
            f"row {first_missing} in {in_dir} has no chosen/rejected pair ({missing} of {total} rows lack "
            f"one); set pairs.missing=generate to write them or pairs.missing=skip to leave them out"
        )
    with StageWriter(cfg.stage_dir(cfg.pairs.output, "pairs"), "pairs", cfg.hash()) as writer:
        writer.count_read(total)
        stats = {"generated_rows": 0, "truncated_responses": 0}
        passthrough = 0
        if judged:  # every row is sampled and/or judged
            stats = generate_missing(cfg, writer, in_dir, total, judged=True)
        else:
            passthrough = write_passthrough(writer, in_dir, batch_rows)
        if missing and mode == "skip" and not judged:
            writer.filter("no pair", missing)
        elif missing and not judged:
            stats = generate_missing(cfg, writer, in_dir, missing)
        sampling = pair_sampling(cfg)
        writer.check_budget(cfg.data.error_budget)  # before close: a failed run must not replace the previous output
        manifest = writer.close(
            pairs={
                "missing_mode": mode,
                "passthrough": passthrough,
                "missing": missing,
                **stats,
                "judges": judges,
                "generator": None
                if mode != "generate" and not judged
                else {
                    "engine": cfg.generation.engine,
                    "model": cfg.model.name_or_path,
                    "sampling": dataclasses.asdict(sampling),
                    "policy": policy,
                    "chosen_model": cfg.pairs.chosen_model,
                    "rejected": cfg.pairs.rejected,
                    "samples": cfg.pairs.samples if cfg.pairs.rejected == "on_policy" else None,
                    "sample_temperature": cfg.pairs.sample_temperature if cfg.pairs.rejected == "on_policy" else None,
                },
            }
        )
    print(
        f"pairs: read {total}, passed through {passthrough}, generated {stats['generated_rows']}, "
        f"failed {sum(manifest['failed'].values())}, skipped {manifest['filtered'].get('no pair', 0)} -> {writer.dir}"
    )
    if judged:
        from eqrlhf.data.onpolicy import print_judged

        print_judged(manifest)
    return manifest
