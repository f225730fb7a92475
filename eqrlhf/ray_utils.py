"""Starting or joining a Ray cluster the same way from every stage."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one.

    A local cluster gets a logical CPU count of at least 8 so that Ray Data stages and
    Ray Train workers can be scheduled side by side on a 2-core machine; the dashboard
    stays off (it costs about 1 GB and nothing here needs it).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)


def blocks_for_actor_pool(rows: int, batch_size: int, batches_per_block: int = 4) -> int:
    """How many blocks to cut ``rows`` into before a slow model stage that runs in a pool of actors.

    A map task emits its output only when its whole input block is done, so one block of a few hundred
    rows on a CPU model can outlast Ray Data's no-progress timeout (30 min) and fail the stage, and a
    dataset of one block keeps every actor but one idle. A few batches per block avoids both.
    """
    return max(1, -(-rows // (batch_size * batches_per_block)))
