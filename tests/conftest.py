"""Test-suite settings: strict passes, and hypothesis runs that are the same on every machine."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# A pass whose check raises is a bug: make it fail the test instead of becoming a decline.
# Set in the environment, so the CLI run in a subprocess is strict too.
os.environ["GRAPHFOLD_STRICT"] = "1"

# Derandomized: CI and every developer see the same examples; no example database on disk.
settings.register_profile("graphfold", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "graphfold"))
