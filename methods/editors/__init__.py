"""Editors that are not locate-then-edit compositions: UltraEdit (weights, one closed-form step per batch) and
GRACE (a codebook wrapped around one layer). methods/stages.py registers them as editor kinds."""
