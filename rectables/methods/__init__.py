"""Built-in methods; importing this module registers them (one import per method)."""
from rectables.methods import full, hashed  # noqa: F401
