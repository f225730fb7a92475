"""The data half of a model card: what the model was trained on, by category, and under which licences.

The licence of a trained model follows its training data. Each source of the run's ``data.sources`` that
reached the training rows (the training input's ``per_source`` counts) is looked up:

- the bundled demo corpus (``eqrlhf/data/demo_corpus.jsonl``) is the project's own, under the project
  licence (``PROJECT_LICENCE``, the one ``pyproject.toml`` declares);
- a file of the shared data folder is looked up in that folder's ``manifest.json`` (its ``license`` field,
  copied from ``SOURCES.md``); several are CC-BY-NC-4.0, which makes the model non-commercial;
- anything else is "unknown", and the card says to check it before distributing the model.

A config that trains on an earlier run's output lists no sources of its own: the sources are read from the
pipeline config that run saved (``<run>/config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from eqrlhf.config import CATEGORIES, Config, from_dict

PROJECT_LICENCE = "Apache-2.0"  # pyproject.toml's [project] license (tests check they agree)
DEMO_CORPUS = Path(__file__).resolve().parent / "data" / "demo_corpus.jsonl"
# licences that allow commercial use and redistribution with attribution: the model keeps the project's licence
PERMISSIVE = ("MIT", "APACHE-2.0", "CC-BY-4.0", "ODC-BY", "BSD")


def _stage_dir(cfg: Config, run_root: Path, explicit: str | None, default: str) -> Path:
    """A stage's folder as configured; relative paths resolve against the working directory of the run,
    so a card written later from elsewhere looks for the folder of the same name in the run folder."""
    path = cfg.stage_dir(explicit, default)
    return path if path.exists() else run_root / path.name


def _manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def training_manifests(cfg: Config, run_root: Path) -> dict[str, dict]:
    """The data stages' manifests that exist, by column title: mixture, pairs, trained on."""
    from eqrlhf.data.score import training_input_dir

    found = {
        "categorized": _manifest(_stage_dir(cfg, run_root, cfg.categorize.output, "categorized")),
        "mixture": _manifest(_stage_dir(cfg, run_root, cfg.mix.output, "mixture")),
        "pairs": _manifest(_stage_dir(cfg, run_root, cfg.pairs.output, "pairs")),
    }
    train_input = training_input_dir(cfg)
    found["trained on"] = _manifest(train_input if train_input.exists() else run_root / train_input.name)
    return {k: v for k, v in found.items() if v is not None}


def mixture_rows(cfg: Config, run_root: Path) -> list[str]:
    """A table of rows per risk category in each data stage (from their manifests)."""
    manifests = training_manifests(cfg, run_root)
    if not manifests:
        return ["No data-stage manifest was found for this run; the mixture is not recorded."]
    extra = sorted({c for m in manifests.values() for c in m.get("per_category", {})} - set(CATEGORIES))
    categories = [*CATEGORIES, *extra]
    lines = [
        "Rows per risk category (EHD explicit harmful, IHD harmful intent, MHD both, none benign) in each data "
        "stage of the run:",
        "",
        "| category | " + " | ".join(manifests) + " |",
        "|---|" + "---|" * len(manifests),
    ]
    for category in categories:
        counts = [str(m.get("per_category", {}).get(category, 0)) for m in manifests.values()]
        lines.append(f"| {category} | " + " | ".join(counts) + " |")
    totals = [str(m.get("rows_written", "")) for m in manifests.values()]
    return lines + ["| all | " + " | ".join(totals) + " |"]


def _shared_licence(path: Path) -> str | None:
    """The licence a shared data folder's ``manifest.json`` gives for ``path`` (a file below that folder)."""
    for folder in path.parents:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            entries = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            continue
        entry = entries.get(str(path.relative_to(folder))) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and "license" in entry:
            return entry["license"]
    return None


def source_licence(path: Path) -> tuple[str, bool]:
    """(licence, whether it is the bundled demo corpus) of one data source file."""
    resolved = path.expanduser().resolve()
    if resolved == DEMO_CORPUS or str(path).endswith("eqrlhf/data/demo_corpus.jsonl"):
        return PROJECT_LICENCE, True
    return _shared_licence(resolved) or "unknown", False


def _config_with_sources(cfg: Config, run_root: Path) -> Config:
    """A config that trains on an earlier run's output (``train.input``) lists no ``data.sources``; the
    pipeline config that run saved (``<run>/config.json``) does."""
    from eqrlhf.data.score import training_input_dir

    if cfg.data.sources:
        return cfg
    for folder in (run_root, training_input_dir(cfg).parent):
        saved = folder / "config.json"
        tree = json.loads(saved.read_text()) if saved.is_file() else None
        if isinstance(tree, dict) and (tree.get("data") or {}).get("sources"):
            return from_dict(tree, origin=str(saved))
    return cfg


def data_licences(cfg: Config, run_root: Path) -> list[dict]:
    """Name, path, rows trained on and licence of each data source that reached the training rows."""
    trained = training_manifests(cfg, run_root).get("trained on") or {}
    used = trained.get("per_source")
    cfg = _config_with_sources(cfg, run_root)
    out = []
    for source in cfg.data.sources:
        if used is not None and source.name not in used:
            continue
        licence, bundled = source_licence(cfg.resolve_path(source.path))
        rows = used.get(source.name) if used else None
        out.append({"name": source.name, "path": source.path, "rows": rows, "licence": licence, "bundled": bundled})
    return out


def _non_commercial(licence: str) -> bool:
    return "NC" in licence.upper().replace("NON-COMMERCIAL", "NC")


def model_licence(licences: list[dict]) -> dict:
    """The card's licence: non-commercial when any source is, "other" when one is unknown or restrictive,
    otherwise the project's."""
    if not licences:
        return {"id": "other", "non_commercial": [], "unclear": ["the training data"]}
    nc = [s["name"] for s in licences if _non_commercial(s["licence"])]
    if nc:
        return {"id": "cc-by-nc-4.0", "non_commercial": nc, "unclear": []}
    unclear = [s["name"] for s in licences if not s["licence"].upper().startswith(PERMISSIVE)]
    return {"id": "other" if unclear else PROJECT_LICENCE.lower(), "non_commercial": [], "unclear": unclear}


def licence_section(licences: list[dict], licence: dict) -> list[str]:
    lines = ["### Sources and licences", ""]
    if not licences:
        return lines + [
            "No data source is recorded for this run: check the training data's licence before distributing."
        ]
    lines += ["| source | path | rows trained on | licence |", "|---|---|---|---|"]
    for s in licences:
        rows = "" if s["rows"] is None else s["rows"]
        own = " (eqrlhf's own demo corpus)" if s["bundled"] else ""
        lines.append(f"| {s['name']} | `{s['path']}` | {rows} | {s['licence']}{own} |")
    lines.append("")
    if licence["non_commercial"]:
        names = ", ".join(licence["non_commercial"])
        lines.append(
            f"**Non-commercial use only.** Trained on data licensed CC-BY-NC ({names}), so this model is "
            "released under CC-BY-NC-4.0: research and evaluation, not a commercial product."
        )
    elif licence["unclear"]:
        names = ", ".join(licence["unclear"])
        lines.append(f"The licence of {names} is not recorded or not permissive: check it before distributing.")
    else:
        lines.append(f"Every source allows redistribution; the model is released under {PROJECT_LICENCE}.")
    lines.append("The starting model's own licence applies as well.")
    return lines
