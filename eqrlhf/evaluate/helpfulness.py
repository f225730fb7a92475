"""Helpfulness judges: likelihood retention on reference answers, and a reward model's score.

Likelihood retention asks how much worse the evaluated model explains good answers than the model training
started from: per prompt, the mean per-token log-likelihood of the reference answer under the evaluated
model minus the same under the baseline, both tokenized the way training tokenizes (chat-templated prompt,
response text + EOS). 0 means nothing was lost; negative means the model now finds good answers less
likely. The reward score is a scalar-head model's score at the last token of prompt + generated completion.
"""

from __future__ import annotations

import numpy as np

from eqrlhf.data.score import prefix_scores, response_logprobs
from eqrlhf.data.tokenize import encode_prompt, encode_response
from eqrlhf.errors import ConfigError


def fit_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Prompt keeps its last max_length // 2 tokens, the response is cut from the right (as in training)."""
    truncated = False
    if len(prompt) > max_length // 2:
        prompt, truncated = prompt[-(max_length // 2) :], True
    room = max_length - len(prompt)
    if len(response) > room:
        response, truncated = response[:room], True
    return prompt, response, truncated


def encode_answers(tokenizer, rows: list[dict], answers: list[str], max_length: int) -> tuple[list, list, int]:
    prompts, responses, truncated = [], [], 0
    for row, answer in zip(rows, answers, strict=True):
        p, r, cut = fit_to_length(encode_prompt(tokenizer, row), encode_response(tokenizer, answer), max_length)
        prompts.append(p)
        responses.append(r)
        truncated += cut
    return prompts, responses, truncated


def mean_token_loglik(lm, prompts: list[list[int]], responses: list[list[int]], batch_size: int) -> list[float]:
    """Mean log p(y_t | x, y_<t) over each response's tokens, batch by batch."""
    out = []
    for start in range(0, len(prompts), batch_size):
        logps = response_logprobs(lm, prompts[start : start + batch_size], responses[start : start + batch_size])
        out.extend(float(np.mean(lp)) for lp in logps)
    return out


def likelihood_retention(model, baseline, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> dict:
    """Per-row reference log-likelihoods under ``model`` and ``baseline`` and their difference.

    ``baseline=None`` means the baseline is the evaluated model itself (retention exactly 0, not recomputed).
    """
    prompts, responses, truncated = encode_answers(tokenizer, rows, [r["chosen"] for r in rows], max_length)
    mine = mean_token_loglik(model, prompts, responses, batch_size)
    base = mine if baseline is None else mean_token_loglik(baseline, prompts, responses, batch_size)
    return {
        "loglik": mine,
        "baseline_loglik": base,
        "retention": [m - b for m, b in zip(mine, base)],
        "truncated": truncated,
    }


def reward_scores(head_model, tokenizer, rows: list[dict], completions: list[str], max_length: int, batch_size: int):
    """Scalar-head reward of each prompt + completion (score at the last response token)."""
    prompts, responses, truncated = encode_answers(tokenizer, rows, completions, max_length)
    scores = []
    for start in range(0, len(prompts), batch_size):
        part = prefix_scores(head_model, prompts[start : start + batch_size], responses[start : start + batch_size])
        scores.extend(float(s[-1]) for s in part)
    return scores, truncated


def load_scalar_head(path: str, fallback_tokenizer: str, dtype: str):
    """A scalar-head model and its tokenizer (its own when saved with one, else the evaluated model's)."""
    from pathlib import Path

    from eqrlhf.models.heads import ScalarHeadLM
    from eqrlhf.models.loading import load_tokenizer

    model = ScalarHeadLM.load(path, dtype=dtype).eval()
    own = (Path(path) / "tokenizer_config.json").is_file()
    return model, load_tokenizer(path if own else fallback_tokenizer)


def _check_vocab(model, baseline) -> None:
    if baseline is not None and model.config.vocab_size != baseline.config.vocab_size:
        raise ConfigError(
            f"eval.baseline_model has vocab_size {baseline.config.vocab_size}, the evaluated model "
            f"{model.config.vocab_size}: likelihood retention compares the same tokens, so they must share a tokenizer"
        )


def _by(scored: list[dict], indices: list[int], key: str, field: str) -> dict:
    from eqrlhf.evaluate.metrics import mean_stat

    groups: dict[str, list[float]] = {}
    for i in indices:
        groups.setdefault(scored[i][key], []).append(scored[i][field])
    return {name: mean_stat(values) for name, values in sorted(groups.items())}


def helpfulness_numbers(cfg, paths: dict, scored: list[dict], rows: list[dict]) -> dict:
    """Likelihood retention on the reference answers of helpful suites (always, when they have answers) and
    the reward-model score of the completions (when ``eval.reward_model`` is set); per-row values go into
    ``scored``. The models load in this process: the generating engines live in the pool's actors."""
    from eqrlhf.evaluate.metrics import mean_stat
    from eqrlhf.models.loading import load_causal_lm, load_tokenizer
    from eqrlhf.rollout import resolve_device

    helpful = [i for i, r in enumerate(rows) if r["kind"] == "helpful"]
    with_answer = [i for i in helpful if (rows[i].get("chosen") or "").strip()]
    empty = mean_stat([])
    out = {"helpful_prompts": len(helpful), "without_reference_answer": len(helpful) - len(with_answer)}
    out.update(likelihood_retention=empty, reference_loglik=empty, baseline_loglik=empty, truncated=0, reward=None)
    device = resolve_device(cfg.generation.device)  # the pool is shut down by now: its GPU share is free
    if with_answer:
        tokenizer = load_tokenizer(paths["model"])
        model = load_causal_lm(paths["model"], dtype=cfg.model.dtype).eval().to(device)
        same = paths["baseline"] == paths["model"]
        baseline = None if same else load_causal_lm(paths["baseline"], dtype=cfg.model.dtype).eval().to(device)
        _check_vocab(model, baseline)
        answered = [rows[i] for i in with_answer]
        lr = likelihood_retention(model, baseline, tokenizer, answered, cfg.model.max_length, cfg.eval.batch_size)
        del model, baseline
        for i, j in enumerate(with_answer):
            scored[j]["likelihood_retention"] = lr["retention"][i]
        out.update(
            likelihood_retention=mean_stat(lr["retention"]),
            reference_loglik=mean_stat(lr["loglik"]),
            baseline_loglik=mean_stat(lr["baseline_loglik"]),
            truncated=lr["truncated"],
            by_suite=_by(scored, with_answer, "suite", "likelihood_retention"),
            by_category=_by(scored, with_answer, "category", "likelihood_retention"),
        )
    if paths.get("reward") and helpful:
        head, tok = load_scalar_head(paths["reward"], paths["model"], cfg.model.dtype)
        head = head.to(device)
        texts = [scored[i]["completion"] for i in helpful]
        scores, _ = reward_scores(
            head, tok, [rows[i] for i in helpful], texts, cfg.model.max_length, cfg.eval.batch_size
        )
        for i, s in zip(helpful, scores):
            scored[i]["reward"] = s
        out.update(reward=mean_stat(scores), reward_by_suite=_by(scored, helpful, "suite", "reward"))
    return out
