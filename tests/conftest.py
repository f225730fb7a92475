"""Shared fixtures: where the public datasets are, and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub during tests

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("EQRLHF_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (a second end-to-end run of a stage CI already covers) run only with
    EQRLHF_SLOW=1, which keeps CI on 2 cores within its time budget."""
    if os.environ.get("EQRLHF_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set EQRLHF_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data (or $EQRLHF_DATA); skips the test when it is not there."""
    if not (DATA_ROOT / "SOURCES.md").is_file():
        pytest.skip(f"shared datasets not found at {DATA_ROOT}: set EQRLHF_DATA to run this test")
    return DATA_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the whole test session (starting one costs seconds)."""
    import ray

    from eqrlhf.ray_utils import init_ray

    init_ray()
    yield ray
    ray.shutdown()
