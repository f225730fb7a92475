"""Sections of the engines that generate: the engine selector and sampling settings, and the rollout
pool (PPO rollouts, evaluate) with vLLM's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, field_validator

from eqrlhf.config.base import Section, check_custom_resources


class GenerationSection(Section):
    # the one engine selector, for every stage that generates: pairs, the judge categorizer, evaluate and the
    # PPO rollouts (vLLM's own settings and the engine pool's placement are under `rollout`)
    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1)  # conversations per generate call of one engine
    concurrency: int = Field(1, ge=1)  # engine actors in a Ray Data stage
    num_gpus: float = Field(0.0, ge=0)  # per engine actor; 0 = CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor sees a GPU


class RolloutSection(Section):
    """The engine pool (PPO rollouts, evaluate), placed apart from the trainer's workers, and vLLM's engine
    settings; which engine runs is ``generation.engine``."""

    num_engines: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM only
    gpus_per_engine: float = Field(0.0, ge=0)  # fractional shares one GPU between engines; 0 = CPU
    cpus_per_engine: float = Field(1.0, gt=0)  # logical Ray CPUs per engine actor
    # custom Ray resources each engine's bundle also needs: pins the engines to the nodes started with them
    # (e.g. {engine_node: 1}, with one engine_node per node to put every engine on a node of its own); {} = any
    resources_per_engine: dict[str, PositiveFloat] = Field(default_factory=dict)
    max_model_len: int = Field(1024, ge=16)  # vLLM: prompt + completion tokens
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM on GPU
    kv_cache_gb: float = Field(1, gt=0)  # vLLM on CPU: KV cache size (GiB)
    enforce_eager: bool = True  # vLLM: no graph capture / compilation (start-up in seconds, not minutes)
    sync_bucket_mb: float = Field(64, gt=0)  # weight sync bucket size
    # object_store: buckets travel as host copies through Ray (works everywhere); cuda_ipc: engines on trainer
    # rank 0's GPU copy each bucket from the trainer's CUDA buffer, device to device; broadcast: trainer rank 0
    # and the engines form a process group (NCCL when both are on GPUs, else gloo) and each bucket is broadcast
    sync_method: Literal["object_store", "cuda_ipc", "broadcast"] = "object_store"
    sync_timeout_s: float = Field(300, gt=0)  # weight sync (and placement) fails after this instead of hanging
    max_retries: int = Field(2, ge=0)  # restarts of a dead engine per request before generate fails

    @field_validator("resources_per_engine")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources)
