"""Hypothesis profiles for the fuzz targets.

``ci`` (the default): a bounded, derandomized run, the same inputs every time, so a red
run is reproducible. ``fuzz`` (``make fuzz``): many more random inputs. An input that
ever failed is kept as an ``@example`` on its target: the committed seed corpus.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("MESHWARD_FUZZ_PROFILE", "ci"))
