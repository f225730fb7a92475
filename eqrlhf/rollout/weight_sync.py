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
bucket handle* (:func:`share_cuda_bucket`): the buffer's CUDA IPC handle and a layout of
``(name, dtype, shape, offset, nbytes)``, again plain data (bytes, ints, strings). The engine
maps the buffer (:func:`open_cuda_bucket`) and copies from views of it, device to device.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

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


def pack_tensor(name: str, tensor: torch.Tensor) -> PackedTensor:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TypeError(f"weight '{name}': dtype {dtype} cannot be synced (supported: {sorted(DTYPES)})")
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


def packed_nbytes(packed: Iterable[PackedTensor]) -> int:
    """Bytes in a packed bucket (or in a CUDA bucket's entries, whose last field is the size)."""
    return sum(data if isinstance(data, int) else len(data) for *_, data in packed)


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every ``*.safetensors`` file in ``model_dir``, read from the file headers only."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
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


def check_bucket(packed: Iterable[PackedTensor], shapes: dict[str, tuple[int, ...]], model: str) -> None:
    """Refuse names the checkpoint does not have and shapes that differ, naming the tensor.

    The last field of an entry is the data or, for a CUDA bucket's layout, its size in bytes.
    """
    for name, dtype, shape, data in packed:
        if name not in shapes:
            close = sorted(shapes)[:3]
            raise KeyError(f"update_weights: unknown parameter name '{name}' for model {model} (e.g. {close})")
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(
                f"update_weights: '{name}' has shape {tuple(shape)}, model {model} expects {tuple(shapes[name])}"
            )
        expected = int(np.prod(shape)) * DTYPES[dtype].itemsize if dtype in DTYPES else -1
        size = data if isinstance(data, int) else len(data)
        if size != expected:
            raise ValueError(f"update_weights: '{name}' carries {size} bytes, {dtype}{list(shape)} needs {expected}")


# ---- CUDA IPC: an engine on the trainer's GPU reads the bucket where it lies --------------------------------

IPC_ALIGN = 256  # every tensor starts 256-byte aligned in the flat buffer, so each view is aligned for its dtype


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def share_cuda_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
    """Copy a bucket of CUDA tensors into one flat buffer; return it and its CUDA bucket handle.

    The caller keeps the buffer alive until every receiver has finished with the bucket
    (torch's IPC reference counting then frees it; ``torch.cuda.ipc_collect`` reclaims it early).
    """
    layout, size = [], 0
    for name, tensor in bucket:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"weight '{name}': dtype {dtype} cannot be synced (supported: {sorted(DTYPES)})")
        if tensor.device.type != "cuda":
            raise ValueError(f"rollout.sync_method=cuda_ipc: weight '{name}' is on {tensor.device}, not a GPU")
        nbytes = tensor.numel() * tensor.element_size()
        layout.append((name, dtype, list(tensor.shape), size, nbytes))
        size += -(-nbytes // IPC_ALIGN) * IPC_ALIGN
    device = bucket[0][1].device
    buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, offset, nbytes) in zip(bucket, layout):
        buffer[offset : offset + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    torch.cuda.current_stream(device).synchronize()  # the bytes are in place before another process reads them
    _, *ipc = buffer.untyped_storage()._share_cuda_()  # (handle, size, offset, ref counter, offset, event, sync)
    return buffer, {"device_uuid": device_uuid(device.index), "nbytes": buffer.numel(), "ipc": ipc, "layout": layout}


def cuda_bucket_entries(handle: dict) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(name, dtype, shape, nbytes)`` per tensor, the form :func:`check_bucket` takes."""
    return [(name, dtype, tuple(shape), nbytes) for name, dtype, shape, _, nbytes in handle["layout"]]


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
            "train.gpus_per_worker and rollout.gpus_per_engine), else use rollout.sync_method=object_store"
        )
    index = mine[handle["device_uuid"]]
    ipc_handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle, event_sync = handle["ipc"]
    with torch.cuda.device(index):
        buffer = rebuild_cuda_tensor(
            torch.Tensor, (handle["nbytes"],), (1,), 0, torch.UntypedStorage, torch.uint8, index, ipc_handle,
            storage_size, storage_offset, False, ref_handle, ref_offset, event_handle, event_sync,
        )  # fmt: skip
    views = []
    for name, dtype, shape, offset, nbytes in handle["layout"]:
        if names is None or name in names:
            views.append((name, buffer[offset : offset + nbytes].view(DTYPES[dtype]).reshape(tuple(shape))))
    return views


def host_copy_of_cuda_bucket(buffer: torch.Tensor, handle: dict) -> list[PackedTensor]:
    """The bucket as packed tensors in host memory (one device-to-host copy): what a restarted engine loads."""
    host = buffer.cpu().numpy()
    return [
        (name, dtype, tuple(shape), host[offset : offset + nbytes])
        for name, dtype, shape, offset, nbytes in handle["layout"]
    ]
