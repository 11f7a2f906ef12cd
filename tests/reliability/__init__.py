"""Reliability and security suite (issue 9): faults, restarts, bad input, secrets, Postgres."""

import pytest

# The shared checks in _support assert; pytest explains their failures as it does a test's own.
pytest.register_assert_rewrite(f"{__name__}._support")
