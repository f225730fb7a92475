"""`eqrlhf export RUN_DIR OUT_DIR`: the files a server needs from a run's final model, and nothing else.

A training checkpoint (:mod:`eqrlhf.train.checkpoint`) holds the model beside what only the trainer needs:
DeepSpeed's optimizer and ZeRO partitions (pickle files), the trainer state, the checksum manifest and, with
LoRA, the adapter whose delta is already merged into the weights. The export copies only:

- the weights as safetensors (``model.safetensors`` or its shards and index); a checkpoint whose weights
  exist only as pickles (``*.bin``, ``*.pt``) is refused, never converted;
- ``config.json`` and ``generation_config.json``;
- the tokenizer files and the chat template (``chat_template.jinja``);
- the model card (``README.md``, :mod:`eqrlhf.model_card`): the checkpoint's own when the run wrote one,
  otherwise one generated now from the run's manifests;
- for reward and cost models, the scalar head (``score_head.safetensors``, ``eqrlhf_head.json``); the card
  says how to load it with transformers and safetensors alone.

``RUN_DIR`` may be a pipeline run (``runs/quickstart``: its ``train/final``), a train stage's output
(``runs/quickstart/reward_model``: its ``final``) or a checkpoint folder itself. The checkpoint is checked
against its ``checkpoint_manifest.json`` first, and the export is written to a temporary folder that is
renamed to ``OUT_DIR`` only when complete.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from eqrlhf.errors import InputError, InputNotFound, tried

# what serving reads, as file-name patterns at the checkpoint's top level (sub-folders such as deepspeed/ and
# adapter/ are trainer state or already merged, so none is copied)
WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
CONFIGS = ("config.json", "generation_config.json")
TOKENIZER = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
CHAT_TEMPLATE = ("chat_template.jinja", "chat_template.json")
SCALAR_HEAD = ("score_head.safetensors", "eqrlhf_head.json")
CARD = "README.md"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def _is_model_folder(path: Path) -> bool:
    # config.json alone is not enough: a pipeline run folder holds the run's config.json too
    return (path / "config.json").is_file() and bool(_matching(path, WEIGHTS + PICKLED))


def find_final_checkpoint(run_dir: Path) -> Path:
    """The model folder ``run_dir`` names: itself, its ``final`` or its ``train/final`` (symlinks resolved)."""
    run_dir = Path(run_dir)
    candidates = [run_dir, run_dir / "final", run_dir / "train" / "final"]
    for candidate in candidates:
        if candidate.is_dir() and _is_model_folder(candidate):
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise InputNotFound(
        f"no model checkpoint in {tried(run_dir)} (looked for config.json and weights in {looked}): pass a "
        "pipeline run folder, a train stage's output folder or a checkpoint folder"
    )


def serving_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's files a server reads (see module doc); refuses weights that exist only as pickles."""
    weights = [p for p in _matching(checkpoint, WEIGHTS) if p.suffix == ".safetensors"]
    if not weights:
        pickled = [p.name for p in _matching(checkpoint, PICKLED)]
        found = f" (found only pickle files: {', '.join(pickled)})" if pickled else ""
        raise InputError(
            f"{checkpoint} has no safetensors weights{found}: eqrlhf exports safetensors only; save the model "
            "with save_pretrained(safe_serialization=True) first",
            file=checkpoint,
        )
    patterns = WEIGHTS + CONFIGS + TOKENIZER + CHAT_TEMPLATE + SCALAR_HEAD
    return _matching(checkpoint, patterns)


def _verify(checkpoint: Path) -> None:
    """A training checkpoint must match its checksum manifest; a plain model folder has none to check."""
    from eqrlhf.train.checkpoint import MANIFEST_FILE, verify_checkpoint

    if (checkpoint / MANIFEST_FILE).is_file():
        reason = verify_checkpoint(checkpoint)
        if reason:
            raise InputError(f"{checkpoint} cannot be exported: {reason}", file=checkpoint)


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the serving files of ``run_dir``'s final model into ``out_dir`` (which must not exist or be
    empty); return what was written and what was left out."""
    from eqrlhf.model_card import card_for_export

    checkpoint = find_final_checkpoint(Path(run_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{tried(out_dir)} already exists and is not empty: remove it or choose another folder")
    _verify(checkpoint)
    files = serving_files(checkpoint)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for path in files:
            shutil.copy2(path, tmp / path.name)
        (tmp / CARD).write_text(card_for_export(checkpoint))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sorted(p.name for p in out_dir.iterdir())
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in checkpoint.iterdir() if p.name not in written)
    return {
        "checkpoint": str(checkpoint),
        "out_dir": str(out_dir),
        "kind": "scalar_head" if (out_dir / "eqrlhf_head.json").is_file() else "causal_lm",
        "files": written,
        "left_out": left_out,
        "bytes": sum((out_dir / name).stat().st_size for name in written),
    }


def main_export(run_dir: str, out_dir: str) -> dict:
    """The CLI's ``eqrlhf export``: export and print a short summary."""
    result = export_run(run_dir, out_dir)
    print(f"exported {result['checkpoint']} ({result['kind']}) -> {result['out_dir']}")
    print(f"  files ({result['bytes'] / 2**20:.1f} MiB): {', '.join(result['files'])}")
    if result["left_out"]:
        print(f"  left out (trainer state, not needed to serve): {', '.join(result['left_out'])}")
    return result
