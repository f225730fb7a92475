"""A transformers-based rollout engine: chat template, left padding, batched ``generate``.

Token selection happens in :class:`_TokenPicker`, a logits processor that runs last in
``model.generate``: it picks the next token itself (argmax, or a draw from each row's own
``torch.Generator``) and hands ``generate`` a one-hot score so its argmax is that token.
Transformers keeps doing what it is good at (KV cache, stopping, padding finished rows);
we control the sampling distribution exactly, which gives:

* reproducible sampling independent of batch composition: completion ``j`` of prompt ``i``
  draws from a generator seeded with ``(Sampling.seed, i, j)``;
* log-probs under the distribution actually sampled from: temperature-scaled and
  top-p-truncated (renormalised over the kept tokens). For greedy decoding
  (temperature 0) that distribution is degenerate, so greedy log-probs are those of the
  unmodified model distribution (``log_softmax`` of the raw logits), which is what a
  separate forward pass over the same tokens gives.

The model's shipped generation defaults (repetition penalty, top-k, ...) are replaced by a
bare config at load time, so nothing but ``Sampling`` shapes the distribution.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eqrlhf.errors import ConfigError
from eqrlhf.rollout.base import Completion, Conversation, Sampling


class _TokenPicker:
    """Logits processor that selects tokens and records their log-probs (see module docstring)."""

    def __init__(self, sampling: Sampling, generators: list[torch.Generator] | None):
        self.sampling = sampling
        self.generators = generators
        self.logprobs: list[torch.Tensor] = []  # one [batch] tensor per decoding step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            logp = torch.log_softmax(scores.float(), dim=-1)
            tokens = logp.argmax(dim=-1)
        else:
            logp = sampling_logprobs(scores.float(), self.sampling.temperature, self.sampling.top_p)
            probs = logp.exp()
            tokens = torch.stack(
                [torch.multinomial(probs[row], 1, generator=gen)[0] for row, gen in enumerate(self.generators)]
            )
        self.logprobs.append(logp.gather(1, tokens[:, None])[:, 0])
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(1, tokens[:, None], 0.0)
        return picked


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the temperature-scaled, nucleus-truncated distribution (-inf outside the nucleus)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p  # the most likely token is always kept
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    logp = logp.masked_fill(drop, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return (seed * 1_000_003 + prompt_index * 1_009 + sample_index) % (2**63)


class HFEngine:
    """RolloutEngine backed by a transformers causal LM (CPU or one GPU)."""

    def __init__(
        self,
        model_name_or_path,
        *,
        tokenizer=None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str = "cpu",
        batch_size: int = 8,
    ):
        from transformers import GenerationConfig

        from eqrlhf.models.loading import load_causal_lm, load_tokenizer

        if isinstance(model_name_or_path, str):
            self.model_name = model_name_or_path
            model = load_causal_lm(
                model_name_or_path, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code
            )
            if tokenizer is None:
                tokenizer = load_tokenizer(model_name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        else:  # an already-loaded model (tests, or an engine sharing a trainer's process)
            if tokenizer is None:
                raise ValueError("HFEngine: a preloaded model needs tokenizer=")
            model = model_name_or_path
            self.model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"HFEngine: the tokenizer of {self.model_name} has no chat template")
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, bos_token_id=tokenizer.bos_token_id
        )
        self.requests_served = 0
        self.completions_served = 0

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ConfigError(f"HFEngine: {self.model_name} defines no EOS token; generation could not stop")
        return ids

    # -- RolloutEngine ------------------------------------------------------
    def generate(self, prompts: list[Conversation], sampling: Sampling) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions, ordered by prompt then sample.

        ``token_ids`` are the generated ids without padding, including the final EOS when
        the model stopped (what ``encode_response`` produces for a response text).
        """
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings: {sampling}")
        encoded = [self._encode(conv) for conv in prompts]
        requests = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        completions = []
        for start in range(0, len(requests), self.batch_size):
            completions.extend(self._generate_batch(requests[start : start + self.batch_size], encoded, sampling))
        self.requests_served += len(prompts)
        self.completions_served += len(completions)
        return completions

    def _encode(self, conversation: Conversation) -> list[int]:
        enc = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    @torch.no_grad()
    def _generate_batch(self, requests: list[tuple[int, int]], encoded: list[list[int]], sampling: Sampling):
        from transformers import LogitsProcessorList

        prompts = [encoded[i] for i, _ in requests]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        generators = None
        if sampling.temperature > 0:
            generators = [
                torch.Generator(device=self.device).manual_seed(_row_seed(sampling.seed, i, j)) for i, j in requests
            ]
        picker = _TokenPicker(sampling, generators)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,  # the picker has already chosen; generate's argmax follows it
            logits_processor=LogitsProcessorList([picker]),
        )
        new_tokens = out[:, width:].tolist()
        logprobs = torch.stack(picker.logprobs, dim=1).tolist()
        return [
            self._completion(i, tokens, row_logprobs, prompts[k])
            for k, ((i, _), tokens, row_logprobs) in enumerate(zip(requests, new_tokens, logprobs))
        ]

    def _completion(self, prompt_index: int, tokens: list[int], logprobs: list[float], prompt_ids: list[int]):
        stop = next((t for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
        if stop is not None:
            tokens, finish = tokens[: stop + 1], "stop"
        else:
            finish = "length"
        return Completion(
            prompt_index=prompt_index,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            logprobs=logprobs[: len(tokens)],
            finish_reason=finish,
            prompt_token_ids=list(prompt_ids),
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, object]]) -> None:
        """Copy (a subset of) the state dict into the model in place; unknown names are an error."""
        state = self.model.state_dict(keep_vars=True)
        updates = list(named_tensors)
        unknown = [name for name, _ in updates if name not in state]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter name(s) {unknown} for model {self.model_name}")
        with torch.no_grad():
            for name, value in updates:
                target = state[name]
                value = torch.as_tensor(value)
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"update_weights: '{name}' has shape {tuple(value.shape)}, model expects {tuple(target.shape)}"
                    )
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def health(self) -> dict:
        return {
            "engine": "hf",
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "requests_served": self.requests_served,
            "completions_served": self.completions_served,
        }
