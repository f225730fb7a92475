"""The Ray actor that hosts one rollout engine (vLLM or transformers) for :class:`~eqrlhf.rollout.pool.EnginePool`.

Every engine gets the same weight-update calls here: a session (``begin``/``finish``) around
buckets that arrive packed through the object store, as CUDA bucket handles, or by broadcast.
"""

from __future__ import annotations

import os

import ray
import torch

from eqrlhf.fault_markers import mark
from eqrlhf.rollout.base import Completion, Conversation, Sampling
from eqrlhf.rollout.weight_sync import join_weight_group, open_cuda_bucket, receive_bucket, unpack_bucket


class EngineActor:
    """Hosts one engine in a Ray actor (started by the pool in its placement-group bundle)."""

    def __init__(self, cfg, model_path: str, slot: int = 0, slots: int = 1):
        from eqrlhf.rollout import make_engine

        self.kind = cfg.generation.engine
        bind = None
        if self.kind == "vllm" and cfg.rollout.gpus_per_engine == 0:
            from eqrlhf.rollout.vllm_engine import cpu_bind_spec

            # vLLM engines on one CPU machine would otherwise all bind the same cores
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            bind = cpu_bind_spec(cores, slot, slots, cfg.rollout.tensor_parallel_size)
        self.engine = make_engine(cfg, model_path, cpu_bind=bind)

    def generate(self, prompts: list[Conversation], sampling: Sampling) -> list[Completion]:
        mark("generate", prompts=len(prompts))  # a node-loss test's proof (eqrlhf.fault_markers)
        return self.engine.generate(prompts, sampling)

    def begin_weight_update(self) -> None:
        if self.kind == "vllm":
            self.engine.begin_weight_update()

    def load_weight_bucket(self, packed: list) -> int:
        if self.kind == "vllm":
            return self.engine.load_weight_bucket(packed)
        tensors = unpack_bucket(packed)
        self.engine.update_weights(tensors)
        return len(tensors)

    def load_cuda_bucket(self, handle: dict) -> int:
        """Copy a bucket straight from the trainer's CUDA buffer (rollout.sync_method=cuda_ipc)."""
        if self.kind == "vllm":
            return self.engine.load_cuda_bucket(handle)
        tensors = open_cuda_bucket(handle)
        self.engine.update_weights(tensors)
        torch.cuda.synchronize()  # the copies are done before the trainer may free or reuse its buffer
        return len(tensors)

    def join_weight_group(self, backend: str, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join trainer rank 0's broadcast group (rollout.sync_method=broadcast) as ``rank``, replacing any older one."""
        if self.kind == "vllm":
            self.engine.join_weight_group(backend, host, port, rank, world, timeout_s)
        else:
            self.group = join_weight_group(backend, host, port, rank, world, timeout_s)

    def receive_weight_bucket(self, layout: list, nbytes: int) -> int:
        """Take part in the broadcast of one flat bucket and load it."""
        if self.kind == "vllm":
            return self.engine.receive_weight_bucket(layout, nbytes)
        tensors = receive_bucket(self.group, layout, nbytes, self.engine.device)
        self.engine.update_weights(tensors)
        return len(tensors)

    def finish_weight_update(self) -> None:
        if self.kind == "vllm":
            self.engine.finish_weight_update()

    def health(self) -> dict:
        import psutil

        children = [child.pid for child in psutil.Process().children(recursive=True)]  # vLLM's engine processes
        node = ray.get_runtime_context().get_node_id()  # which node it really runs on (multi-node tests check it)
        return {**self.engine.health(), "pid": os.getpid(), "child_pids": children, "node_id": node}


RemoteEngine = ray.remote(EngineActor)
