"""Offline trainer on CPU: the step math against hand computations, input checks before Ray, and real
Ray Train + DeepSpeed runs (AMA-DPO with LoRA, a reward model) on a tiny random Llama with the SmolLM2
tokenizer. Resume, crash recovery, ZeRO-2/3 and 1-vs-2 worker runs are in test_train_resume_on_cpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.data.schema import Limits, make_row, rows_to_table
from eqrlhf.data.tokenize import encode_pair
from eqrlhf.manifest import StageWriter
from eqrlhf.train import TrainInputError, prepare_train, run_train
from eqrlhf.train.batching import collate, read_columns, step_rows, worker_micro_batches
from eqrlhf.train.deepspeed_config import build_ds_config, lr_factor
from eqrlhf.train.loop import StepSpec, loss_scales, micro_loss, prepare_batch

PAIRS = 16
MAX_LENGTH = 128


# ---- fixtures shared with test_train_resume_on_cpu.py ----------------------------------------------------


def make_model_dir(path):
    """A random 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer and chat template, saved as HF."""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# (chosen, rejected) templates: the preference is in the words, not the length, so a random reward head
# ranks about half of the pairs right and has to learn the rest
TEMPLATES = [
    ("Here is a careful and safe way to finish task {i}.", "Here is a reckless and harmful way to finish task {i}."),
    (
        "I will not help with harm, but task {i} can be done safely like this.",
        "Sure, task {i} is best done by hurting someone.",
    ),
    ("Task {i}: check the instructions, then ask an expert.", "Task {i}: ignore the instructions and break things."),
    ("Safety first: for task {i}, wear gloves.", "Forget safety: for task {i}, skip the gloves."),
]


def pair_rows(n: int = PAIRS) -> list[dict]:
    rows = []
    for i in range(n):
        chosen, rejected = TEMPLATES[i % len(TEMPLATES)]
        row = make_row(
            source="fixture",
            key=i,
            prompt=f"How do I finish task number {i}?",
            limits=Limits(),
            chosen=chosen.format(i=i),
            rejected=rejected.format(i=i),
            chosen_safe=True,
            rejected_safe=i % 2 == 0,
            category="none",
        )
        row["file"], row["line"] = "fixture.jsonl", i + 1
        rows.append(row)
    return rows


def write_stage(stage_dir, table: pa.Table):
    writer = StageWriter(stage_dir, "pairs", "test")
    writer.count_read(table.num_rows)
    writer.write_rows(table)
    writer.close()
    return stage_dir


def train_config(run_dir, model_dir, *, loss: str = "dpo", **train):
    """A small, fast config: 2 pairs per micro batch, constant LR 1e-3, 6 steps."""
    settings = {
        "cpus_per_worker": 1,
        "micro_batch_size": 2,
        "max_steps": 6,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "num_workers": 1,
    }
    settings.update(train)
    return from_dict(
        {
            "run": {"name": run_dir.name, "output_dir": str(run_dir.parent), "seed": 0},
            "model": {"name_or_path": str(model_dir), "max_length": MAX_LENGTH},
            "algorithm": {"loss": loss, "beta": 0.1},
            "train": settings,
        }
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from eqrlhf.models.loading import load_tokenizer

    return load_tokenizer(str(model_dir))


def scored_table(tokenizer, rows: list[dict]) -> pa.Table:
    """Pairs as the scoring stage writes them: token ids plus one (normalised) score per response token.

    Scores alternate in runs of two (+1, +1, -1, -1, ...), so the hysteresis rule keeps about half of
    every response and AMA must report a kept fraction well below 1.
    """
    ids = [encode_pair(tokenizer, row, MAX_LENGTH) for row in rows]

    def pattern(n):
        return [1.0 if (t // 2) % 2 == 0 else -1.0 for t in range(n)]

    table = rows_to_table(rows)
    columns = {
        "prompt_ids": [x["prompt_ids"] for x in ids],
        "chosen_ids": [x["chosen_ids"] for x in ids],
        "rejected_ids": [x["rejected_ids"] for x in ids],
        "chosen_scores": [pattern(len(x["chosen_ids"])) for x in ids],
        "rejected_scores": [pattern(len(x["rejected_ids"])) for x in ids],
    }
    for name, values in columns.items():
        kind = pa.list_(pa.float32()) if name.endswith("scores") else pa.list_(pa.int32())
        table = table.append_column(name, pa.array(values, type=kind))
    return table.append_column("truncated", pa.array([x["truncated"] for x in ids]))


# ---- the step math, without Ray -----------------------------------------------------------------------------


def test_lr_schedule_by_hand():
    # warmup 2 of 10 steps: 1/3, 2/3, then cosine from 1 to 0 over the remaining 8
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(2 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(7, 10, 2, "constant") == 1.0


def test_bf16_at_zero1_selects_fp32_gradient_accumulation():
    """Only bf16 at ZeRO-1 asks DeepSpeed for fp32 gradients (its BF16_Optimizer); the run itself is in
    test_train_resume_on_cpu.py. DeepSpeed 0.19 rejects fp32 gradients with bf16 weights at ZeRO-0."""
    from eqrlhf.config import TrainSection

    assert build_ds_config(TrainSection(bf16=True, zero_stage=1), 2)["data_types"] == {"grad_accum_dtype": "fp32"}
    for settings in ({"bf16": True, "zero_stage": 0}, {"bf16": True, "zero_stage": 2}, {"zero_stage": 1}):
        assert "data_types" not in build_ds_config(TrainSection(**settings), 2)


def test_one_worker_two_micro_batches_read_what_two_workers_read():
    rows = step_rows(3, num_rows=10, seed=5, global_batch=4)  # 2 steps per epoch: step 3 = epoch 1, second batch
    epoch1 = np.random.default_rng([5, 1]).permutation(10)
    assert rows.tolist() == epoch1[4:8].tolist()
    one = worker_micro_batches(rows, rank=0, micro=2, accum=2)
    two = [worker_micro_batches(rows, rank=r, micro=2, accum=1)[0] for r in (0, 1)]
    assert [m.tolist() for m in one] == [m.tolist() for m in two]
    # every row of an epoch appears at most once
    epoch0 = np.concatenate([step_rows(s, 10, 5, 4) for s in (0, 1)])
    assert len(set(epoch0.tolist())) == 8


def test_rows_written_in_any_order_train_on_the_same_batches(tmp_path):
    """Ray Data stages write rows in task-finishing order; training reads them in id order, so the same rows
    give the same step -> rows mapping however the stage before wrote them."""
    import pyarrow.parquet as pq

    rows = {"id": [f"demo:r-{i:02d}" for i in range(12)], "prompt": [f"p{i}" for i in range(12)]}
    for name, order in (("forward", range(12)), ("shuffled", np.random.default_rng(3).permutation(12))):
        (tmp_path / name / "rows").mkdir(parents=True)
        table = pa.table({k: [v[i] for i in order] for k, v in rows.items()})
        pq.write_table(table.slice(0, 5), tmp_path / name / "rows" / "part-0.parquet")  # two files, like shards
        pq.write_table(table.slice(5), tmp_path / name / "rows" / "part-1.parquet")
        (tmp_path / name / "manifest.json").write_text("{}")
    forward, shuffled = (read_columns(tmp_path / n, ["id", "prompt"]) for n in ("forward", "shuffled"))
    assert forward.column("id").to_pylist() == shuffled.column("id").to_pylist() == rows["id"]


def _separate_response_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response | prompt) per response token, from one unpadded sequence: the reference value."""
    ids = torch.tensor([prompt + response])
    logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return picked[len(prompt) - 1 :]


def _examples(tokenizer, rows):
    examples = []
    for row in rows:
        ids = encode_pair(tokenizer, row, MAX_LENGTH)
        examples.append(
            {
                "prompt": ids["prompt_ids"],
                "chosen": ids["chosen_ids"],
                "rejected": ids["rejected_ids"],
                "truncated": ids["truncated"],
                "chosen_safe": row["chosen_safe"],
                "rejected_safe": row["rejected_safe"],
            }
            | {f"{p}{s}{q}": None for s in ("chosen", "rejected") for p, q in (("", "_scores"), ("ref_", "_logps"))}
        )
    return examples


def _spec(cfg):
    return StepSpec.from_config(cfg)


def test_one_forward_dpo_equals_separate_forwards_by_hand(tmp_path, model_dir, tokenizer):
    from eqrlhf.models.loading import load_causal_lm

    policy = load_causal_lm(str(model_dir)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # make the policy differ from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = load_causal_lm(str(model_dir)).eval()
    examples = _examples(tokenizer, pair_rows(3))
    cfg = train_config(tmp_path / "r", model_dir)
    spec = _spec(cfg)
    batch, metrics = prepare_batch(collate(examples, tokenizer.pad_token_id, "dpo"), spec, torch.device("cpu"))
    with torch.no_grad():
        loss, out = micro_loss(policy, reference, batch, spec)
        h = []
        for ex in examples:
            pc = _separate_response_logp(policy, ex["prompt"], ex["chosen"]).sum()
            pr = _separate_response_logp(policy, ex["prompt"], ex["rejected"]).sum()
            rc = _separate_response_logp(reference, ex["prompt"], ex["chosen"]).sum()
            rr = _separate_response_logp(reference, ex["prompt"], ex["rejected"]).sum()
            h.append((pc - rc) - (pr - rr))
    expected = -F.logsigmoid(0.1 * torch.stack(h)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["data/truncated_fraction"] == 0.0


def test_ama_mask_is_the_same_for_policy_and_reference(tmp_path, model_dir, tokenizer):
    """AMA-DPO with a precomputed reference: the masked sums use exactly the kept tokens on both sides."""
    from eqrlhf.models.loading import load_causal_lm

    policy = load_causal_lm(str(model_dir)).eval()
    rows = pair_rows(2)
    examples = _examples(tokenizer, rows)
    table = scored_table(tokenizer, rows)
    for i, ex in enumerate(examples):
        ex["chosen_scores"] = table.column("chosen_scores")[i].as_py()
        ex["rejected_scores"] = table.column("rejected_scores")[i].as_py()
        # a reference that is the policy minus 0.01 per token: h = 0.01 * (kept chosen - kept rejected)
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                ex[f"ref_{side}_logps"] = (_separate_response_logp(policy, ex["prompt"], ex[side]) - 0.01).tolist()
    cfg = from_dict(
        train_config(tmp_path / "r", model_dir, loss="ama_dpo").model_dump()
        | {"algorithm": {"loss": "ama_dpo", "beta": 1.0, "reference": "precomputed"}}
    )
    spec = _spec(cfg)
    batch, metrics = prepare_batch(collate(examples, tokenizer.pad_token_id, "ama_dpo"), spec, torch.device("cpu"))
    with torch.no_grad():
        loss, _ = micro_loss(policy, None, batch, spec)
    # hysteresis with tau 0.3 on runs (+1,+1,-1,-1,...): chosen keeps the + runs, rejected the - runs
    h = []
    for ex in examples:
        kept_c = sum(1 for s in ex["chosen_scores"] if s > 0)
        kept_r = sum(1 for s in ex["rejected_scores"] if s < 0) or len(ex["rejected_scores"])  # empty -> fallback
        h.append(0.01 * kept_c - 0.01 * kept_r)
    expected = -F.logsigmoid(torch.tensor(h)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert 0 < metrics["ama/kept_fraction"] < 1


def test_sft_uses_chosen_tokens_only(tmp_path, model_dir, tokenizer):
    from eqrlhf.models.loading import load_causal_lm

    model = load_causal_lm(str(model_dir)).eval()
    examples = _examples(tokenizer, pair_rows(2))
    spec = _spec(train_config(tmp_path / "r", model_dir, loss="sft"))
    batch, _ = prepare_batch(collate(examples, tokenizer.pad_token_id, "sft"), spec, torch.device("cpu"))
    assert batch["input_ids"].shape[0] == 2  # no rejected rows in the forward pass
    with torch.no_grad():
        loss, _ = micro_loss(model, None, batch, spec)
        logps = torch.cat([_separate_response_logp(model, ex["prompt"], ex["chosen"]) for ex in examples])
    assert loss.item() == pytest.approx(-logps.mean().item(), abs=1e-5)  # token-level mean over the batch


def test_output_layer_skips_prompt_positions_without_changing_values_or_gradients(tmp_path, model_dir, tokenizer):
    """sequence_logps projects only the kept label positions: same log-probs there, 0 elsewhere, and the
    same parameter gradients as the full-vocabulary projection of every position."""
    from eqrlhf.algorithms.logprobs import masked_sum, token_logprobs
    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.train.policy_forward import sequence_logps

    model = load_causal_lm(str(model_dir))
    spec = _spec(train_config(tmp_path / "r", model_dir))
    batch, _ = prepare_batch(
        collate(_examples(tokenizer, pair_rows(3)), tokenizer.pad_token_id, "dpo"), spec, torch.device("cpu")
    )
    keep = batch["loss_mask"].bool().any(dim=0)
    assert 0 < keep.sum() < keep.numel()  # the prompt positions are really skipped

    def grads_of(logps):
        model.zero_grad()
        masked_sum(logps, batch["loss_mask"]).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    compact = sequence_logps(model, batch, spec)
    compact_grads = grads_of(compact)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = token_logprobs(logits[:, :-1], batch["labels"])
    full_grads = grads_of(full)
    assert torch.allclose(compact[:, keep], full[:, keep], atol=1e-5)
    assert torch.all(compact[:, ~keep] == 0)
    for a, b in zip(compact_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_token_averaged_losses_weigh_micro_batches_by_their_tokens(tmp_path, model_dir):
    """sft: micro-batches with 3 and 1 kept tokens, 2 accumulation steps. DeepSpeed divides each loss by 2,
    so scales 1.5 and 0.5 turn the two token means into the mean over all 4 tokens; pair losses keep 1."""
    batches = [{"loss_mask": torch.tensor([[0.0, 1, 1, 1]])}, {"loss_mask": torch.tensor([[1.0, 0, 0, 0]])}]
    sft = _spec(train_config(tmp_path / "r", model_dir, loss="sft"))
    assert loss_scales(batches, sft, accum=2, device=torch.device("cpu")) == [1.5, 0.5]
    dpo = _spec(train_config(tmp_path / "r", model_dir, loss="dpo"))
    assert loss_scales(batches, dpo, accum=2, device=torch.device("cpu")) == [1.0, 1.0]


def test_cost_model_step_by_hand(tmp_path, model_dir, tokenizer):
    from eqrlhf.models.heads import ScalarHeadLM

    torch.manual_seed(0)
    model = ScalarHeadLM.from_lm(str(model_dir)).eval()
    examples = _examples(tokenizer, pair_rows(2))  # rejected_safe: True for row 0, False for row 1
    spec = _spec(train_config(tmp_path / "r", model_dir, loss="cost"))
    batch, _ = prepare_batch(collate(examples, tokenizer.pad_token_id, "cost"), spec, torch.device("cpu"))
    with torch.no_grad():
        loss, _ = micro_loss(model, None, batch, spec)
        terms = []
        for ex in examples:
            c = model(torch.tensor([ex["prompt"] + ex["chosen"]]))[0, -1]
            r = model(torch.tensor([ex["prompt"] + ex["rejected"]]))[0, -1]
            s_c, s_r = -1.0, (-1.0 if ex["rejected_safe"] else 1.0)
            terms.append(-F.logsigmoid(r - c) - F.logsigmoid(s_c * c) - F.logsigmoid(s_r * r))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


# ---- bad input fails before Ray ------------------------------------------------------------------------------


def test_bad_inputs_fail_with_clear_messages(tmp_path, model_dir, tokenizer):
    run = tmp_path / "run"
    with pytest.raises(TrainInputError, match=r"run/pairs does not exist.*pairs stage"):
        prepare_train(train_config(run, model_dir))

    write_stage(run / "pairs", rows_to_table(pair_rows()))
    with pytest.raises(ConfigError, match=r"unknown loss 'dpoo' \(did you mean 'dpo'\?\)"):
        prepare_train(train_config(run, model_dir, loss="dpoo"))
    # an AMA loss reads the score stage's output, never the unscored pairs
    with pytest.raises(TrainInputError, match=r"run/scored does not exist.*score stage for AMA losses"):
        prepare_train(train_config(run, model_dir, loss="ama_dpo"))
    with pytest.raises(TrainInputError, match=r"lacks column\(s\).*chosen_scores.*run the scoring stage"):
        prepare_train(train_config(run, model_dir, loss="ama_dpo", input=str(run / "pairs")))
    with pytest.raises(ConfigError, match=r"train.resume=true but no checkpoint under .* verifies"):
        prepare_train(train_config(run, model_dir, resume=True))
    with pytest.raises(ConfigError, match=r"train.compile=true needs train.zero_stage 0, 1 or 2"):
        prepare_train(train_config(run, model_dir, compile=True, zero_stage=3))

    rows = pair_rows()
    rows[3]["rejected_safe"] = None
    write_stage(run / "pairs", rows_to_table(rows))
    with pytest.raises(
        TrainInputError, match=r"row id='fixture:3' \(source fixture.jsonl, line 4\): field 'rejected_safe'"
    ):
        prepare_train(train_config(run, model_dir, loss="bfpo"))

    table = scored_table(tokenizer, pair_rows())
    short = table.column("chosen_scores").to_pylist()
    short[5] = short[5][:-1]
    table = table.set_column(table.column_names.index("chosen_scores"), "chosen_scores", pa.array(short))
    write_stage(run / "scored", table)
    with pytest.raises(TrainInputError, match=r"fixture:5.*line 6.*'chosen_scores' has \d+ values for \d+ tokens"):
        prepare_train(train_config(run, model_dir, loss="ama_dpo"))


def test_run_train_rejects_bad_input_without_starting_ray(tmp_path, model_dir):
    """In a fresh process (the test session may already run Ray): run_train fails and Ray never started."""
    cfg = train_config(tmp_path / "run", model_dir, loss="ama_dpo", input=str(tmp_path / "run" / "pairs"))
    write_stage(tmp_path / "run" / "pairs", rows_to_table(pair_rows()))
    script = textwrap.dedent(
        f"""
        import json, ray
        from eqrlhf.config import from_dict
        from eqrlhf.train import run_train
        try:
            run_train(from_dict(json.loads({json.dumps(cfg.model_dump_json())})))
            print("NO ERROR")
        except Exception as err:
            print(type(err).__name__, err)
        print("ray initialized:", ray.is_initialized())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "TrainInputError" in out.stdout and "chosen_scores" in out.stdout, out.stdout + out.stderr
    assert "ray initialized: False" in out.stdout


# ---- real Ray Train + DeepSpeed runs -------------------------------------------------------------------------


def test_ama_dpo_with_lora_keeps_part_of_each_response(ray_local, tmp_path, model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "ama"
    write_stage(run / "scored", scored_table(tokenizer, pair_rows()))
    # share_prompt: the PEFT and DeepSpeed wrappers pass the 4-D mask, position ids and logits_to_keep through
    cfg = train_config(
        run, model_dir, loss="ama_dpo", lora={"r": 4, "alpha": 8}, lr=1e-2, zero_stage=2, share_prompt=True
    )
    manifest = run_train(cfg)
    history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert all(0.3 < m["ama/kept_fraction"] < 0.8 for m in history)
    assert all(m["ama/fallback_fraction"] == 0.0 for m in history)
    assert history[-1]["loss"] < history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # LoRA B starts at 0
    assert manifest["input_dir"].endswith("ama/scored")

    final = run / "train" / "checkpoints" / "step_6"
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_merged = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
    expected = peft_merged.state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], AutoModelForCausalLM.from_pretrained(model_dir).state_dict()[q])


def test_reward_model_learns_to_rank_pairs(ray_local, tmp_path, model_dir, tokenizer):
    from eqrlhf.models.heads import ScalarHeadLM, last_token_scores

    run = tmp_path / "rm"
    write_stage(run / "pairs", rows_to_table(pair_rows()))
    # ZeRO-3 on 2 workers: the scalar head is partitioned too and gathered whole for ScalarHeadLM.save
    cfg = train_config(run, model_dir, loss="reward", max_steps=8, lr=1e-3, num_workers=2, zero_stage=3)
    cfg.tracking.backend = "wandb"  # offline by default: no account, no network
    manifest = run_train(cfg)

    def accuracy(model) -> float:
        examples = _examples(tokenizer, pair_rows())
        batch = collate(examples, tokenizer.pad_token_id, "reward")
        with torch.no_grad():
            scores = last_token_scores(model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        return (scores[:PAIRS] > scores[PAIRS:]).float().mean().item()

    torch.manual_seed(0)  # a fresh head, drawn the way the worker draws its own
    before = accuracy(ScalarHeadLM.from_lm(str(model_dir)).eval())
    after = accuracy(ScalarHeadLM.load(manifest["final_checkpoint"]).eval())
    assert before == 0.5 and after == 1.0
    history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"]
    assert np.mean([m["accuracy"] for m in history[-2:]]) > np.mean([m["accuracy"] for m in history[:2]])
    # W&B offline: rank 0 alone opened a run (setup_wandb) and logged every step metrics.jsonl holds
    from test_tracking_on_cpu import wandb_offline_run

    (folder,) = (run / "wandb").glob("offline-run-*")
    logged = wandb_offline_run(folder)
    assert len(logged["history"]) == len(history) == 8
    assert (logged["name"], logged["group"], logged["job_type"]) == ("train", "rm", "train")
    assert logged["config"]["algorithm.loss"] == "reward" and logged["config"]["train.num_workers"] == "2"
    assert [{k: row[k] for k in m if k != "step"} for row, m in zip(logged["history"], history)] == [
        {k: pytest.approx(v) for k, v in m.items() if k != "step"} for m in history
    ]
    assert [row["_step"] for row in logged["history"]] == [m["step"] for m in history]


# ---- slow end to end: the real SmolLM2-135M ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EQRLHF_SLOW"), reason="minutes on 2 cores: set EQRLHF_SLOW=1 to run")
def test_smollm2_reward_model_then_scores_then_ama_dpo(ray_local, tmp_path):
    """pairs -> reward model (trained here) -> score stage (AMA scores, reference log-probs) -> AMA-DPO."""
    from eqrlhf.data.score import run_score

    run = tmp_path / "e2e"
    write_stage(run / "pairs", rows_to_table(pair_rows(32)))
    common = {
        "run": {"name": "e2e", "output_dir": str(tmp_path), "seed": 0},
        "model": {"name_or_path": "smollm2-135m", "max_length": 256},
    }
    one_worker = {"num_workers": 1, "cpus_per_worker": 2, "zero_stage": 2, "lr_schedule": "constant"}
    reward = run_train(
        from_dict(
            common
            | {
                "algorithm": {"loss": "reward"},
                "train": one_worker
                | {"output": str(run / "reward_model"), "micro_batch_size": 4, "max_steps": 8}
                | {"lr": 2e-5},
            }
        )
    )
    print("reward model:", reward["final_metrics"])
    ama = {"loss": "ama_dpo", "beta": 0.1, "reference": "precomputed"}
    run_score(from_dict(common | {"algorithm": ama, "ama": {"scorer_model": str(run / "reward_model" / "final")}}))
    manifest = run_train(
        from_dict(
            common
            | {"algorithm": ama}
            | {"train": one_worker | {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 10, "lr": 5e-6}}
        )
    )
    history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    for row in history:
        print(
            f"step {row['step']:2d} loss {row['loss']:.4f} acc {row['rewards/accuracy']:.2f} "
            f"kept {row['ama/kept_fraction']:.3f} fallback {row['ama/fallback_fraction']:.2f} {row['time/step_s']:.1f}s"
        )
    print(f"seconds per step (median): {manifest['step_seconds_median']}")
    assert len(history) == 10 and all(0 < row["ama/kept_fraction"] < 1 for row in history)
    assert history[-1]["loss"] < history[0]["loss"]


def test_workers_build_torch_extensions_in_their_own_environments_folder(monkeypatch, tmp_path):
    """DeepSpeed's C++ ops are built in a folder of the Python environment's own: torch's shared default made
    each environment on the machine rebuild over the others' build and wait on its lock file."""
    from eqrlhf.train.driver import worker_env

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = worker_env()["TORCH_EXTENSIONS_DIR"]
    assert here.startswith(
        str(tmp_path / "torch_extensions" / f"eqrlhf-{os.path.basename(os.path.realpath(sys.prefix))}-")
    )
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another" / ".venv"))
    assert worker_env()["TORCH_EXTENSIONS_DIR"] not in (here, None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert worker_env()["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_a_build_lock_left_by_a_killed_builder_is_removed_and_a_live_one_kept(tmp_path):
    """torch waits without a limit on the lock file of a C++ op build; a worker killed mid-build left it."""
    import shutil as sh

    from eqrlhf.train.core import clear_stale_build_lock

    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    lock = folder / "lock"
    lock.touch()
    ninja = tmp_path / "ninja"  # a process named ninja working in the folder: a live build
    sh.copy(sh.which("sleep"), ninja)
    build = subprocess.Popen([str(ninja), "30"], cwd=folder)
    try:
        time.sleep(0.2)
        assert not clear_stale_build_lock(folder, min_age_s=0, settle_s=0.1) and lock.exists()
    finally:
        build.kill()
        build.wait()
    # no builder: removed once the file is min_age_s old (here it waits for that)
    assert clear_stale_build_lock(folder, min_age_s=0.5, settle_s=0.1) and not lock.exists()
    assert not clear_stale_build_lock(folder)  # no lock: nothing to do
