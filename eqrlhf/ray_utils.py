"""Starting or joining a Ray cluster the same way from every stage."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one.

    A local cluster gets a logical CPU count of at least 8 so that Ray Data stages and
    Ray Train workers can be scheduled side by side on a 2-core machine; the dashboard
    stays off (it costs about 1 GB and nothing here needs it), and its worker processes
    run :func:`setup_local_worker` first. What the driver's terminal shows is set by
    eqrlhf.terminal, on both paths (it only touches this driver process).
    """
    import ray

    from eqrlhf import terminal

    if ray.is_initialized():
        return
    terminal.before_ray_init()
    if os.environ.get("RAY_ADDRESS"):
        # A joined cluster keeps its own runtime env (`ray job submit --runtime-env ...`): no setup hook is added.
        # A second worker_process_setup_hook next to the job's would make ray.init fail on the merge, and a
        # cluster started by `ray start` or KubeRay runs its dashboard, so Ray Train's State API queries that
        # setup_local_worker quiets on a local cluster succeed there (a warning from them there is real news).
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        cpus = num_cpus or max(8, os.cpu_count() or 1)
        hook = {"worker_process_setup_hook": f"{__name__}.setup_local_worker"}
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, configure_logging=False, runtime_env=hook)
    terminal.after_ray_init()


def setup_local_worker() -> None:
    """Run first by every worker process of a cluster that init_ray started (runtime_env
    ``worker_process_setup_hook``). It must not raise: a failing hook ends the worker.

    Ray Train starts a detached PlacementGroupCleaner with every run; once a second it asks the State API
    whether the run's controller is still alive, to free the placement group of a controller that died. The
    State API is served by the dashboard, which a local cluster here runs without, so every query fails and
    the cleaner logs "Failed to query Ray Train Controller actor state" once a second for the whole run. It
    cannot succeed on this cluster, so the cleaner's logger keeps its errors only; the controller itself still
    removes its placement group when the run ends, as it does everywhere. When RAY_ADDRESS is unset, the
    cleaner's State API client looks for the cluster among the Ray instances on this machine and, finding two
    (another run, a test session), raises ConnectionError and kills its thread with a traceback instead:
    RAY_ADDRESS names this worker's own cluster, which it belongs to.
    """
    import logging

    try:
        import ray

        cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
        logging.getLogger(cleaner).setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception as err:  # a worker without the hook's effect still works
        logging.getLogger(__name__).debug("setup_local_worker: %s", err)


def blocks_for_actor_pool(rows: int, batch_size: int, batches_per_block: int = 4) -> int:
    """How many blocks to cut ``rows`` into before a slow model stage that runs in a pool of actors.

    A map task emits its output only when its whole input block is done, so one block of a few hundred
    rows on a CPU model can outlast Ray Data's no-progress timeout (30 min) and fail the stage, and a
    dataset of one block keeps every actor but one idle. A few batches per block avoids both.
    """
    return max(1, -(-rows // (batch_size * batches_per_block)))
