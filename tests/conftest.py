"""Hypothesis runs the same examples on every run (CI must not change its verdict by chance)."""
from hypothesis import settings

settings.register_profile("rectables", derandomize=True, print_blob=True)
settings.load_profile("rectables")
settings.register_profile("stress", max_examples=1000)  # pytest --hypothesis-profile=stress
