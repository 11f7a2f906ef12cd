"""An example Dagster project built on dagster-octoai: copy it and change the prompts.

Load it with ``dagster dev -m example_project.definitions``.
"""
