"""Allows `python -m agent`, the same as the `ambient-agent` console script."""

from __future__ import annotations

import sys

from agent.cli import main

sys.exit(main())
