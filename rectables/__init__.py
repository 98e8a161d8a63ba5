"""rectables: memory-efficient embedding tables for recommender systems.

Every method is a remap of ids onto rows of plain physical tables held in one fused
fbgemm TBE, plus a combine step.  ``import rectables`` stays cheap: fbgemm and torchrec
load when a collection is first built or called.
"""
from rectables.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from rectables.compat import from_torchrec
from rectables.memory import dense_parameters, memory_report
from rectables.optim import SparseOptimizer
from rectables.registry import create_table, list_tables, register
from rectables.table import Table

__all__ = [
    "EmbeddingBagCollection",
    "EmbeddingCollection",
    "SparseOptimizer",
    "Table",
    "create_table",
    "dense_parameters",
    "from_torchrec",
    "list_tables",
    "memory_report",
    "register",
]
__version__ = "0.1.0"
