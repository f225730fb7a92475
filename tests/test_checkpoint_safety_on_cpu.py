"""Resuming reads DeepSpeed's torch.save files without running code: a planted pickle is refused by name,
the objects DeepSpeed really writes load. (Resume through Ray Train with these loads is covered by
tests/test_train_resume_on_cpu.py, which resumes exactly.)"""

from __future__ import annotations

import json
import os

import pytest
import torch

from eqrlhf.train.checkpoint import UnsafeCheckpointError, load_without_code


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"state": {}}, "hook": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load.*"):
        load_without_code(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the same file through plain torch.load does run it
    assert marker.exists()


def test_what_deepspeed_writes_loads(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": LossScaler(scale=1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "base_optimizer_state": {"state": {0: {"exp_avg": torch.arange(4.0)}}, "param_groups": [{"lr": 1e-5}]},
    }
    path = tmp_path / "optim_states.pt"
    torch.save(state, path)
    loaded = load_without_code(path)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["base_optimizer_state"]["state"][0]["exp_avg"], torch.arange(4.0))


# ---- verified checkpoints ----------------------------------------------------------------------------------


def _checkpoint(root, step: int):
    """A checkpoint laid out as the trainer writes it (weights, a DeepSpeed shard per rank, state, manifest)."""
    from eqrlhf.train.checkpoint import write_checkpoint_manifest

    path = root / f"step_{step}"
    (path / "deepspeed" / "state").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    for rank in (0, 1):
        torch.save({"rank": rank, "exp_avg": torch.arange(8.0)}, path / "deepspeed/state" / f"zero_pp_rank_{rank}.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "global_batch": 8}))
    write_checkpoint_manifest(path)
    return path


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "deepspeed/state/zero_pp_rank_1.pt").unlink(), "deepspeed/state/zero_pp_rank_1.pt is missing"),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]),
            "model.safetensors has 1000 bytes, the manifest says 16384",
        ),
        (
            lambda p: _flip_a_byte(p / "deepspeed/state/zero_pp_rank_0.pt"),
            "zero_pp_rank_0.pt does not match its sha256",
        ),
        (lambda p: (p / "checkpoint_manifest.json").unlink(), "no checkpoint_manifest.json"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_newest_one_that_verifies(tmp_path, damage, reason, capsys):
    from eqrlhf.config import ConfigError, from_dict
    from eqrlhf.train.checkpoint import newest_verified, verify_checkpoint
    from eqrlhf.train.driver import resume_checkpoint

    good = _checkpoint(tmp_path / "train" / "checkpoints", 2)
    newest = _checkpoint(tmp_path / "train" / "checkpoints", 4)
    assert verify_checkpoint(good) is None and verify_checkpoint(newest) is None
    damage(newest)
    assert reason in verify_checkpoint(newest)
    found, skipped = newest_verified(tmp_path / "train" / "checkpoints")
    assert found == good and len(skipped) == 1 and reason in skipped[0]
    cfg = from_dict({"train": {"resume": True}})
    assert resume_checkpoint(cfg, tmp_path / "train") == good
    assert f"skipped checkpoint {newest}" in capsys.readouterr().out
    # train.resume_from at the damaged one, and train.resume with nothing left that verifies: one-line errors
    with pytest.raises((ConfigError, FileNotFoundError), match=f"{newest}.*(cannot be trusted|not a complete)"):
        resume_checkpoint(from_dict({"train": {"resume_from": str(newest)}}), tmp_path / "other")
    (good / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no checkpoint under .* verifies"):
        resume_checkpoint(cfg, tmp_path / "train")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
