"""Operators a stretch of PyTorch code dispatches, and the host syncs among them, by phase.

Device-independent: the same Python dispatches the same operators on CPU and GPU, so a CPU-only machine
shows what a GPU step would launch. Every non-view operator is one or more kernel launches on a GPU, and
every sync (``.item()``, ``bool(tensor)``, ``float(tensor)``) holds the host until the device has drained its
queue; on a small model, where the GPU outruns the host, these counts set the step time. Compiled regions
run eagerly under the counting mode, so the counts are those of the eager step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter(phase_of) as counter: ...`` counts every operator under the phase ``phase_of()`` names."""

    def __init__(self, phase_of: Callable[[], str] = lambda: "all"):
        super().__init__()
        self.phase_of = phase_of
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        phase = self.phase_of()
        if name == "_local_scalar_dense":  # what .item(), bool() and float() on a tensor come down to
            self.syncs[phase] += 1
        elif not func.is_view and "empty" not in name:  # views and allocations launch nothing
            self.ops[phase] += 1
            self.names[(phase, name)] += 1
        return func(*args, **(kwargs or {}))

    def lines(self, phases: tuple[str, ...] = ("all",)) -> list[str]:
        """One line per phase: operators, syncs and the most frequent operators."""
        out = []
        for phase in phases:
            top = ", ".join(f"{name} {n}" for (where, name), n in self.names.most_common() if where == phase)
            out.append(f"{phase}: {self.ops[phase]} operators, {self.syncs[phase]} host syncs ({top[:90]}...)")
        return out
