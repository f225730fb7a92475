"""Resuming reads DeepSpeed's torch.save files without running code: a planted pickle is refused by name,
the objects DeepSpeed really writes load. (Resume through Ray Train with these loads is covered by
tests/test_train_resume_on_cpu.py, which resumes exactly.)"""

from __future__ import annotations

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
