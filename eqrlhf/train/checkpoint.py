"""Training checkpoints: HF weights anyone can load, DeepSpeed state to resume, and the data position.

Layout of ``<run>/train/checkpoints/step_N/`` (Ray Train merges what each worker wrote into it):

- ``config.json``, ``model.safetensors``, tokenizer files: the policy as a plain transformers checkpoint
  (loadable by ``AutoModelForCausalLM`` and vLLM). ZeRO-3 weights are gathered layer by layer onto rank 0.
  With LoRA the adapter is merged into these weights, and the adapter alone is in ``adapter/`` (peft format).
  Reward and cost models are written by ``ScalarHeadLM.save`` (backbone + ``score_head.safetensors``).
- ``deepspeed/state/``: DeepSpeed's own optimizer, scheduler and ZeRO partition files, one per rank. These
  are DeepSpeed's ``torch.save`` files (the only non-safetensors files we write; they are what DeepSpeed
  needs to continue bit-exactly and are only ever read back by ``engine.load_checkpoint``, through
  :func:`refuse_pickled_code`: torch's weights-only unpickler with three DeepSpeed classes allowed, so a
  planted pickle in a checkpoint on shared storage is refused instead of run).
- ``<name>/`` and ``<name>_deepspeed/`` for every other trained engine (PPO's ``critic`` and ``cost_critic``):
  its weights as above and its DeepSpeed state as in ``deepspeed/``.
- ``trainer_state.json``: step, epoch, step within the epoch, rows seen, seed, world size (PPO adds its
  iteration, rollout batch and log lambda).
- ``checkpoint_manifest.json``: every other file's size and sha256, written by rank 0 last, once every
  rank's files are in place (:func:`report_checkpoint`). A directory without it is incomplete; resume
  (``train.resume``, ``train.resume_from`` and Ray Train's restart after a worker failure) uses the newest
  checkpoint whose files all match it (:func:`verify_checkpoint`) and says which it skipped and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from eqrlhf.atomic import write_json
from eqrlhf.errors import InputError, InputNotFound, tried

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_manifest.json"
DS_DIR = "deepspeed"
DS_TAG = "state"
EXTRA_DS_SUFFIX = "_deepspeed"  # an extra engine's DeepSpeed state: <name>_deepspeed/ beside its <name>/ weights
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step}"


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` folder under ``root``, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(path: Path) -> bool:
    """All files written (cheap: the manifest exists); :func:`verify_checkpoint` checks their contents."""
    path = Path(path)
    return (path / STATE_FILE).is_file() and (path / DS_DIR).is_dir() and (path / MANIFEST_FILE).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint_manifest(path: Path) -> None:
    """Size and sha256 of every file under ``path``, written atomically (a reader sees all of it or none)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_json(path / MANIFEST_FILE, {"files": entries}, indent=1)


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None when every file matches its manifest."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE}: the checkpoint was not finished (a rank's files may be missing)"
    for rel, want in json.loads((path / MANIFEST_FILE).read_text())["files"].items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{rel} has {file.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


def newest_verified(root: Path) -> tuple[Path | None, list[str]]:
    """The newest ``step_N`` under ``root`` that verifies, and a line per newer one skipped (with why)."""
    skipped = []
    for path in reversed(_step_dirs(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, skipped
        skipped.append(f"skipped checkpoint {path}: {reason}")
    return None, skipped


def list_checkpoints(root: Path) -> list[Path]:
    """Complete ``step_N`` checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise InputNotFound(
            f"{tried(path)} is not a complete training checkpoint (needs {STATE_FILE}, {DS_DIR}/ and {MANIFEST_FILE}); "
            f"checkpoints are written as <run>/train/checkpoints/step_N"
        )
    return json.loads((path / STATE_FILE).read_text())


def trainer_state(
    step: int, steps_per_epoch: int, global_batch: int, world_size: int, seed: int, config_hash: str, metrics: dict
) -> dict:
    """The data position and run facts after ``step`` optimizer steps (``trainer_state.json``)."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    return {
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "rows_seen": step * global_batch,
        "global_batch": global_batch,
        "world_size": world_size,
        "seed": seed,
        # no generator state to save: the loop reseeds before every step and the data order is a function
        # of (seed, epoch), so a resumed step draws exactly what the uninterrupted run drew
        "rng": "torch.manual_seed(seed * 1000003 + step) before every step; data order from (seed, epoch)",
        "config_hash": config_hash,
        "metrics": metrics,
    }


# ---- saving -----------------------------------------------------------------------------------------------


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def merged_lora_state_dict(peft_model) -> dict:
    """The base model's state dict with every LoRA delta folded into its weight (plain transformers keys).

    Computed out of place (W + scale * B @ A per wrapped layer) so the live model keeps training unchanged.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value.detach()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
            merged[f"{name}.weight"] = weight
    return {k: v.contiguous().cpu() for k, v in merged.items()}


@contextlib.contextmanager
def _full_parameters(engine):
    """Under ZeRO-3 gather every parameter on every rank for the duration; otherwise a no-op."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def save_model_weights(engine, out_dir: Path, tokenizer, rank: int) -> None:
    """Write the model in its loadable format (see module doc). Must be called on every rank."""
    module = engine.module
    out_dir = Path(out_dir)
    if _is_peft(module) or hasattr(module, "score_head"):
        # Adapters and scalar heads are small models or small deltas: gathering them whole is fine.
        with _full_parameters(engine):
            if rank == 0:
                if _is_peft(module):
                    module.save_pretrained(out_dir / ADAPTER_DIR)
                    module.get_base_model().save_pretrained(out_dir, state_dict=merged_lora_state_dict(module))
                else:
                    module.save(out_dir)
        if rank == 0:
            tokenizer.save_pretrained(out_dir)
        return
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # layer by layer onto rank 0's CPU
    else:
        state_dict = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        module.save_pretrained(out_dir, state_dict=state_dict)
        tokenizer.save_pretrained(out_dir)


def save_training_checkpoint(
    engine, out_dir: Path, state: dict, tokenizer, rank: int, extras: dict | None = None
) -> None:
    """Everything needed to serve the model and to resume exactly, and the same for each engine of ``extras``
    (name -> engine) in ``<name>/`` and ``<name>_deepspeed/``. Must be called on every rank."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, extra in (extras or {}).items():
        extra.save_checkpoint(str(out_dir / f"{name}{EXTRA_DS_SUFFIX}"), tag=DS_TAG)
        save_model_weights(extra, out_dir / name, tokenizer, rank)
    engine.save_checkpoint(str(out_dir / DS_DIR), tag=DS_TAG)
    save_model_weights(engine, out_dir, tokenizer, rank)
    if rank == 0:
        write_json(out_dir / STATE_FILE, state)


class UnsafeCheckpointError(InputError):
    """A checkpoint file holds objects other than tensors, plain containers and the allowed classes."""


def _allowed_classes() -> list:
    # the non-tensor objects DeepSpeed's optimizer files hold (found by loading real ZeRO-1/2 checkpoints
    # with weights_only=True): the loss scaler, the ZeRO stage enum, and tensor fragment addresses
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_without_code(path: str | Path, map_location=None):
    """``torch.load`` that executes nothing: tensors, containers and the allowed classes only."""
    import pickle

    import torch  # imported on use: this module is also read by the light driver-side code

    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        reason = lines[0] if lines else str(err).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds a pickled object that is not a tensor or an allowed "
            f"class, and loading it could run code ({reason}); delete the checkpoint or resume from another"
        ) from None


def refuse_pickled_code(engine) -> None:
    """Every file ``engine.load_checkpoint`` reads goes through its checkpoint engine's ``load``, which
    DeepSpeed implements as ``torch.load(weights_only=False)``: route it through :func:`load_without_code`."""
    engine.checkpoint_engine.load = load_without_code


def load_training_checkpoint(engine, path: Path, extras: dict | None = None) -> dict:
    """Restore model, optimizer and scheduler state into ``engine`` and each engine of ``extras`` (as
    :func:`save_training_checkpoint` wrote them); return the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    refuse_pickled_code(engine)
    load_path, _ = engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG)
    if load_path is None:
        raise InputNotFound(f"DeepSpeed found no state under {path / DS_DIR}/{DS_TAG}")
    for name, extra in (extras or {}).items():
        refuse_pickled_code(extra)
        load_path, _ = extra.load_checkpoint(str(path / f"{name}{EXTRA_DS_SUFFIX}"), tag=DS_TAG)
        if load_path is None:
            raise InputNotFound(f"checkpoint {path} has no DeepSpeed state for the {name} ({name}{EXTRA_DS_SUFFIX}/)")
    return state


def load_resume_state(plan: dict, load) -> dict | None:
    """``load(dir)`` on the checkpoint to continue from: after a worker crash Ray Train's latest, or the
    newest one under ``<train dir>/checkpoints`` that verifies when Ray's does not; else the run's
    ``resume_from`` (train.resume / train.resume_from, verified by the driver); None for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # A worker group restarted after a node was lost can start without Ray Train's latest checkpoint (Ray
        # 2.60, 2 of 6 runs of the node-loss test: the restart got none although both ranks had reported step_3
        # and it verified; without this it began again at step 1). Every checkpoint in this run's own folder is
        # from this run: a fresh run writes into a new folder, and train.resume's is the one resume_from is in.
        own, _ = newest_verified(Path(plan["train_dir"]) / "checkpoints")
        if own is not None and (not plan["resume_from"] or own.resolve() != Path(plan["resume_from"]).resolve()):
            print(f"[train] continuing from {own}: this run's newest verified checkpoint", flush=True)
            return load(own)
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            reason = verify_checkpoint(Path(path))
            if reason is None:
                return load(Path(path))
        fallback, skipped = newest_verified(Path(plan["train_dir"]) / "checkpoints")
        for line in [f"skipped Ray Train's latest checkpoint {path}: {reason}", *skipped]:
            print(f"[train] {line}", flush=True)
        if fallback is None:
            raise InputNotFound(f"no checkpoint under {plan['train_dir']}/checkpoints verifies; cannot resume")
        return load(fallback)
    if plan["resume_from"]:
        return load(Path(plan["resume_from"]))
    return None


def report_checkpoint(local: Path, step: int, metrics: dict, plan: dict, rank: int) -> None:
    """Hand this worker's part of ``step_N`` (written under ``local``) to Ray Train, which persists every
    rank's part into ``<train dir>/checkpoints/step_N``; once all ranks are past that, rank 0 writes the
    manifest there, last."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_dir_name(step)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)), checkpoint_dir_name=name)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are persisted before rank 0 lists them
    if rank == 0:
        write_checkpoint_manifest(Path(plan["train_dir"]) / "checkpoints" / name)
    if dist.is_initialized():
        dist.barrier()  # nobody goes on (or is killed by a fault test) before the manifest is written
