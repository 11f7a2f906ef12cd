"""The example's YAML-defined definitions (Dagster Components), loaded by ``definitions.py``."""
