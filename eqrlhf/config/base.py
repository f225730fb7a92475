"""The base of every config section, and the prompt categories."""

from __future__ import annotations

from pydantic import ConfigDict

from eqrlhf.restricted_config import RestrictableSection

CATEGORIES = ("EHD", "IHD", "MHD", "none")


class Section(RestrictableSection):  # a stage gets a copy restricted to its declared keys (eqrlhf.stages)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
