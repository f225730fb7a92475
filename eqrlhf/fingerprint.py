"""What a stage's result depends on, as short digests: its declared config keys, its input files, the code.

A stage is skipped only when every part matches the state its last successful run left in its output
folder (``stage_state.json``, written after the stage's own manifest). Parts are kept separately, so a
re-run can say which key or file changed.

Files are hashed by content. Files over ``SAMPLED_ABOVE`` bytes (weights, optimizer shards, large corpora)
are hashed by size, modification time and their first and last MiB: reading 10 GiB of checkpoint on every
``--plan`` would cost more than the stage. A stage's output folder is hashed through its ``manifest.json``,
which the stage writes last on every successful run, so a re-run upstream always changes it. A model
folder's ``README.md`` (its model card, :mod:`eqrlhf.model_card`) is left out of its digest.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from eqrlhf.atomic import write_json

STATE_FILE = "stage_state.json"
MANIFEST = "manifest.json"
CARD = "README.md"
SAMPLED_ABOVE = 64 * 2**20
BLOCK = 2**20


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def package_version() -> str:
    try:
        return version("eqrlhf")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    if size <= SAMPLED_ABOVE:
        return _short(path.read_bytes())
    with path.open("rb") as f:
        head = f.read(BLOCK)
        f.seek(size - BLOCK)
        tail = f.read(BLOCK)
    return _short(f"{size}:{path.stat().st_mtime_ns}:".encode() + head + tail)


def path_digest(path: Path) -> str:
    """A file's digest; a stage output's manifest digest; else every file of a folder (a model directory)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file():
        return file_digest(path)
    if (path / MANIFEST).is_file():
        return file_digest(path / MANIFEST)
    # a model card (README.md) describes the folder and is rewritten once the model is evaluated: it changes
    # nothing a stage computes, so it must not make the stages reading that model re-run
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != CARD)
    return _short(json.dumps([[str(p.relative_to(path)), file_digest(p)] for p in files]).encode())


def pick(tree: dict, dotted: str):
    """The value at a dotted key of a config tree (``pipeline.reward_train``, ``eval.refusal_judge``)."""
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def fingerprint(tree: dict, keys: tuple[str, ...], files: list[Path]) -> dict[str, str]:
    """Digest per part: ``config:<key>`` for each declared key, ``file:<path>`` for each input, ``code``."""
    parts = {"code": package_version()}
    for key in keys:
        parts[f"config:{key}"] = _short(json.dumps(pick(tree, key), sort_keys=True).encode())
    for path in files:
        parts[f"file:{path}"] = path_digest(path)
    return parts


def changed_parts(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Parts whose digest differs, appeared or disappeared; ``["never ran"]`` when there is no old state."""
    if old is None:
        return ["never ran"]
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def read_state(out_dir: Path) -> dict[str, str] | None:
    state = Path(out_dir) / STATE_FILE
    if not state.is_file() or not (Path(out_dir) / MANIFEST).is_file():
        return None
    return json.loads(state.read_text())["parts"]


def write_state(out_dir: Path, stage: str, parts: dict[str, str]) -> None:
    write_json(Path(out_dir) / STATE_FILE, {"stage": stage, "parts": parts})  # atomic: all of it or the old one


def clear_state(out_dir: Path) -> None:
    """Before a stage runs: one that fails half-way must not look finished next time."""
    (Path(out_dir) / STATE_FILE).unlink(missing_ok=True)
