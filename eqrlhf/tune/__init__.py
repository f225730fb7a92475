"""Ray Tune sweeps over data mixture, safety-data scale and AMA settings (`eqrlhf sweep`)."""

from eqrlhf.tune.sweep import run_sweep, validate_sweep

__all__ = ["run_sweep", "validate_sweep"]
