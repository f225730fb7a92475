"""Per-step training metrics: averaged over workers, written by rank 0 to JSONL and TensorBoard.

After a restart from the checkpoint at step s, rank 0 drops the lines of steps after s from
``metrics.jsonl`` and purges them from TensorBoard, so the files always hold one trajectory with each step
once, as an uninterrupted run would have written it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= ``last_step``."""
    kept = [row for row in read_metrics(path) if row["step"] <= last_step]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in kept))


class MetricsWriter:
    """Rank 0's writer: one JSON line, one TensorBoard point and, with tracking on, one MLflow / W&B point per
    metric per step."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tracking: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        from eqrlhf.tracking import TrainingRun

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        truncate_metrics(self.path, resume_step)
        self.tb = SummaryWriter(log_dir=str(out_dir / TB_DIR), purge_step=resume_step + 1 if resume_step else None)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.tracked = TrainingRun(tracking)  # MLflow / W&B (eqrlhf.tracking): the same points, when enabled

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()  # a crash must not lose logged steps
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.tracked.log(step, metrics)

    def close(self) -> None:
        self._fh.close()
        self.tb.close()
        self.tracked.close()


def average_over_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each metric over all workers (every worker must hold the same keys)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(metrics)
    names = sorted(metrics)
    values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory on GPU; resident set size of this worker process on CPU (GiB)."""
    if device.type == "cuda":
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil

    return {"memory/rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
