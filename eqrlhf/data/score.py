"""The `score` stage: token ids, AMA token scores and reference log-probs for every pair.

Reads the pairs stage output and writes, per row, the ROW_SCHEMA columns plus

- ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (list<int32>) from :func:`encode_pair`, and ``truncated``;
- with AMA on: ``chosen_scores``, ``rejected_scores`` (list<float32>, one per response token; score t is
  the score of the prefix x, y_<=t), normalised per response (``ama.normalize``);
- with ``algorithm.reference: precomputed``: ``ref_chosen_logps``, ``ref_rejected_logps`` (list<float32>,
  log p_ref(y_t | x, y_<t) under ``model.name_or_path``), so the trainer holds one model.

Tokenizing and scoring are Ray Data ``map_batches`` stages: tokenizing runs as tasks (tokenizer cached per
worker process), scoring in a pool of callable-class actors that load their models once. Everything that can
be wrong with the config or the input is checked before Ray starts.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from eqrlhf.algorithms.catalog import ama_on, loss_info
from eqrlhf.config import Config, ConfigError
from eqrlhf.data.schema import ROW_SCHEMA
from eqrlhf.errors import InputError, InputNotFound
from eqrlhf.evaluate.metrics import rate
from eqrlhf.manifest import StageWriter, rows_path

REQUIRED_COLUMNS = ("id", "prompt", "history", "chosen", "rejected")
IDS = pa.list_(pa.int32())
FLOATS = pa.list_(pa.float32())
MAX_LISTED_ERRORS = 10


# ---- what the stage computes -------------------------------------------------------------------------------


def ref_on(cfg: Config) -> bool:
    """Reference log-probs precomputed here: the loss uses a reference and the config asks for it."""
    return cfg.algorithm.reference == "precomputed" and loss_info(cfg.algorithm.loss).uses_reference


def scoring_needed(cfg: Config) -> bool:
    """Offline AMA scores or precomputed reference log-probs: the score stage applies (PPO scores its own
    rollouts)."""
    return (ama_on(cfg) or ref_on(cfg)) and loss_info(cfg.algorithm.loss).kind != "online"


def training_input_dir(cfg: Config) -> Path:
    """What offline training reads: ``train.input``, else this stage's output when the config scores, else
    the pairs output. A scored folder left by another config is never read."""
    if cfg.train.input:
        return cfg.resolve_path(cfg.train.input)
    if scoring_needed(cfg):
        return cfg.stage_dir(cfg.ama.output, "scored")
    return cfg.stage_dir(cfg.pairs.output, "pairs")


def zscore(values: np.ndarray) -> np.ndarray:
    """Per-response z-score (population std). A constant response (e.g. only EOS) becomes all zeros."""
    centred = values - values.mean()
    std = values.std()
    return centred / std if std > 1e-6 else centred


# ---- validation (driver, before Ray) ---------------------------------------------------------------------


def _check_model(key: str, value: str | None) -> str:
    """Resolve a model reference from config key ``key``; errors name the key."""
    from eqrlhf.models.loading import resolve_model

    if not value:
        raise ConfigError(f"{key} is not set")
    return resolve_model(key, value)


def _vocab_size(path: str) -> int | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None


def _check_same_vocab(key: str, path: str, policy_path: str) -> None:
    """Token scores are aligned with the policy's token ids, so a scorer must share its vocabulary."""
    mine, policy = _vocab_size(path), _vocab_size(policy_path)
    if mine is not None and policy is not None and mine != policy:
        raise ConfigError(
            f"{key}: vocab_size {mine} differs from model.name_or_path's {policy}; "
            f"token scores must come from a model with the policy's tokenizer"
        )


def check_models(cfg: Config) -> dict:
    """Resolve every model the stage needs; return the constructor kwargs of the scoring actor."""
    policy = _check_model("model.name_or_path", cfg.model.name_or_path)
    plan = {"scorer": None, "scorer_model": None, "scorer_ref_model": None, "ref_model": None}
    if ama_on(cfg):
        scorer = cfg.ama.scorer  # never critic here: the config refuses it for an offline loss at load
        plan["scorer"] = scorer
        plan["scorer_model"] = _check_model("ama.scorer_model", cfg.ama.scorer_model)
        _check_same_vocab("ama.scorer_model", plan["scorer_model"], policy)
        if scorer == "reward_prefix":
            from eqrlhf.models.heads import HEAD_CONFIG

            if not (Path(plan["scorer_model"]) / HEAD_CONFIG).is_file():
                raise InputNotFound(
                    f"ama.scorer_model: {plan['scorer_model']} is not a scalar-head model (missing {HEAD_CONFIG}); "
                    f"reward_prefix needs a reward or cost model saved by ScalarHeadLM.save"
                )
        else:  # dpo_implicit
            plan["scorer_ref_model"] = _check_model("ama.scorer_ref_model", cfg.ama.scorer_ref_model)
            _check_same_vocab("ama.scorer_ref_model", plan["scorer_ref_model"], policy)
    if ref_on(cfg):
        plan["ref_model"] = policy
    return plan


def check_pairs(rows_dir: Path) -> int:
    """Count the input rows; fail naming row ids (and file:line) where chosen or rejected is missing."""
    if not any(rows_dir.glob("*.parquet")):
        return 0  # an empty pairs stage gives an empty scored stage
    dataset = pads.dataset(rows_dir, format="parquet")
    missing_columns = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing_columns:
        raise InputError(f"{rows_dir}: input rows lack column(s) {missing_columns}; is this a pairs stage output?")
    where = [c for c in ("file", "line") if c in dataset.schema.names]
    total, problems = 0, []
    for batch in dataset.to_batches(columns=["id", "chosen", "rejected", *where]):
        total += batch.num_rows
        for field in ("chosen", "rejected"):
            text = batch.column(field)
            bad = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
            for row in batch.filter(pc.fill_null(bad, True)).to_pylist():
                origin = f" ({row.get('file')}:{row.get('line')})" if row.get("file") else ""
                problems.append(f"row {row['id']}{origin}: field '{field}' is missing or empty")
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
        raise InputError(f"{rows_dir}: {len(problems)} pair(s) cannot be scored:\n  {shown}{more}")
    return total


# ---- model computations (pure torch; used by the actors and by tests) ----------------------------------


def _pad_right(seqs: list[list[int]], device) -> tuple:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def prefix_scores(head_model, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
    """Scalar-head score after each response token, from one forward pass per sequence (right padded)."""
    import torch

    device = next(head_model.parameters()).device
    ids, mask = _pad_right([p + r for p, r in zip(prompts, responses)], device)
    with torch.inference_mode():
        scores = head_model(ids, mask).float().cpu().numpy()
    # Position len(p) + t holds response token t, so its score covers the prefix x, y_<=t.
    return [scores[i, len(p) : len(p) + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))]


def response_logprobs(lm, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
    """log p(y_t | x, y_<t) for every response token under a causal LM (right padded, no grad)."""
    import torch

    from eqrlhf.algorithms.logprobs import token_logprobs

    device = next(lm.parameters()).device
    ids, mask = _pad_right([p + r for p, r in zip(prompts, responses)], device)
    with torch.inference_mode():
        logits = lm(input_ids=ids, attention_mask=mask).logits
        # logits[:, j] predicts ids[:, j + 1]; response token t sits at len(p) + t.
        logps = token_logprobs(logits[:, :-1], ids[:, 1:]).cpu().numpy()
    return [logps[i, len(p) - 1 : len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))]


# ---- Ray Data stages -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(name_or_path: str, gguf_file: str | None, trust_remote_code: bool):
    from eqrlhf.models.loading import load_tokenizer

    return load_tokenizer(name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def _encode(tok, row: dict, max_length: int) -> dict:
    from eqrlhf.data.tokenize import encode_pair

    try:
        return encode_pair(tok, row, max_length)
    except Exception as err:  # name the row: a bare tokenizer error says nothing about where it came from
        raise ValueError(f"row {row['id']} ({row['file']}:{row['line']}): cannot tokenize: {err}") from err


def tokenize_batch(
    batch: pa.Table, *, tokenizer: str, gguf_file: str | None, trust_remote_code: bool, max_length: int
) -> pa.Table:
    """Map stage (Ray tasks): ROW_SCHEMA columns + prompt/chosen/rejected ids and ``truncated``.

    A plain function rather than an actor: tokenizing is cheap CPU work that should spread over every
    core, and the tokenizer is cached per worker process, so it still loads once per worker.
    """
    tok = _tokenizer(tokenizer, gguf_file, trust_remote_code)
    columns = {}
    for field in ROW_SCHEMA:  # keep exactly the row schema; columns absent upstream become nulls
        name = field.name
        present = name in batch.column_names
        columns[name] = batch.column(name).cast(field.type) if present else pa.nulls(len(batch), field.type)
    rows = pa.table(columns)
    encoded = [_encode(tok, row, max_length) for row in rows.select([*REQUIRED_COLUMNS, "file", "line"]).to_pylist()]
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        rows = rows.append_column(name, pa.array([e[name] for e in encoded], type=IDS))
    return rows.append_column("truncated", pa.array([e["truncated"] for e in encoded], type=pa.bool_()))


class ScorePairs:
    """Map stage: AMA token scores and/or reference log-probs. Each distinct model is loaded once per actor."""

    def __init__(
        self,
        *,
        scorer: str | None,
        scorer_model: str | None,
        scorer_ref_model: str | None,
        ref_model: str | None,
        beta: float,
        negate: bool,
        normalize: str,
        ref_gguf_file: str | None,
        dtype: str,
        use_gpu: bool,
        trust_remote_code: bool,
        autocast: bool = False,
        categories: list[str] | None = None,
    ):
        import torch

        from eqrlhf.models.heads import ScalarHeadLM
        from eqrlhf.models.loading import load_causal_lm

        # float32 weights on CPU (train.autocast runs the matmuls in bfloat16, below); config dtype on GPU.
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = dtype if self.device == "cuda" else "float32"
        lms: dict[tuple, object] = {}

        def lm(path: str, gguf_file: str | None = None):
            if (path, gguf_file) not in lms:
                model = load_causal_lm(path, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code)
                lms[path, gguf_file] = model.to(self.device).eval()
            return lms[path, gguf_file]

        self.scorer, self.beta, self.negate, self.normalize = scorer, beta, negate, normalize
        # the trainer computes its policy log-probs under bfloat16 autocast (train.autocast): the reference
        # log-probs it is compared with must come from the same arithmetic. float32 against autocast differs
        # by 1-2 nats a response on SmolLM2-135M, larger than what DPO moves in a short run.
        self.autocast = autocast
        self.categories = categories
        if scorer == "reward_prefix":
            self.head = ScalarHeadLM.load(scorer_model, dtype=dtype, trust_remote_code=trust_remote_code)
            self.head = self.head.to(self.device).eval()
        elif scorer == "dpo_implicit":
            self.policy, self.policy_ref = lm(scorer_model), lm(scorer_ref_model)
        self.ref = lm(ref_model, ref_gguf_file) if ref_model else None

    def _scores(self, prompts, responses) -> tuple[list[np.ndarray], list[float], list[np.ndarray] | None]:
        """Token scores, each response's whole score (the reward at its last token, or the summed implicit
        reward), and the dpo_implicit policy's log-probs (None for reward_prefix)."""
        pol = None
        if self.scorer == "reward_prefix":
            raw = prefix_scores(self.head, prompts, responses)
            raw = [-s for s in raw] if self.negate else raw
            whole = [float(s[-1]) if len(s) else 0.0 for s in raw]
        else:
            pol, ref = (
                response_logprobs(self.policy, prompts, responses),
                response_logprobs(self.policy_ref, prompts, responses),
            )
            raw = [self.beta * (a - b) for a, b in zip(pol, ref)]
            whole = [float(s.sum()) for s in raw]
        return ([zscore(s) for s in raw] if self.normalize == "zscore" else raw), whole, pol

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            return self._add_columns(batch)

    def _add_columns(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_ids").to_pylist()
        chosen, rejected = batch.column("chosen_ids").to_pylist(), batch.column("rejected_ids").to_pylist()
        n = len(prompts)
        both_prompts, both_responses = prompts + prompts, chosen + rejected  # one forward for chosen and rejected
        policy_logps = None
        if self.scorer:
            scores, whole, policy_logps = self._scores(both_prompts, both_responses)
            if self.categories is not None:  # outside ama.categories: flat scores, the whole answers train
                flat = [(c or "none") not in self.categories for c in batch.column("category").to_pylist()] * 2
                scores = [np.zeros_like(s) if f else s for s, f in zip(scores, flat)]
            batch = batch.append_column("chosen_scores", pa.array(scores[:n], type=FLOATS))
            batch = batch.append_column("rejected_scores", pa.array(scores[n:], type=FLOATS))
            # does the scorer rank the pair as its labels do? (the manifest's scorer_accuracy, on every pair)
            prefers = [c > r for c, r in zip(whole[:n], whole[n:])]
            batch = batch.append_column("scorer_prefers_chosen", pa.array(prefers, type=pa.bool_()))
        if self.ref is not None:
            # a warm start is both the dpo_implicit policy and DPO's reference: one forward serves both
            same = policy_logps is not None and self.ref is self.policy
            logps = policy_logps if same else response_logprobs(self.ref, both_prompts, both_responses)
            batch = batch.append_column("ref_chosen_logps", pa.array(logps[:n], type=FLOATS))
            batch = batch.append_column("ref_rejected_logps", pa.array(logps[n:], type=FLOATS))
        return batch


# ---- the stage -----------------------------------------------------------------------------------------------


def _summarise(table: pa.Table, totals: dict) -> None:
    totals["truncated"] += pc.sum(table.column("truncated").cast(pa.int64())).as_py() or 0
    if "scorer_prefers_chosen" in table.column_names:  # per category: a scorer can be right on one kind only
        right = table.column("scorer_prefers_chosen").to_pylist()
        for category, ok in zip(table.column("category").to_pylist(), right):
            tally = totals["ranked"].setdefault(category or "none", [0, 0])
            tally[0], tally[1] = tally[0] + ok, tally[1] + 1
    for name in ("prompt", "chosen", "rejected"):
        totals[f"{name}_tokens"] += pc.sum(pc.list_value_length(table.column(f"{name}_ids"))).as_py() or 0


def run_score(cfg: Config) -> dict:
    """Tokenize pairs and add AMA token scores / reference log-probs; returns the manifest."""
    in_dir = cfg.stage_dir(cfg.ama.input, "pairs")
    out_dir = cfg.stage_dir(cfg.ama.output, "scored")
    rows_dir = rows_path(in_dir)  # fails clearly when the pairs stage did not run
    plan = check_models(cfg)
    total = check_pairs(rows_dir)

    with StageWriter(out_dir, "score", cfg.hash()) as writer:
        writer.count_read(total)
        totals = {"truncated": 0, "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0, "blocks": 0}
        totals["ranked"] = {}  # category -> [pairs the scorer ranks as labelled, pairs]
        if total:
            for table in _score_dataset(cfg, rows_dir, plan, total).iter_batches(
                batch_format="pyarrow", batch_size=None
            ):
                totals["blocks"] += 1
                _summarise(table, totals)
                writer.write_rows(table)
        if writer.written != total:  # 1:1 stage: a difference is a bug, never silent loss
            raise RuntimeError(f"score: read {total} rows but wrote {writer.written}")
        ranked = totals.pop("ranked")
        manifest = writer.close(
            scorer=plan["scorer"],
            # pairs whose chosen answer the scorer scores higher as a whole: its accuracy on these pairs, held
            # out when the scorer was not trained on them (a warm start, or a reward model fitted elsewhere)
            scorer_accuracy=rate(sum(k for k, _ in ranked.values()), total) if plan["scorer"] else None,
            scorer_accuracy_by_category={c: rate(k, n) for c, (k, n) in sorted(ranked.items())} or None,
            normalize=cfg.ama.normalize if plan["scorer"] else None,
            ref_logps=plan["ref_model"] is not None,
            max_length=cfg.model.max_length,
            models={k: plan[k] for k in ("scorer_model", "scorer_ref_model", "ref_model")},  # which models scored
            **totals,
        )
    accuracy = manifest["scorer_accuracy"]
    if accuracy and accuracy["n"]:
        lo, hi = accuracy["ci95"]
        each = ", ".join(f"{c} {a['count']}/{a['n']}" for c, a in manifest["scorer_accuracy_by_category"].items())
        print(
            f"[score] the scorer ranks chosen over rejected in {accuracy['count']} of {accuracy['n']} pairs "
            f"({accuracy['rate']:.3f} [{lo:.3f}, {hi:.3f}]; 0.5 is chance; {each})"
        )
    print(
        f"[score] {manifest['rows_written']} pairs -> {out_dir} (scores: {plan['scorer'] or 'none'}, "
        f"reference log-probs: {'yes' if plan['ref_model'] else 'no'}, truncated: {totals['truncated']})"
    )
    return manifest


def _score_dataset(cfg: Config, rows_dir: Path, plan: dict, total: int):
    import ray

    from eqrlhf.ray_utils import blocks_for_actor_pool, init_ray

    init_ray()
    ds = ray.data.read_parquet(str(rows_dir))
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={
            "tokenizer": cfg.model.name_or_path,
            "gguf_file": cfg.model.gguf_file,
            "trust_remote_code": cfg.model.trust_remote_code,
            "max_length": cfg.model.max_length,
        },
        batch_format="pyarrow",
        batch_size=max(cfg.ama.batch_size, 256),  # tokenizing is cheap: bigger batches, fewer calls
        udf_modifying_row_count=False,
    )
    if plan["scorer"] or plan["ref_model"]:
        # An all-to-all repartition: a streaming one is fused into the scoring task and changes nothing.
        ds = ds.repartition(num_blocks=blocks_for_actor_pool(total, cfg.ama.batch_size))
        ds = ds.map_batches(
            ScorePairs,
            fn_constructor_kwargs={
                **plan,
                "beta": cfg.algorithm.beta,
                "negate": cfg.ama.negate,
                "normalize": cfg.ama.normalize,
                "ref_gguf_file": cfg.model.gguf_file,
                "dtype": cfg.model.dtype,
                "use_gpu": cfg.ama.num_gpus > 0,
                "trust_remote_code": cfg.model.trust_remote_code,
                "autocast": cfg.train.autocast,
                "categories": cfg.ama.categories,
            },
            batch_format="pyarrow",
            batch_size=cfg.ama.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.ama.concurrency),
            num_gpus=cfg.ama.num_gpus or None,
            udf_modifying_row_count=False,
        )
    return ds
