"""The pytest plugin registered by the ``pytest11`` entry point (fixtures for users' tests)."""
