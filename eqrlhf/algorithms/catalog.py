"""What each training loss needs, in one place and without torch: the config schema checks ``algorithm.loss``
against it at load, and batching, the score stage, the stage registry and the trainers ask it which
columns, reference model, safety labels and AMA scores a loss needs. The loss name is the one AMA switch
(:func:`ama_on`): ``ama_dpo`` is DPO under the AMA mask, ``ama_ppo`` is PPO under it. The loss functions
themselves live in ``eqrlhf.algorithms.losses`` (offline) and ``eqrlhf.algorithms.ppo`` (online);
``losses.register`` refuses a name that is not declared here, and a test checks every offline name has a
function.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LossInfo:
    # preference: chosen vs rejected pairs; sft: chosen responses only; scalar: a reward/cost head on pairs;
    # online: PPO rollouts from the engine pool (eqrlhf.train.ppo)
    kind: Literal["preference", "sft", "scalar", "online"]
    uses_reference: bool = False  # reference-model log-probs (in the trainer or precomputed by the score stage)
    safety_labels: bool = False  # needs chosen_safe / rejected_safe
    # AMA-masked: needs per-token scores (offline: the score stage; online: the critic's values)
    ama: bool = False
    lagrangian: bool = False  # online: a cost source, a cost critic and a learned lambda (PPO-Lagrangian)
    units: Literal["pairs", "tokens", "episodes"] = "pairs"  # what the loss averages over


_PREFERENCE = LossInfo("preference", uses_reference=True)
_AMA_PREFERENCE = LossInfo("preference", uses_reference=True, ama=True)
CATALOG: dict[str, LossInfo] = {
    "dpo": _PREFERENCE,
    "ipo": _PREFERENCE,
    "cdpo": _PREFERENCE,
    "ama_dpo": _AMA_PREFERENCE,
    "ama_ipo": _AMA_PREFERENCE,
    "ama_cdpo": _AMA_PREFERENCE,
    "bfpo": LossInfo("preference", uses_reference=True, safety_labels=True),
    "exmate": LossInfo("preference"),  # reference-free: log-ratio of the two responses plus an NLL term
    "sft": LossInfo("sft", units="tokens"),
    "ama_sft": LossInfo("sft", ama=True, units="tokens"),
    "clm": LossInfo("sft", units="tokens"),
    "reward": LossInfo("scalar"),
    "cost": LossInfo("scalar", safety_labels=True),
    "ppo": LossInfo("online", uses_reference=True, units="episodes"),
    "ama_ppo": LossInfo("online", uses_reference=True, ama=True, units="episodes"),
    "ppo_lagrangian": LossInfo("online", uses_reference=True, lagrangian=True, units="episodes"),
    "ama_ppo_lagrangian": LossInfo("online", uses_reference=True, ama=True, lagrangian=True, units="episodes"),
}
ONLINE = tuple(name for name, info in CATALOG.items() if info.kind == "online")
AMA_LOSSES = tuple(name for name, info in CATALOG.items() if info.ama)


def loss_info(name: str) -> LossInfo:
    """The loss's needs; a ValueError naming the closest known loss when ``name`` is unknown."""
    if name not in CATALOG:
        close = difflib.get_close_matches(name, CATALOG, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown loss '{name}'{hint}; known losses: {', '.join(sorted(CATALOG))}")
    return CATALOG[name]


def response_sides(name: str) -> tuple[str, ...]:
    return ("chosen",) if loss_info(name).kind == "sft" else ("chosen", "rejected")


def ama_on(cfg) -> bool:
    """The one AMA switch, read by the score stage, the pipeline, the sweep and both trainers: the loss name
    (``ama_dpo``, ``ama_ppo``, ...); the ``ama`` section only holds the settings of the mask."""
    return loss_info(cfg.algorithm.loss).ama
