import os

from hypothesis import settings

# Shared 2-core CI machines: bound the example counts; no deadline (timings are noisy).
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("KVBM_HYPOTHESIS_PROFILE", "ci"))
