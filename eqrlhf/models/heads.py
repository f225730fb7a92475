"""Scalar-head language models: a transformer backbone plus ``Linear(hidden, 1)``.

One forward pass scores every position, so ``scores[:, t]`` is the reward (or cost,
or value) of the prefix ending at token t: what AMA's ``reward_prefix`` scorer and a
PPO critic need. A whole response's scalar reward is the score at its last token
(:func:`last_token_scores`).

On disk a scalar-head model is a plain transformers checkpoint of the backbone
(``AutoModel`` loads it; safetensors) plus ``score_head.safetensors`` and a small
``eqrlhf_head.json`` describing the head. Right padding only: the backbone numbers
positions from 0, so left padding would shift them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from eqrlhf.errors import InputError, InputNotFound, tried
from eqrlhf.models.loading import resolve_model_path

HEAD_WEIGHTS = "score_head.safetensors"
HEAD_CONFIG = "eqrlhf_head.json"
HEAD_FORMAT = "eqrlhf.scalar_head/1"


class ScalarHeadLM(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            # Small init (std 1/sqrt(hidden+1), zero bias): a fresh head starts near 0
            # so early reward-model training is not dominated by random offsets.
            nn.init.normal_(head.weight, std=(hidden + 1) ** -0.5)
            nn.init.zeros_(head.bias)
        self.score_head = head.float()  # kept in float32 whatever the backbone dtype

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_module(cls, model: nn.Module) -> ScalarHeadLM:
        """Wrap an in-memory model (a ``*ForCausalLM`` or a bare backbone) with a fresh head."""
        return cls(model.base_model)

    @classmethod
    def from_lm(cls, name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> ScalarHeadLM:
        """A causal LM's backbone (its LM head dropped) with a fresh score head."""
        return cls(_load_backbone(resolve_model_path(name_or_path), dtype, trust_remote_code))

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False) -> ScalarHeadLM:
        """Load a directory written by :meth:`save`."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise InputNotFound(f"scalar-head model directory not found: {tried(path)}")
        for name in (HEAD_CONFIG, HEAD_WEIGHTS, "config.json"):
            if not (path / name).is_file():
                raise InputNotFound(
                    f"{path} is not a scalar-head model: missing {name} "
                    f"(write one with ScalarHeadLM.save, or start from a causal LM with ScalarHeadLM.from_lm)"
                )
        meta = json.loads((path / HEAD_CONFIG).read_text())
        if meta.get("format") != HEAD_FORMAT:
            raise InputError(
                f"unknown head format {meta.get('format')!r}, expected {HEAD_FORMAT}",
                file=path / HEAD_CONFIG,
                field="format",
            )
        from safetensors.torch import load_file

        backbone = _load_backbone(str(path), dtype, trust_remote_code)
        head = nn.Linear(meta["hidden_size"], 1)
        head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
        return cls(backbone, head)

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Backbone via ``save_pretrained`` (safetensors), head and its description next to it."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.score_head.state_dict().items()}, path / HEAD_WEIGHTS
        )
        meta = {"format": HEAD_FORMAT, "hidden_size": self.score_head.in_features, "bias": True}
        (path / HEAD_CONFIG).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    # -- compute ----------------------------------------------------------------
    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score of every prefix: ``[B, T]`` float32, position t scores tokens ``0..t``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # the head's own dtype: float32 normally, bf16 when a bf16 DeepSpeed engine holds it; scores are float32
        return self.score_head(hidden.to(self.score_head.weight.dtype)).squeeze(-1).float()


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence reward ``[B]``: the score at the last real token of each right-padded row."""
    last = attention_mask.long().sum(dim=1) - 1
    return scores.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)


def _load_backbone(path: str, dtype: str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel

    # AutoModel on a *ForCausalLM checkpoint loads just the backbone (the LM head is
    # skipped), and what save() writes back is an ordinary AutoModel checkpoint.
    return AutoModel.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
