"""How a reward model scores committed evaluation answers, split by kind of prompt, refusal (rule judge) and
whether the answer ended or was cut at the evaluation's token limit (step 20 of configs/efficacy/README.md).

    .venv/bin/python configs/efficacy/reward_by_ending.py runs/efficacy/reward_fdc_heldout/final dev/sft_seed1

Each answer is scored as PPO scores a rollout, with the project's own encoding (eqrlhf.data.tokenize): the prompt
through the chat template with the generation prompt, the answer's tokens, and EOS when the answer ended.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from eqrlhf.data.tokenize import encode_prompt, encode_response
from eqrlhf.models.heads import ScalarHeadLM, last_token_scores
from eqrlhf.models.loading import load_tokenizer


def score(model: ScalarHeadLM, tokenizer, row: dict) -> float:
    response = encode_response(tokenizer, row["completion"])  # ends with EOS, as an answer that ended does
    if row["finish_reason"] != "stop":
        response = response[:-1]
    x = torch.tensor([encode_prompt(tokenizer, row) + response])
    with torch.no_grad():
        return float(last_token_scores(model(x, torch.ones_like(x)), torch.ones_like(x))[0])


def main(model_dir: str, arms: list[str]) -> None:
    tokenizer = load_tokenizer(model_dir)
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
