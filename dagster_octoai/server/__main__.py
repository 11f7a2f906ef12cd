"""``python -m dagster_octoai.server [options]``: the same as ``dagster-octoai serve``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
