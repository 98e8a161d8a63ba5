"""Built-in methods; importing this module registers them (one import per method).

Order matters: it is the order of ``list_tables()``, baseline first.
"""
from rectables.methods import full  # noqa: F401, I001
from rectables.methods import hashed  # noqa: F401
from rectables.methods import unified  # noqa: F401
from rectables.methods import compositional  # noqa: F401
from rectables.methods import dynamic  # noqa: F401
from rectables.methods import optembed  # noqa: F401
from rectables.methods import compact  # noqa: F401
