"""Hypothesis settings profiles, chosen by NPLLAMA_HYPOTHESIS_PROFILE (default: ci).

ci        few examples per property: the whole suite stays well under 10 minutes on 2 cores
thorough  many examples; for a release or after touching an op
mutation  ci's examples without shrinking: scripts/mutation_check.py only needs to know that a
          planted bug fails a test, not its smallest example (shrinking a gradient check takes minutes)
"""

import os

from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "mutation", max_examples=12, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile(os.environ.get("NPLLAMA_HYPOTHESIS_PROFILE", "ci"))
