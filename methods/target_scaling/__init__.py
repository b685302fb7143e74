"""Target-scaling stages: what is done to a batch's v* before the solver spreads it over the layers (NAS).
methods/stages.py registers them (``target_scaling: nas`` in a preset)."""
