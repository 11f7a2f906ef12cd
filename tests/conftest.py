"""Suite-wide set-up: a throwaway Dagster home with telemetry off, before Dagster is imported."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="dagster-octoai-home-"))
(_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
os.environ["DAGSTER_HOME"] = str(_home)
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
