"""Generation for evaluations: completions of many prompts from an EnginePool, in prompt order. Shared by the
safety evaluation (eqrlhf.evaluate), controllability (eqrlhf.evaluate.controllability) and control-data
(eqrlhf.control.selfgen)."""

from __future__ import annotations

from tqdm.auto import tqdm

from eqrlhf.config import Config
from eqrlhf.data.tokenize import prompt_messages
from eqrlhf.rollout.pool import EnginePool


def generate(cfg: Config, model_path: str, rows: list[dict], sampling) -> list:
    """Completions in prompt order from an EnginePool on ``model_path``, in chunks so progress shows."""
    chunk = cfg.generation.batch_size * cfg.rollout.num_engines * 4  # every engine busy with full batches
    out = []
    with EnginePool(cfg, model_path) as pool, tqdm(total=len(rows), desc="evaluate: generating", unit="prompt") as bar:
        for start in range(0, len(rows), chunk):
            part = pool.generate([prompt_messages(r) for r in rows[start : start + chunk]], sampling)
            out.extend(part)
            bar.update(len(part))
    return out
