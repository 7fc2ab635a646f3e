"""Hypothesis settings profiles, chosen by NPLLAMA_HYPOTHESIS_PROFILE (default: ci).

ci        few examples per property: the whole suite stays well under 10 minutes on 2 cores
thorough  many examples; for a release or after touching an op
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("NPLLAMA_HYPOTHESIS_PROFILE", "ci"))
