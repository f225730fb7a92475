"""Moving policy weights from the trainer to rollout engines, bucket by bucket.

A trainer's state dict is streamed as buckets of at most ``bucket_bytes`` (a ZeRO-3
trainer gathers one bucket at a time, so the whole model never has to exist twice in
one process). A bucket travels as a *packed bucket*: a list of
``(name, dtype, shape, data)`` with ``data`` a flat ``uint8`` array or ``bytes``. That
is plain data with no code in it: it goes through the Ray object store (numpy arrays
are read back zero-copy) and through vLLM's msgpack RPC without pickling any
callable, and it carries bfloat16, which numpy has no type for.
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
    return sum(len(data) for *_, data in packed)


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
    """Refuse names the checkpoint does not have and shapes that differ, naming the tensor."""
    for name, dtype, shape, data in packed:
        if name not in shapes:
            close = sorted(shapes)[:3]
            raise KeyError(f"update_weights: unknown parameter name '{name}' for model {model} (e.g. {close})")
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(
                f"update_weights: '{name}' has shape {tuple(shape)}, model {model} expects {tuple(shapes[name])}"
            )
        expected = int(np.prod(shape)) * DTYPES[dtype].itemsize if dtype in DTYPES else -1
        if len(data) != expected:
            raise ValueError(
                f"update_weights: '{name}' carries {len(data)} bytes, {dtype}{list(shape)} needs {expected}"
            )
