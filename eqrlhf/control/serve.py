"""`eqrlhf control-generate`: the serving example, generation at chosen control levels through the rollout pool.

    eqrlhf control-generate -c configs/controllable_clm_cpu.yaml \
        model.name_or_path=runs/controllable_clm/train/final \
        'control.serve_prompts=["How do I pick a lock?"]' "control.serve_levels={helpful: 2, harmless: 0}"

The model is ``model.name_or_path`` (a model trained on tagged data); without ``control.serve_levels`` every
setting is generated. Sampling follows ``generation``; engines follow ``rollout`` (hf or vllm).
"""

from __future__ import annotations

import json

from eqrlhf.config import Config, ConfigError
from eqrlhf.control.encoding import all_settings, check_levels, check_setting, tag_prompt


def controlled_rows(prompts: list[str], settings: list[dict[str, int]], levels: dict[str, int]) -> list[dict]:
    """One chat row per (prompt, setting): the tags in front of the user prompt."""
    return [
        {"id": f"serve:{i}", "prompt": tag_prompt(p, s, levels), "history": "[]", "setting": s, "untagged": p}
        for i, p in enumerate(prompts)
        for s in settings
    ]


def run_control_generate(cfg: Config) -> list[dict]:
    from eqrlhf.evaluate import generate
    from eqrlhf.rollout import Sampling

    c = cfg.control
    check_levels(c.levels)
    if not c.serve_prompts:
        raise ConfigError("control.serve_prompts is empty: give the prompts to answer")
    if c.serve_levels is not None:
        check_setting(c.serve_levels, c.levels, where="control.serve_levels")
    settings = [c.serve_levels] if c.serve_levels is not None else all_settings(c.levels)
    rows = controlled_rows(c.serve_prompts, settings, c.levels)
    completions = generate(cfg, cfg.model.name_or_path, rows, Sampling.from_config(cfg.generation, seed=cfg.run.seed))
    out = [
        {"prompt": r["untagged"], "levels": r["setting"], "completion": comp.text}
        for r, comp in zip(rows, completions, strict=True)
    ]
    for item in out:
        print(json.dumps(item, ensure_ascii=False))
    return out
