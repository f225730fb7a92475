"""The base of every config section, and the prompt categories."""

from __future__ import annotations

from pydantic import ConfigDict

from eqrlhf.restricted_config import RestrictableSection

CATEGORIES = ("EHD", "IHD", "MHD", "none")

# Ray's own resource names: CPUs, GPUs and memory have their own keys (cpus_per_worker, gpus_per_engine, ...),
# so a custom-resource map naming one would ask for them twice
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """A map of custom Ray resources (node labels such as ``{trainer_node: 1}``): no built-in names, no blanks."""
    for name in resources:
        if name in RAY_BUILTIN_RESOURCES or not name.strip():
            raise ValueError(
                f"{name!r} is not a custom resource (CPUs, GPUs and memory have their own keys); "
                "name a resource the nodes were started with, e.g. ray start --resources='{\"trainer_node\": 8}'"
            )
    return resources


class Section(RestrictableSection):  # a stage gets a copy restricted to its declared keys (eqrlhf.stages)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
