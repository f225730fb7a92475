"""Model cards: a ``README.md`` in the Hugging Face format for every final checkpoint a run writes.

The card is generated from what the run recorded, never typed by hand: the training config
(``train_config.json``), the data mixture by category (the ``manifest.json`` of each data stage), the
evaluation with its intervals and judge accuracy (``eval.json``, when the run evaluated the model) and the
licence of every data source the model was trained on. YAML front matter carries ``base_model``,
``datasets``, ``license`` and ``tags``; the body says how to load the model without eqrlhf.

Written by the train stage into its final checkpoint (:func:`write_model_card`, no evaluation yet) and
rewritten by ``eqrlhf pipeline`` once the trained model is evaluated; ``eqrlhf export`` copies it, or
generates it when the checkpoint has none (:func:`card_for_export`). Stage fingerprints ignore ``README.md``
(:mod:`eqrlhf.fingerprint`), so rewriting a card never makes a later stage re-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eqrlhf.config import Config, from_dict
from eqrlhf.model_card_data import data_licences, licence_section, mixture_rows, model_licence
from eqrlhf.models.loading import BUNDLED

CARD = "README.md"
SCALAR_LOSSES = {"reward": "reward model", "cost": "cost model"}


@dataclass
class RunFacts:
    """What a card is made of; every field is read from the run's own files."""

    cfg: Config | None  # the config the checkpoint was trained with (None: a bare model folder)
    checkpoint: Path
    run_root: Path  # the run folder the data stages wrote into
    train_manifest: dict | None = None
    evaluation: dict | None = None  # {"trained": eval.json document, "base": document or None}
    scalar_head: bool = False
    notes: list[str] = field(default_factory=list)


# ---- reading the run -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def front_matter(text: str) -> dict:
    """The YAML front matter of a card ({} when it has none)."""
    if not text.startswith("---\n"):
        return {}
    head, sep, _ = text[4:].partition("\n---")
    return (yaml.safe_load(head) or {}) if sep else {}


def base_model_id(ref: str) -> str | None:
    """The hub id a model reference comes from: a bundled alias's source, a local checkpoint's own card's
    ``base_model`` (a warm start keeps the model it started from), a hub id itself; None when unknown."""
    if ref in BUNDLED:
        return BUNDLED[ref].hub_id
    path = Path(ref).expanduser()
    if path.exists():
        card = path / CARD
        return front_matter(card.read_text()).get("base_model") if card.is_file() else None
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return None
    return ref


def _train_dir(checkpoint: Path) -> Path | None:
    """``<train dir>`` of ``<train dir>/checkpoints/step_N`` (the layout eqrlhf.train writes)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def facts_for_checkpoint(checkpoint: Path) -> RunFacts:
    """Everything the run left about ``checkpoint``, read from disk (for a card written after the run)."""
    from eqrlhf.models.heads import HEAD_CONFIG

    checkpoint = Path(checkpoint).resolve()
    train_dir = _train_dir(checkpoint)
    saved = _read_json(train_dir / "train_config.json") if train_dir else None
    cfg = from_dict(saved) if saved else None
    run_root = train_dir.parent if train_dir else checkpoint.parent
    facts = RunFacts(cfg, checkpoint, run_root, _read_json(train_dir / "manifest.json") if train_dir else None)
    facts.scalar_head = (checkpoint / HEAD_CONFIG).is_file()
    final = run_root / "train" / "final"
    trained = _read_json(run_root / "eval" / "trained" / "eval.json")
    if trained and final.exists() and final.resolve() == checkpoint:  # the pipeline evaluated this checkpoint
        facts.evaluation = {"trained": trained, "base": _read_json(run_root / "eval" / "base" / "eval.json")}
    return facts


# ---- sections ----------------------------------------------------------------------------------------------


def _config_rows(cfg: Config, manifest: dict | None) -> list[str]:
    from eqrlhf.algorithms.catalog import ama_on

    t, a = cfg.train, cfg.algorithm
    rows = [
        ("loss", f"`{a.loss}`" + (" (AMA token mask)" if ama_on(cfg) else "")),
        ("started from", f"`{cfg.model.name_or_path}`"),
        ("beta", a.beta),
        ("learning rate", f"{t.lr:g}, {t.lr_schedule} schedule, {t.warmup_steps} warm-up steps"),
        ("length", f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"),
        ("batch", f"{t.micro_batch_size} x {t.grad_accum} accumulation x {t.num_workers} worker(s)"),
        ("DeepSpeed ZeRO stage", t.zero_stage),
        ("LoRA rank", t.lora.r or "none (full fine-tuning)"),
        ("seed", cfg.run.seed),
        ("config hash", f"`{cfg.hash()}`"),
    ]
    if ama_on(cfg):
        ama = cfg.ama
        rows.append(("AMA mask", f"scorer `{ama.scorer}`, rule `{ama.rule}`, tau {ama.tau}, baseline {ama.baseline}"))
    if manifest:
        steps = manifest.get("steps_run", manifest.get("iterations_run"))
        rows.append(("steps run", f"{steps} in {manifest.get('seconds', 0):.0f} s"))
        final = manifest.get("final_metrics") or {}
        shown = {k: final[k] for k in ("loss", "rewards/accuracy", "accuracy", "ama/kept_fraction") if k in final}
        if shown:
            rows.append(("final metrics", ", ".join(f"{k} {v:.4f}" for k, v in shown.items())))
    return [f"| {k} | {v} |" for k, v in rows]


def _evaluation_section(evaluation: dict | None) -> list[str]:
    from eqrlhf.evaluate.report import fmt_judge, fmt_mean, fmt_rate

    if not evaluation:
        return ["This checkpoint was not evaluated by its run (`eqrlhf evaluate` measures it)."]
    trained, base = evaluation["trained"], evaluation.get("base")

    def stats(doc: dict) -> list[str]:
        helpful = ((doc.get("metrics") or {}).get("by_kind", {}).get("helpful") or {}).get("refusal")
        head = doc.get("headline", {})
        return [
            fmt_rate(head.get("harmful_compliance")),
            fmt_rate(head.get("over_refusal")),
            fmt_rate(helpful),
            fmt_mean(head.get("likelihood_retention")),
        ]

    labels = ("harmful compliance (lower is better)", "over-refusal of benign look-alikes (lower is better)")
    labels += ("refusals of ordinary requests (lower is better)", "likelihood retention (higher is better)")
    columns = [("this model", stats(trained))] + ([("base model", stats(base))] if base else [])
    lines = [
        "95% intervals and counts; greedy generation"
        f" ({(trained.get('sampling') or {}).get('max_new_tokens', '?')} new tokens).",
        "",
        "| metric | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {label} | " + " | ".join(c[i] for _, c in columns) + " |" for i, label in enumerate(labels)]
    suites = trained.get("suites") or {}
    if suites:
        counts = ", ".join(f"{name} ({s['kind']}, {s['counts']['evaluated']})" for name, s in suites.items())
        lines += ["", f"Suites (prompts evaluated): {counts}."]
    judges = trained.get("judges") or {}
    for key, label in (("refusal", "refusal judge"), ("harm", "harm judge")):
        judge = judges.get(key)
        if judge:
            lines.append(f"- {label} `{judge['used']}`: {fmt_judge(judge.get('validation'))} against human labels.")
    return lines


def known_limits(facts: RunFacts, licences: list[dict]) -> list[str]:
    cfg, limits = facts.cfg, []
    if any(s["bundled"] for s in licences):
        limits.append(
            "Trained on the bundled demo corpus (prompts written for the project; their counts are in the data "
            "table above): it shows the method; it does not make a model safe to deploy."
        )
    if facts.evaluation:
        head = facts.evaluation["trained"].get("headline", {})
        hc = (head.get("harmful_compliance") or {}).get("rate")
        if hc is not None:
            limits.append(f"It still complied with {100 * hc:.0f}% of the harmful evaluation prompts.")
        limits.append(
            "The rates come from automatic judges with the accuracy shown above, on small suites: differences "
            "inside the intervals are noise."
        )
    else:
        limits.append("Not evaluated by its run: nothing here says how safe or helpful it is.")
    if cfg is not None and cfg.pairs.missing == "generate":
        limits.append("Answers missing from the corpus were generated by the starting model, not written by people.")
    if cfg is not None and cfg.categorize.method == "embedding" and not cfg.categorize.embedding.head:
        limits.append(
            "Prompts were sorted into risk categories by the categorizer head shipped with eqrlhf, fitted on "
            "CC-BY-NC-4.0 data (non-commercial); its macro-F1 is below 0.5, so category counts are approximate."
        )
    limits.append(
        "Measured on single-turn prompts without jailbreak attacks: robustness to adversarial prompts is unknown."
    )
    return [f"- {line}" for line in limits]


def loading_note(facts: RunFacts) -> list[str]:
    if facts.scalar_head:
        return [
            "A transformers backbone (`AutoModel`) plus a linear head in `score_head.safetensors`. The score of a "
            "conversation is the head's output at its last token: the prompt rendered by the chat template with "
            "the generation prompt, then the answer's tokens and EOS, right-padded:",
            "",
            "```python",
            "import torch",
            "from safetensors.torch import load_file",
            "from transformers import AutoModel, AutoTokenizer",
            "",
            "tok = AutoTokenizer.from_pretrained(PATH)",
            "backbone = AutoModel.from_pretrained(PATH)",
            "head = torch.nn.Linear(backbone.config.hidden_size, 1)",
            'head.load_state_dict(load_file(f"{PATH}/score_head.safetensors"))',
            'prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)',
            "ids = torch.tensor([prompt + tok(answer, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]])",
            "score = head(backbone(input_ids=ids).last_hidden_state.float())[0, -1, 0]",
            "```",
            "",
            "(`eqrlhf.models.heads.ScalarHeadLM.load(PATH)` does the same.)",
        ]
    return [
        "A plain transformers causal LM (safetensors) with its tokenizer and chat template:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        'ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")',
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "vLLM serves the folder as it is: `vllm serve PATH`.",
    ]


# ---- the card ------------------------------------------------------------------------------------------------


def render_card(facts: RunFacts) -> str:
    cfg = facts.cfg
    licences = data_licences(cfg, facts.run_root) if cfg is not None else []
    licence = model_licence(licences)
    loss = cfg.algorithm.loss if cfg is not None else None
    kind = SCALAR_LOSSES.get(loss, "reward/cost model") if facts.scalar_head else "chat model"
    tags = ["eqrlhf", "safety", "alignment"] + ([loss.replace("_", "-")] if loss else [])
    tags += ["reward-model"] if facts.scalar_head else ["text-generation"]
    meta = {
        "base_model": base_model_id(cfg.model.name_or_path) if cfg is not None else None,
        "datasets": [s["name"] for s in licences] or None,
        "license": licence["id"],
        "library_name": "transformers",
        "tags": tags,
    }
    if not facts.scalar_head:
        meta["pipeline_tag"] = "text-generation"
    meta = {k: v for k, v in meta.items() if v is not None}
    name = cfg.run.name if cfg is not None else facts.checkpoint.name
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}: {kind}", ""]
    if cfg is None:
        lines += ["No training record was found next to this checkpoint; only how to load it is known.", ""]
    else:
        lines += [
            f"A {kind} trained with eqrlhf (`{loss}`) from `{cfg.model.name_or_path}`"
            + (f" (base model `{meta['base_model']}`)" if meta.get("base_model") else "")
            + ". Generated from the run's manifests.",
            "",
            "## Training",
            "",
            "| setting | value |",
            "|---|---|",
            *_config_rows(cfg, facts.train_manifest),
            "",
            "<details><summary>Full training config</summary>",
            "",
            "```yaml",
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(),
            "```",
            "",
            "</details>",
            "",
            "## Data",
            "",
            *mixture_rows(cfg, facts.run_root),
            "",
            *licence_section(licences, licence),
            "",
            "## Evaluation",
            "",
            *_evaluation_section(facts.evaluation),
            "",
            "## Known limits",
            "",
            *known_limits(facts, licences),
            "",
        ]
    lines += ["## How to load", "", *loading_note(facts), ""]
    return "\n".join(lines)


def write_model_card(
    checkpoint: str | Path, cfg: Config, train_manifest: dict | None = None, evaluation: dict | None = None
) -> Path:
    """Write ``README.md`` into ``checkpoint`` (a symlink such as ``train/final`` is followed) and return it."""
    from eqrlhf.models.heads import HEAD_CONFIG

    checkpoint = Path(checkpoint).resolve()
    train_dir = _train_dir(checkpoint)
    facts = RunFacts(cfg, checkpoint, train_dir.parent if train_dir else checkpoint.parent, train_manifest, evaluation)
    facts.scalar_head = (checkpoint / HEAD_CONFIG).is_file()
    path = checkpoint / CARD
    path.write_text(render_card(facts))
    return path


def write_evaluated_card(train_cfg: Config, evaluate_manifest: dict) -> Path | None:
    """The pipeline's last step: the trained model's card again, now with its evaluation (and the base
    model's, side by side); None when the run has no trained model."""
    final = train_cfg.stage_dir(train_cfg.train.output, "train") / "final"
    if not final.exists():
        return None
    docs = {k: _read_json(Path(e["eval_json"])) for k in ("trained", "base") if (e := evaluate_manifest.get(k))}
    evaluation = {"trained": docs["trained"], "base": docs.get("base")} if docs.get("trained") else None
    return write_model_card(final, train_cfg, _read_json(final.parent / "manifest.json"), evaluation)


def card_for_export(checkpoint: Path) -> str:
    """The checkpoint's own card, or one generated now from what its run left on disk."""
    card = Path(checkpoint) / CARD
    return card.read_text() if card.is_file() else render_card(facts_for_checkpoint(Path(checkpoint)))
