"""On-policy rejected answers and judged labels for preference pairs (``pairs.rejected`` / ``pairs.judge``).

A rejected answer the model would never write teaches DPO to avoid a string, not a behaviour. With
``pairs.rejected: on_policy`` the rejected side comes from the model being trained (``model.name_or_path``,
usually an SFT warm start): ``pairs.samples`` answers per prompt at ``pairs.sample_temperature``, with no
instruction, judged by the refusal judge, and the first one that plays the rejected role is kept: a harmful
compliance for a risky prompt (EHD/IHD/MHD), a needless refusal for a benign one (``none``). When no sample
plays the role, a source rejected answer is kept if the row has one (counted), else the row is filtered
(counted): the manifest's ``judged`` block gives the yield per category. ``pairs.on_policy_chosen`` takes the
chosen side from the same samples for the listed categories (a refusal of a risky prompt, an answer to a
benign one). ``pairs.chosen_model`` writes the chosen answers still missing with another model (for example
the base model, where the warm start over-refuses).

With ``pairs.judge: true`` every response is labelled by the judges (refused or not; safe unless it complies
with a risky prompt), the labels replace the category-implied safety flags (so BFPO's target follows real
labels), and a pair whose labels contradict its role is dropped with a counted reason. A benign pair whose two
answers are both safe and both answer (the chosen is the more helpful one) is kept: BFPO's buffer.

``pairs.source_complies`` judges the source's own chosen answer to a risky prompt first: where the source
answers rather than refuses (Safety-Tuned LLaMAs marks every prompt harmful, yet answers about a fifth of
them, e.g. "Identify plants that are poisonous to dogs"), a sampled refusal would be taught as the chosen
side. Such a row is dropped (counted) or becomes a benign pair: the source answer against a sampled refusal.
"""

from __future__ import annotations

import json

from eqrlhf.config import CATEGORIES

RISKY = ("EHD", "IHD", "MHD")

# why a judged pair is dropped: (prompt is risky, chosen refused, rejected refused) -> reason, None = kept
_CONTRADICTIONS = {
    (True, False, False): "judged: both answers comply with a risky prompt",
    (True, False, True): "judged: chosen complies with a risky prompt, rejected refuses",
    (True, True, True): "judged: both answers refuse a risky prompt",
    (False, True, False): "judged: chosen refuses a benign prompt, rejected answers it",
    (False, True, True): "judged: both answers refuse a benign prompt",
}


def is_risky(category: str | None) -> bool:
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
    return category in RISKY


def plays_rejected(category: str, refused: bool) -> bool:
    """A rejected answer is a compliance for a risky prompt and a refusal for a benign one."""
    return refused != is_risky(category)


def judged_safe(category: str, refused: bool) -> bool:
    """The harm rule of the evaluation: unsafe = complies with a risky prompt."""
    return refused or not is_risky(category)


def contradiction(category: str, chosen_refused: bool, rejected_refused: bool) -> str | None:
    """Why a pair with these judged labels contradicts its role (None: it is kept)."""
    return _CONTRADICTIONS.get((is_risky(category), chosen_refused, rejected_refused))


def _meta(row: dict) -> dict:
    return json.loads(row.get("meta") or "{}")


def pick_rejected(row: dict, samples: list[str], refused: list[bool]) -> dict:
    """Replace the row's rejected side by the first sample that plays the rejected role (see module doc).

    Sets ``filter_reason`` when neither a sample nor a source answer can be used, and records
    ``meta.on_policy`` = {samples, matching, used}: ``used`` is ``sample``, ``source`` or None."""
    matching = [text for text, r in zip(samples, refused) if plays_rejected(row["category"], r) and text.strip()]
    source = (row.get("rejected") or "").strip()
    used = "sample" if matching else ("source" if source else None)
    if matching:
        row["rejected"] = matching[0].strip()
        row["rejected_safe"] = None  # the source's flag described another answer
    elif not source:  # the model never plays the role: a yield to count, not a data error
        role = "compliance" if is_risky(row["category"]) else "refusal"
        row["filter_reason"] = f"on-policy: no {role} among the samples and no source rejected answer"
    meta = _meta(row)
    meta["on_policy"] = {"samples": len(samples), "matching": len(matching), "used": used}
    row["meta"] = json.dumps(meta, ensure_ascii=False)
    return row


def pick_chosen(row: dict, samples: list[str], refused: list[bool]) -> dict:
    """``pairs.on_policy_chosen``: the first sample that plays the chosen role (a refusal for a risky prompt,
    an answer for a benign one) replaces the chosen side, so the pair differs in behaviour and not in style
    or source. Without one the row's chosen stays (a source answer, or one generated later); counted in
    ``meta.on_policy`` as ``chosen_matching`` and ``chosen_used`` (``sample``, ``source`` or None)."""
    matching = [t for t, r in zip(samples, refused) if not plays_rejected(row["category"], r) and t.strip()]
    used = "sample" if matching else ("source" if (row.get("chosen") or "").strip() else None)
    if matching:
        row["chosen"] = matching[0].strip()
        row["chosen_safe"] = None
    meta = _meta(row)
    meta.setdefault("on_policy", {}).update(chosen_matching=len(matching), chosen_used=used)
    row["meta"] = json.dumps(meta, ensure_ascii=False)
    return row


SOURCE_COMPLIES = "judged: the source's own chosen answer to a risky prompt is not a refusal"


def route_source_answer(row: dict, refused: bool, action: str) -> dict:
    """``pairs.source_complies`` = ``drop`` or ``benign`` (the caller skips ``keep``): a risky row whose source
    chosen answer is not a refusal (``refused`` False) is dropped (``filter_reason``) or made benign (category
    none, the source answer stays the chosen side); ``meta.source_complies`` keeps the category it came with. A
    refusing source answer leaves the row as is."""
    if refused:
        return row
    if action == "drop":
        row["filter_reason"] = SOURCE_COMPLIES
        return row
    meta = _meta(row)
    meta["source_complies"] = {"category": row["category"]}
    row["meta"] = json.dumps(meta, ensure_ascii=False)
    row["category"] = "none"
    row["chosen_safe"] = row["rejected_safe"] = None  # set again by the judged labels or the category
    return row


def apply_judgement(row: dict, chosen_refused: bool, rejected_refused: bool) -> dict:
    """Judged labels into the row (safety flags, ``meta.judged``); a contradiction becomes a filter reason
    in ``filter_reason`` (the stage counts it and drops the row)."""
    category = row["category"]
    row["chosen_safe"] = judged_safe(category, chosen_refused)
    row["rejected_safe"] = judged_safe(category, rejected_refused)
    meta = _meta(row)
    meta["judged"] = {"chosen_refused": chosen_refused, "rejected_refused": rejected_refused}
    row["meta"] = json.dumps(meta, ensure_ascii=False)
    row["filter_reason"] = contradiction(category, chosen_refused, rejected_refused)
    return row


def add_judged_counts(acc: dict, rows: list[dict]) -> dict:
    """Add rows to per-category counts: on-policy prompts, samples, matching samples and which answer was
    used; judged refusals of each side. ``acc`` is updated and returned (the stage streams batches into it)."""
    for row in rows:
        meta = _meta(row)
        c = acc.setdefault(row.get("category") or "unmapped", {})
        info = meta.get("on_policy")
        if info is not None:
            for key, n in (("prompts", 1), ("samples", info["samples"]), ("matching", info["matching"])):
                c[key] = c.get(key, 0) + n
            c[f"used_{info['used']}"] = c.get(f"used_{info['used']}", 0) + 1
            if "chosen_used" in info:
                c["chosen_matching"] = c.get("chosen_matching", 0) + info["chosen_matching"]
                c[f"chosen_used_{info['chosen_used']}"] = c.get(f"chosen_used_{info['chosen_used']}", 0) + 1
        for side, refused in (meta.get("judged") or {}).items():
            c[side] = c.get(side, 0) + int(refused)
        c["judged"] = c.get("judged", 0) + int("judged" in meta)
        if "source_complies" in meta:  # made benign: its source answered it (pairs.source_complies)
            c["from_risky"] = c.get("from_risky", 0) + 1
    return acc


def print_judged(manifest: dict) -> None:
    """The judged path's counts beside the refusal judge's measured accuracy."""
    info = manifest["pairs"]
    judges = info.get("judges") or {}
    refusal = judges.get("refusal") or {}
    acc = refusal.get("accuracy")
    shown = "not validated" if acc is None else f"accuracy {acc:.3f} on n={refusal.get('n')} held-out human labels"
    if acc is not None and refusal.get("offline"):
        shown += f" (measured offline {refusal['offline']['measured']}, {refusal['offline']['file']})"
    print(f"  refusal judge ({judges.get('refusal_judge')}): {shown}")
    for category, c in sorted(info.get("judged", {}).items()):
        print(f"  {category}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for reason, count in sorted(manifest["filtered"].items()):
        if reason.startswith("judged:"):
            print(f"  dropped {count}: {reason}")


def judge_validation(cfg) -> dict:
    """The refusal judge's accuracy on held-out human labels (fits the embedding head on first use)."""
    from eqrlhf.evaluate.committed_judges import refusal_judge_for

    _, validation = refusal_judge_for(cfg)
    return {"refusal_judge": cfg.eval.refusal_judge, "refusal": validation.get("refusal")}
