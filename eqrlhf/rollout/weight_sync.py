"""Moving policy weights from the trainer to rollout engines, bucket by bucket.

A trainer's state dict is streamed as buckets of at most ``bucket_bytes`` (a ZeRO-3
trainer gathers one bucket at a time, so the whole model never has to exist twice in
one process). A bucket travels as a *packed bucket*: a list of
``(name, dtype, shape, data)`` with ``data`` a flat ``uint8`` array or ``bytes``. That
is plain data with no code in it: it goes through the Ray object store (numpy arrays
are read back zero-copy) and through vLLM's msgpack RPC without pickling any
callable, and it carries bfloat16, which numpy has no type for.

With ``rollout.sync_method: cuda_ipc`` an engine on the trainer's own GPU reads a bucket in
place instead: the trainer copies the bucket into one flat CUDA buffer and sends a *CUDA
bucket handle* (:func:`share_cuda_buffer`): the buffer's CUDA IPC handle and a layout of
``(name, dtype, shape, offset, nbytes)``, again plain data (bytes, ints, strings). The engine
maps the buffer (:func:`open_cuda_bucket`) and copies from views of it, device to device.
With ``broadcast`` the trainer and every engine form a process group of their own (NCCL on
GPUs, gloo otherwise) and each flat bucket is broadcast from trainer rank 0; only its layout
travels through Ray.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from eqrlhf.algorithms.logprobs import token_logprobs
from eqrlhf.errors import InputNotFound
from eqrlhf.rollout.base import Completion

PackedTensor = tuple[str, str, tuple[int, ...], "np.ndarray | bytes"]

# dtypes a checkpoint tensor may have; names are looked up in this table only, never with getattr(torch, name)
DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8)
}


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes``; a larger tensor travels alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def dtype_name(name: str, tensor: torch.Tensor) -> str:
    """The name of ``tensor``'s dtype as buckets carry it; a dtype outside :data:`DTYPES` is refused."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TypeError(f"weight '{name}': dtype {dtype} cannot be synced (supported: {sorted(DTYPES)})")
    return dtype


def pack_tensor(name: str, tensor: torch.Tensor) -> PackedTensor:
    dtype = dtype_name(name, tensor)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return name, dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy()


def pack_bucket(bucket: Iterable[tuple[str, torch.Tensor]]) -> list[PackedTensor]:
    return [pack_tensor(name, tensor) for name, tensor in bucket]


def unpack_tensor(packed: PackedTensor) -> tuple[str, torch.Tensor]:
    """A tensor viewing ``data`` (no copy); consumers copy it into their parameters."""
    name, dtype, shape, data = packed
    if dtype not in DTYPES:
        raise TypeError(f"weight '{name}': unknown dtype '{dtype}'")
    with warnings.catch_warnings():  # read-only buffers are fine: loaders only read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return name, raw.view(DTYPES[dtype]).reshape(tuple(shape))


def unpack_bucket(packed: Iterable[PackedTensor]) -> list[tuple[str, torch.Tensor]]:
    return [unpack_tensor(item) for item in packed]


def to_wire(packed: Iterable[PackedTensor]) -> list[tuple[str, str, list[int], bytes]]:
    """The msgpack-able form for vLLM's collective_rpc: ``bytes`` data, list shapes."""
    return [(name, dtype, list(shape), bytes(data)) for name, dtype, shape, data in packed]


Entry = tuple[str, str, tuple[int, ...], int]  # (name, dtype, shape, nbytes): what check_bucket checks


def packed_entries(packed: Iterable[PackedTensor]) -> list[Entry]:
    return [(name, dtype, tuple(shape), len(data)) for name, dtype, shape, data in packed]


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every ``*.safetensors`` file in ``model_dir``, read from the file headers only."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputNotFound(f"no *.safetensors file in {model_dir}")
    shapes = {}
    for path in files:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        shapes.update({name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"})
    return shapes


def expected_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """The names a trainer may send: the checkpoint's, plus ``lm_head.weight`` when the head is tied.

    A tied head is not stored in the checkpoint but is in every HF ``state_dict()``.
    """
    shapes = checkpoint_shapes(model_dir)
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    embed = next((name for name in shapes if name.endswith("embed_tokens.weight")), None)
    if config.get("tie_word_embeddings") and embed and "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes[embed]
    return shapes


def check_bucket(entries: Iterable[Entry], shapes: dict[str, tuple[int, ...]], model: str) -> None:
    """Refuse names the checkpoint does not have, shapes that differ and sizes that do not fit, naming the tensor.

    ``entries``: :func:`packed_entries` of a packed bucket, or :func:`layout_entries` of a flat one.
    """
    for name, dtype, shape, size in entries:
        if name not in shapes:
            close = sorted(shapes)[:3]
            raise KeyError(f"update_weights: unknown parameter name '{name}' for model {model} (e.g. {close})")
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(
                f"update_weights: '{name}' has shape {tuple(shape)}, model {model} expects {tuple(shapes[name])}"
            )
        expected = int(np.prod(shape)) * DTYPES[dtype].itemsize if dtype in DTYPES else -1
        if size != expected:
            raise ValueError(f"update_weights: '{name}' carries {size} bytes, {dtype}{list(shape)} needs {expected}")


# ---- flat buckets: one buffer per bucket, for CUDA IPC and for broadcasts ------------------------------------

ALIGN = 256  # every tensor starts 256-byte aligned in a flat buffer, so each view is aligned for its dtype

Layout = list  # [(name, dtype, shape, offset, nbytes)] of the tensors in a flat buffer


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, Layout]:
    """Copy a bucket into one flat ``uint8`` buffer on its first tensor's device; return it and its layout."""
    layout, size = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        layout.append((name, dtype_name(name, tensor), list(tensor.shape), size, nbytes))
        size += -(-nbytes // ALIGN) * ALIGN
    buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=bucket[0][1].device)
    for (_, tensor), (_, _, _, offset, nbytes) in zip(bucket, layout):
        buffer[offset : offset + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return buffer, layout


def layout_entries(layout: Layout) -> list[Entry]:
    return [(name, dtype, tuple(shape), nbytes) for name, dtype, shape, _, nbytes in layout]


def bucket_views(buffer: torch.Tensor, layout: Layout, names: set[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` of the tensors in a flat buffer (only ``names``, if given); nothing is copied."""
    return [
        (name, buffer[offset : offset + nbytes].view(DTYPES[dtype]).reshape(tuple(shape)))
        for name, dtype, shape, offset, nbytes in layout
        if names is None or name in names
    ]


def host_copy(buffer: torch.Tensor, layout: Layout) -> list[PackedTensor]:
    """A flat bucket as packed tensors in host memory (one copy): what a restarted engine loads."""
    host = buffer.cpu().numpy()
    return [
        (name, dtype, tuple(shape), host[offset : offset + nbytes]) for name, dtype, shape, offset, nbytes in layout
    ]


# ---- CUDA IPC: an engine on the trainer's GPU reads the bucket where it lies --------------------------------


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def share_cuda_buffer(buffer: torch.Tensor, layout: Layout) -> dict:
    """The CUDA bucket handle of a flat bucket buffer (see :func:`flatten_bucket`).

    The caller keeps the buffer alive until every receiver has finished with the bucket
    (torch's IPC reference counting then frees it; ``torch.cuda.ipc_collect`` reclaims it early).
    """
    if buffer.device.type != "cuda":
        raise ValueError(f"rollout.sync_method=cuda_ipc: the trainer's weights are on {buffer.device}, not a GPU")
    torch.cuda.current_stream(buffer.device).synchronize()  # the bytes are in place before another process reads
    _, *ipc = buffer.untyped_storage()._share_cuda_()  # (handle, size, offset, ref counter, offset, event, sync)
    return {"device_uuid": device_uuid(buffer.device.index), "nbytes": buffer.numel(), "ipc": ipc, "layout": layout}


def open_cuda_bucket(handle: dict, names: set[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Views of a CUDA bucket shared by another process on this process's GPU (only ``names``, if given).

    Fails, naming both GPUs, when this process does not see the GPU the buffer lives on.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    mine = {device_uuid(i): i for i in range(torch.cuda.device_count())}
    if handle["device_uuid"] not in mine:
        raise RuntimeError(
            f"rollout.sync_method=cuda_ipc: the trainer's buffer is on GPU {handle['device_uuid']}, this engine sees "
            f"{sorted(mine) or 'no GPU'}; cuda_ipc needs every engine on trainer rank 0's GPU (fractional "
            "train.gpus_per_worker and rollout.gpus_per_engine), else use rollout.sync_method=broadcast"
        )
    index = mine[handle["device_uuid"]]
    ipc_handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle, event_sync = handle["ipc"]
    with torch.cuda.device(index):
        buffer = rebuild_cuda_tensor(
            torch.Tensor, (handle["nbytes"],), (1,), 0, torch.UntypedStorage, torch.uint8, index, ipc_handle,
            storage_size, storage_offset, False, ref_handle, ref_offset, event_handle, event_sync,
        )  # fmt: skip
    return bucket_views(buffer, handle["layout"], names)


# ---- broadcast: trainer rank 0 and every engine in a process group of their own ----------------------------


def check_sync_method(cfg, trainer: bool = False) -> None:
    """Before any resource is taken: cuda_ipc needs GPU engines of one worker each and, when a trainer
    syncs (``trainer``), a trainer on the GPU too."""
    from eqrlhf.config import ConfigError

    r = cfg.rollout
    if r.sync_method != "cuda_ipc":
        return
    if trainer and not cfg.train.use_gpu:
        raise ConfigError(
            "rollout.sync_method=cuda_ipc needs train.use_gpu=true and engines on trainer rank 0's GPU; "
            "use object_store or broadcast otherwise"
        )
    if r.gpus_per_engine == 0 or r.tensor_parallel_size != 1:
        raise ConfigError(
            "rollout.sync_method=cuda_ipc needs engines on a GPU (rollout.gpus_per_engine > 0) with "
            "rollout.tensor_parallel_size=1, on trainer rank 0's GPU"
        )


def weight_device(cfg) -> str:
    """Where the trainer hands buckets over: its GPU for cuda_ipc and for NCCL broadcasts, else host memory."""
    r = cfg.rollout
    on_gpu = r.sync_method == "cuda_ipc" or (r.sync_method == "broadcast" and weight_group_backend(cfg) == "nccl")
    return "cuda" if on_gpu else "cpu"


def weight_group_backend(cfg) -> str:
    """NCCL when the trainer and the engines are on GPUs, gloo otherwise."""
    return "nccl" if cfg.train.use_gpu and cfg.rollout.gpus_per_engine > 0 else "gloo"


def free_port() -> int:
    """A TCP port free on this machine now, for the group's store (rank 0 binds it right away)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def join_weight_group(backend: str, host: str, port: int, rank: int, world: int, timeout_s: float):
    """This process's member of a weight-sync group (rank 0, the trainer, hosts the store); blocks until all joined.

    Built from a ``TCPStore`` and a process-group object directly instead of ``init_process_group``: the
    trainer process already has Ray Train's default group, which this one must leave alone. Every collective
    on it fails after ``timeout_s`` instead of hanging.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, rank == 0, timeout=timeout)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(store, rank, world, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world, options)
    return store, group  # the store must live as long as the group


def broadcast_bucket(member, buffer: torch.Tensor) -> None:
    """Rank 0 sends ``buffer``; every other rank receives into its own buffer of the same size."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    member[1].broadcast([buffer], options).wait()


def receive_bucket(member, layout: Layout, nbytes: int, device, names: set[str] | None = None):
    """An engine's side of :func:`broadcast_bucket`: views of the received bucket on ``device``."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    broadcast_bucket(member, buffer)
    return bucket_views(buffer, layout, names)


# ---- did the engines get the weights? the trainer's and the engines' log-probs of the same tokens ------------


@torch.no_grad()
def completion_logprobs(model, completions: Sequence[Completion]) -> list[list[float]]:
    """The trainer's side of a log-prob comparison: one forward of a transformers causal LM over
    prompt + completion per completion, log-probs of the completion tokens under the plain model
    distribution (what greedy engines report). Each rank's own model: under ZeRO-3 every rank must
    call it (the forward gathers shards), or use the PPO batch's own log-probs instead.
    """
    device = next(model.parameters()).device
    values = []
    for c in completions:
        ids = torch.tensor([c.prompt_token_ids + c.token_ids], device=device)
        logits = model(ids).logits[:, len(c.prompt_token_ids) - 1 : -1]
        values.append(token_logprobs(logits, ids[:, len(c.prompt_token_ids) :])[0].tolist())
    return values


def logprob_gap(trainer_logprobs, engine_logprobs, mask=None) -> float:
    """Mean absolute difference between trainer and engine log-probs of the same tokens.

    Either two ``[B, T]`` tensors (with an optional 0/1 ``mask`` of the tokens to compare,
    e.g. the response mask the trainer used with ``token_logprobs``), or two sequences of
    per-sequence lists of equal lengths (``Completion.logprobs`` against the trainer's).
    Non-finite values are an error, not silently averaged.
    """
    if isinstance(trainer_logprobs, torch.Tensor):
        trainer, engine = trainer_logprobs.float(), torch.as_tensor(engine_logprobs, dtype=torch.float32)
        if trainer.shape != engine.shape:
            raise ValueError(f"logprob_gap: trainer {tuple(trainer.shape)} vs engine {tuple(engine.shape)}")
        keep = torch.ones_like(trainer, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        trainer, engine = trainer[keep], engine[keep]
    else:
        if len(trainer_logprobs) != len(engine_logprobs):
            raise ValueError(f"logprob_gap: {len(trainer_logprobs)} trainer vs {len(engine_logprobs)} engine sequences")
        for k, (a, b) in enumerate(zip(trainer_logprobs, engine_logprobs)):
            if len(a) != len(b):
                raise ValueError(f"logprob_gap: sequence {k} has {len(a)} trainer and {len(b)} engine log-probs")
        trainer = torch.tensor([x for seq in trainer_logprobs for x in seq], dtype=torch.float32)
        engine = torch.tensor([x for seq in engine_logprobs for x in seq], dtype=torch.float32)
    if trainer.numel() == 0:
        raise ValueError("logprob_gap: no tokens to compare")
    if not (torch.isfinite(trainer).all() and torch.isfinite(engine).all()):
        raise ValueError("logprob_gap: non-finite log-prob among the compared tokens")
    return float((trainer - engine).abs().mean())
