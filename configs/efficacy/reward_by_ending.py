"""How a reward model scores committed evaluation answers, split by kind of prompt, refusal (rule judge) and
whether the answer ended or was cut at the evaluation's token limit (step 20 of configs/efficacy/README.md).

    .venv/bin/python configs/efficacy/reward_by_ending.py runs/efficacy/reward_fdc_heldout/final dev/sft_seed1

Each answer is scored as PPO scores a rollout: the prompt through the policy's chat template with the generation
prompt, the answer's tokens, and the end-of-sequence token when the answer ended.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from eqrlhf.models.heads import ScalarHeadLM, last_token_scores


def score(model: ScalarHeadLM, tokenizer, row: dict) -> float:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids += tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if row["finish_reason"] == "stop":
        ids.append(tokenizer.eos_token_id)
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(last_token_scores(model(x, torch.ones_like(x)), torch.ones_like(x))[0])


def main(model_dir: str, arms: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ScalarHeadLM.load(model_dir).eval()
    print("| arm | prompts | answer | ended | n | mean score |\n|---|---|---|---|---|---|")
    for arm in arms:
        groups: dict[tuple, list[float]] = {}
        for line in (Path("docs/results/efficacy") / arm / "completions.jsonl").open():
            row = json.loads(line)
            key = (row["kind"], "refusal" if row["refused_rule"] else "answer", row["finish_reason"] == "stop")
            groups.setdefault(key, []).append(score(model, tokenizer, row))
        for (kind, answer, ended), scores in sorted(groups.items()):
            print(
                f"| {arm} | {kind} | {answer} | {'yes' if ended else 'cut'} | {len(scores)} | {statistics.mean(scores):.2f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
