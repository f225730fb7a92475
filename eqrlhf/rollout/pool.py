"""A pool of rollout engines as Ray actors: one way to generate, whatever the engine.

The engines (``generation.engine``: ``vllm`` or ``hf``) live in a placement group of their
own, one bundle per engine (``rollout.cpus_per_engine`` CPUs, ``rollout.gpus_per_engine``
GPUs, fractions allowed, and the node labels ``rollout.resources_per_engine``), so rollout
capacity is sized and placed apart from the trainer's workers.

* ``generate`` cuts the prompts into one contiguous chunk per engine and puts the
  answers back in prompt order. An engine whose actor dies is restarted in its bundle,
  given the current policy weights again, and its chunk is sent again; each chunk's
  answer is taken exactly once, so no prompt is lost or duplicated. A chunk is tried at
  most ``1 + rollout.max_retries`` times. When the engine's *node* is gone, its chunk goes
  to a surviving engine instead, and so does that engine slot's work from then on (the pool
  serves on with fewer engines; ``reissued`` counts these hand-overs).
* ``update_weights`` streams a state dict as buckets through the object store: each
  bucket is checked (names, shapes) against the checkpoint, ``ray.put`` once and loaded
  by every engine while the next bucket is being produced. It fails with TimeoutError
  after ``rollout.sync_timeout_s`` instead of hanging. The pool keeps the object refs of
  the latest complete update, so a restarted engine gets the current policy, not the
  checkpoint it was started from. With ``probe`` it also measures the log-prob gap between
  the trainer and the engines on the same tokens (returned and logged with the sync time).
  With ``rollout.sync_method: cuda_ipc`` (engines on trainer rank 0's GPU) each bucket is
  one flat CUDA buffer that the engines map and copy from, device to device; at most
  ``IPC_BUCKETS_IN_FLIGHT`` buffers exist at once. With ``broadcast`` this process and every
  engine worker form a process group (built on first use, rebuilt after any restart) and each
  flat bucket is broadcast from here. Both keep a host copy of each bucket for engines
  restarted later.

Sharing a pool with another process (a Ray Train worker gets it through
``train_loop_config``): it pickles with its actor handles, placement group and weight refs,
and calls from there reach the same engines (tested). Each copy keeps its own restart
bookkeeping and weight refs, and an engine a copy restarts is owned by that copy's process
(it dies with it; the other copy then restarts it again on first use, with the weights *it*
last pushed). So drive generation and weight sync from one process (e.g. trainer rank 0)
and call ``shutdown`` from the process that created the pool.

Sampling seeds: chunk ``k`` (first prompt ``start``) samples with a seed derived from
``(Sampling.seed, start)`` (chunk 0 keeps the seed itself), so sampled rollouts are
reproducible for a given number of engines; greedy decoding does not depend on it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from eqrlhf.errors import ConfigError
from eqrlhf.rollout.base import Completion, Conversation, Sampling
from eqrlhf.rollout.engine_actor import RemoteEngine
from eqrlhf.rollout.weight_sync import (
    broadcast_bucket,
    bucket_named_tensors,
    check_bucket,
    check_sync_method,
    expected_shapes,
    flatten_bucket,
    free_port,
    host_copy,
    join_weight_group,
    layout_entries,
    logprob_gap,
    pack_bucket,
    packed_entries,
    share_cuda_buffer,
    weight_group_backend,
)

logger = logging.getLogger(__name__)

PROBE_TOKENS = 16  # greedy tokens per probe conversation after a weight sync
IPC_BUCKETS_IN_FLIGHT = 2  # cuda_ipc: flat bucket buffers alive at once on the trainer's GPU


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """``min(parts, total)`` contiguous non-empty ``(start, stop)`` ranges covering ``range(total)``."""
    parts = min(parts, total)
    if parts == 0:
        return []
    bounds = [total * k // parts for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def chunk_sampling(sampling: Sampling, start: int) -> Sampling:
    return sampling if start == 0 else dataclasses.replace(sampling, seed=(sampling.seed * 7919 + start) % (2**31))


class EnginePool:
    """``rollout.num_engines`` engine actors behind the RolloutEngine interface (see the module docstring)."""

    def __init__(self, cfg, model: str | None = None):
        from eqrlhf.models.loading import resolve_model_path
        from eqrlhf.ray_utils import init_ray

        r, kind = cfg.rollout, cfg.generation.engine
        if kind == "hf" and r.tensor_parallel_size != 1:
            raise ConfigError("rollout.tensor_parallel_size > 1 needs generation.engine=vllm")
        if r.gpus_per_engine > 1 and r.gpus_per_engine < r.tensor_parallel_size:
            raise ConfigError(
                f"rollout.gpus_per_engine={r.gpus_per_engine} is less than "
                f"rollout.tensor_parallel_size={r.tensor_parallel_size}"
            )
        check_sync_method(cfg)
        if 0 < r.gpus_per_engine < 1 and kind == "vllm" and r.gpu_memory_utilization > r.gpus_per_engine:
            raise ConfigError(
                f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} is more than this engine's GPU share "
                f"rollout.gpus_per_engine={r.gpus_per_engine}: engines sharing a GPU would not all fit"
            )
        self.cfg = cfg
        self.model_name = model or cfg.model.name_or_path
        self.model_path = resolve_model_path(self.model_name)  # fails here, before any cluster resource
        local = Path(self.model_path).is_dir()
        self._shapes = expected_shapes(self.model_path) if local else None
        init_ray()
        self._check_cluster_fits()
        bundle = {
            "CPU": r.cpus_per_engine,
            **({"GPU": r.gpus_per_engine} if r.gpus_per_engine else {}),
            **r.resources_per_engine,  # node labels: the engines go only to the nodes that carry them
        }
        self._pg = placement_group([dict(bundle) for _ in range(r.num_engines)], strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=r.sync_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self._pg)
            raise TimeoutError(
                f"no room for {r.num_engines} engine(s) of {bundle} within rollout.sync_timeout_s="
                f"{r.sync_timeout_s} s (cluster has {ray.available_resources()})"
            ) from None
        self.node_ids = self._bundle_nodes()  # where each engine runs, for logs, manifests and node-loss tests
        self._slots = self._node_slots()
        self._weight_refs: list = []  # buckets of the latest complete update (object refs or host copies)
        self._group = None  # sync_method=broadcast: (store, process group) of this process and the engines
        self.restarts = [0] * r.num_engines
        self.reissued = [0] * r.num_engines  # chunks handed to another engine after their engine's node was lost
        self._lost: dict[int, int] = {}  # engine slot whose node is gone -> the engine serving it now
        self._engines: list = [self._launch(i) for i in range(r.num_engines)]
        try:
            ray.get([engine.health.remote() for engine in self._engines])  # start-up errors surface here
        except BaseException:
            self.shutdown()
            raise

    # -- placement ----------------------------------------------------------
    def _check_cluster_fits(self) -> None:
        r = self.cfg.rollout
        total = ray.cluster_resources()
        needs = [("CPU", r.cpus_per_engine, "cpus_per_engine"), ("GPU", r.gpus_per_engine, "gpus_per_engine")]
        needs += [(name, amount, "resources_per_engine") for name, amount in r.resources_per_engine.items()]
        for key, need, setting in needs:
            if need and need * r.num_engines > total.get(key, 0):
                raise ConfigError(
                    f"rollout.num_engines={r.num_engines} x {need} {key} exceeds the cluster's "
                    f"{total.get(key, 0)} {key} (rollout.{setting})"
                )

    def _bundle_nodes(self) -> list[str]:
        """The node id of each engine's bundle, in engine order."""
        nodes = placement_group_table(self._pg)["bundles_to_node_id"]
        return [nodes[i] for i in range(len(nodes))]

    def _node_slots(self) -> list[tuple[int, int]]:
        """(position among the engines on its node, engines on that node) per engine, for CPU core splitting."""
        order = self.node_ids
        return [(order[:i].count(node), order.count(node)) for i, node in enumerate(order)]

    def _launch(self, index: int):
        slot, slots = self._slots[index]
        return RemoteEngine.options(
            num_cpus=self.cfg.rollout.cpus_per_engine,
            num_gpus=self.cfg.rollout.gpus_per_engine,
            resources=dict(self.cfg.rollout.resources_per_engine),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index),
            max_restarts=0,
        ).remote(self.cfg, self.model_path, slot, slots)

    def _restart(self, index: int) -> None:
        """Replace engine ``index`` by a fresh actor in the same bundle holding the current weights."""
        ray.kill(self._engines[index], no_restart=True)
        self._group = None  # the new engine is in no broadcast group: the next broadcast sync builds a new one
        self.restarts[index] += 1
        logger.warning("restarting rollout engine %d (restart %d)", index, self.restarts[index])
        engine = self._launch(index)
        timeout = self.cfg.rollout.sync_timeout_s
        try:
            ray.get(engine.health.remote(), timeout=timeout)  # a start that hangs fails instead of the caller
        except GetTimeoutError:
            ray.kill(engine, no_restart=True)
            raise TimeoutError(
                f"restarted engine {index} was not up within rollout.sync_timeout_s={timeout} s"
            ) from None
        if self._weight_refs:
            # cuda_ipc and broadcast keep host copies, put in the object store only when an engine needs them
            refs = [ref if isinstance(ref, ray.ObjectRef) else ray.put(ref) for ref in self._weight_refs]
            calls = [engine.begin_weight_update.remote()]
            calls += [engine.load_weight_bucket.remote(ref) for ref in refs]
            calls.append(engine.finish_weight_update.remote())
            try:
                ray.get(calls, timeout=self.cfg.rollout.sync_timeout_s)
            except GetTimeoutError:
                raise TimeoutError(
                    f"restarted engine {index} did not take the current weights within "
                    f"rollout.sync_timeout_s={self.cfg.rollout.sync_timeout_s} s"
                ) from None
        self._engines[index] = engine
        bundles = placement_group_table(self._pg)["bundles_to_node_id"]  # Ray may have moved the bundle
        self.node_ids[index] = bundles.get(index, self.node_ids[index])

    # -- RolloutEngine ------------------------------------------------------
    def generate(self, prompts: Sequence[Conversation], sampling: Sampling) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions ordered by prompt then sample, across all engines."""
        prompts = list(prompts)
        chunks = split_evenly(len(prompts), len(self._engines))
        answers: dict[int, list[Completion]] = {}
        pending = {self._submit(k, chunks[k], prompts, sampling): (k, 0) for k in range(len(chunks))}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k, attempt = pending.pop(ref)
            try:
                completions = ray.get(ref)
            except RayActorError as err:
                start, stop = chunks[k]
                if attempt >= self.cfg.rollout.max_retries:
                    raise RuntimeError(
                        f"rollout engine {k} died {attempt + 1} time(s) serving prompts {start}..{stop - 1} "
                        f"(rollout.max_retries={self.cfg.rollout.max_retries})"
                    ) from err
                self._recover(self._lost.get(k, k))
                pending[self._submit(k, chunks[k], prompts, sampling)] = (k, attempt + 1)
                continue
            start = chunks[k][0]
            answers[k] = [dataclasses.replace(c, prompt_index=c.prompt_index + start) for c in completions]
        return [c for k in range(len(chunks)) for c in answers[k]]

    def _submit(self, k: int, chunk: tuple[int, int], prompts: list, sampling: Sampling):
        start, stop = chunk
        engine = self._engines[self._lost.get(k, k)]  # a lost engine's chunk goes to the engine serving its slot
        return engine.generate.remote(prompts[start:stop], chunk_sampling(sampling, start))

    # -- node loss ----------------------------------------------------------
    def _members(self) -> list[int]:
        """The engines that serve (every slot whose node was not lost)."""
        return [i for i in range(len(self._engines)) if i not in self._lost]

    def _recover(self, index: int) -> None:
        """After engine ``index``'s actor died: a fresh engine in its bundle; or, when its node is gone and
        another engine's node is alive, its slot (and any slot it served) handed to that survivor, which holds
        the current weights already. Restarting in the bundle would wait for Ray to find the bundle a new node."""
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        survivors = [i for i in self._members() if i != index and self.node_ids[i] in alive]
        if self.node_ids[index] in alive or not survivors:
            self._restart(index)
            return
        for slot in [index, *(s for s, serving in self._lost.items() if serving == index)]:
            self._lost[slot] = survivors[slot % len(survivors)]
            self.reissued[slot] += 1
        self._group = None  # the broadcast group had the lost engine in it
        ray.kill(self._engines[index], no_restart=True)
        logger.warning(
            "rollout engine %d: node %s is gone, engine %d serves it", index, self.node_ids[index], self._lost[index]
        )

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, object]],
        bucket_bytes: int | None = None,
        probe: tuple[Sequence[Conversation], Callable[[list[Completion]], list[list[float]]]] | None = None,
    ) -> dict:
        """Stream new policy weights to every engine; returns sync statistics (also logged).

        ``probe = (conversations, trainer_logprobs)``: after the sync the pool answers the
        conversations greedily and ``stats["logprob_gap"]`` is :func:`logprob_gap` between
        ``trainer_logprobs(completions)`` (the trainer's forward over the same tokens, e.g.
        :func:`~eqrlhf.rollout.weight_sync.completion_logprobs`) and the engines' log-probs:
        near 0 when the engines hold exactly the trainer's weights.
        """
        r = self.cfg.rollout
        bucket_bytes = bucket_bytes or int(r.sync_bucket_mb * 2**20)
        method = r.sync_method
        started = time.perf_counter()
        group = self._weight_group() if method == "broadcast" else None
        members = {i: self._engines[i] for i in self._members()}
        refs, calls, nbytes, tensors = [], {i: [] for i in members}, 0, 0
        in_flight = collections.deque()  # cuda_ipc: (buffer, load calls) of buckets engines may still read
        try:
            for bucket in bucket_named_tensors(named_tensors, bucket_bytes):
                if method == "object_store":
                    packed = pack_bucket(bucket)
                    entries = packed_entries(packed)
                else:
                    buffer, layout = flatten_bucket(bucket)
                    entries = layout_entries(layout)
                if self._shapes is not None:
                    check_bucket(entries, self._shapes, self.model_name)
                if not refs:
                    for i, engine in members.items():
                        calls[i].append(engine.begin_weight_update.remote())
                nbytes, tensors = nbytes + sum(entry[3] for entry in entries), tensors + len(entries)
                if method == "object_store":
                    refs.append(ray.put(packed))
                    loads = [engine.load_weight_bucket.remote(refs[-1]) for engine in members.values()]
                elif method == "cuda_ipc":
                    handle = share_cuda_buffer(buffer, layout)
                    loads = [engine.load_cuda_bucket.remote(handle) for engine in members.values()]
                    in_flight.append((buffer, loads))
                    self._retire_buckets(in_flight, started)
                else:
                    loads = [engine.receive_weight_bucket.remote(layout, buffer.numel()) for engine in members.values()]
                    broadcast_bucket(group, buffer)  # returns once every engine has it (fails after the timeout)
                if method != "object_store":
                    refs.append(host_copy(buffer, layout))  # for engines restarted later; overlaps the engines' copies
                for i, load in zip(members, loads):
                    calls[i].append(load)
        except Exception:
            if refs:  # engines hold a half-applied update: put them back on the previous weights
                self._restart_all()
            raise
        if not refs:
            raise ValueError("update_weights: no tensors given")
        for i, engine in members.items():
            calls[i].append(engine.finish_weight_update.remote())
        previous, self._weight_refs = self._weight_refs, refs
        self._await_sync(calls, previous, started)
        if method == "cuda_ipc":
            in_flight.clear()
            torch.cuda.ipc_collect()  # the engines let go of every buffer: free them now
        seconds = time.perf_counter() - started
        stats = {"sync_seconds": seconds, "bytes": nbytes, "tensors": tensors, "buckets": len(refs)}
        if probe is not None:
            conversations, trainer_logprobs = probe
            completions = self.generate(conversations, Sampling(max_new_tokens=PROBE_TOKENS))
            stats["logprob_gap"] = logprob_gap(trainer_logprobs(completions), [c.logprobs for c in completions])
        logger.info(
            "weight sync: %d tensors, %.1f MB in %d bucket(s) to %d engine(s) in %.2f s, log-prob gap %s",
            tensors, nbytes / 2**20, len(refs), len(members), seconds, stats.get("logprob_gap", "not probed"),
        )  # fmt: skip
        return stats

    def _weight_group(self):
        """This process's member of the broadcast group of every engine, built on first use and after a restart."""
        if self._group is None:
            r = self.cfg.rollout
            backend, host, port = weight_group_backend(self.cfg), ray.util.get_node_ip_address(), free_port()
            ranks = r.tensor_parallel_size if self.cfg.generation.engine == "vllm" else 1  # group members per engine
            members = [self._engines[i] for i in self._members()]
            world = 1 + ranks * len(members)
            joins = [
                engine.join_weight_group.remote(backend, host, port, 1 + i * ranks, world, r.sync_timeout_s)
                for i, engine in enumerate(members)
            ]
            member = join_weight_group(backend, host, port, 0, world, r.sync_timeout_s)
            ray.get(joins, timeout=r.sync_timeout_s)
            self._group = member
        return self._group

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_group"] = None  # process-local; another process's copy builds its own group on first use
        return state

    def _retire_buckets(self, in_flight: collections.deque, started: float) -> None:
        """Drop the oldest CUDA bucket buffers once every engine has copied them (bounds the trainer's memory).

        An engine that does not finish in time leaves its buffer alive: ``_await_sync`` then reports it.
        """
        while len(in_flight) > IPC_BUCKETS_IN_FLIGHT:
            loads = in_flight[0][1]
            remaining = max(0.0, started + self.cfg.rollout.sync_timeout_s - time.perf_counter())
            done, _ = ray.wait(loads, num_returns=len(loads), timeout=remaining)
            if len(done) < len(loads):
                return
            in_flight.popleft()

    def _await_sync(self, calls: dict[int, list], previous: list, started: float) -> None:
        r = self.cfg.rollout
        everything = [ref for refs in calls.values() for ref in refs]
        remaining = max(0.0, started + r.sync_timeout_s - time.perf_counter())
        _, late = ray.wait(everything, num_returns=len(everything), timeout=remaining)
        late = set(late)
        stuck = [i for i, refs in calls.items() if late & set(refs)]
        for i in stuck:  # a hung engine is replaced on its next use, with the new weights
            ray.kill(self._engines[i], no_restart=True)
        if stuck:
            raise TimeoutError(
                f"weight sync to engine(s) {stuck} did not finish within rollout.sync_timeout_s={r.sync_timeout_s} s; "
                "they were stopped and will restart with the new weights"
            )
        for i, refs in calls.items():
            try:
                ray.get(refs)
            except RayActorError:  # died during the sync: a fresh engine (or a survivor) has the new weights
                self._recover(i)
            except Exception:  # an engine refused the update: every engine back to the previous weights
                self._weight_refs = previous
                self._restart_all()
                raise

    def _restart_all(self) -> None:
        for i in self._members():
            self._restart(i)

    def health(self) -> list[dict]:
        members = self._members()
        states = ray.get([self._engines[i].health.remote() for i in members])
        return [{**state, "slot": i, "restarts": self.restarts[i]} for i, state in zip(members, states)]

    def shutdown(self) -> None:
        for engine in self._engines:
            ray.kill(engine, no_restart=True)
        self._engines = []
        remove_placement_group(self._pg)

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
