"""rectables: memory-efficient embedding tables for recommender systems.

Every method is a remap of ids onto rows of plain physical tables held in one fused
fbgemm TBE, plus a combine step.  ``import rectables`` stays cheap: fbgemm and torchrec
load when a collection is first built or called.
"""
import logging as _logging


class _DropFxTracingNotice(_logging.Filter):
    """torchrec's KJT calls torch.fx's ``is_fx_tracing``, which logs a deprecation notice
    meant for torchrec's authors on the first forward of every process; users of
    rectables cannot act on it, so it does not reach their console (other messages do)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


_logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropFxTracingNotice())

from rectables.embedding_modules import EmbeddingBagCollection, EmbeddingCollection  # noqa: E402
from rectables.compat import from_torchrec
from rectables.memory import dense_parameters, memory_report
from rectables.optim import SparseOptimizer
from rectables.registry import create_table, list_tables, register
from rectables.table import Table
from rectables.methods.full import FullTable  # noqa: E402,I001  (importing a method registers it)
from rectables.methods.hashed import HashTable, MultiHashTable  # noqa: E402
from rectables.methods.unified import UnifiedTable  # noqa: E402
from rectables.methods.compositional import CompositionalTable  # noqa: E402
from rectables.methods.dynamic import DynamicTable  # noqa: E402
from rectables.methods.optembed import OptEmbedTable  # noqa: E402
from rectables.methods.compact import CompactTable  # noqa: E402

__all__ = [
    "CompactTable",
    "CompositionalTable",
    "DynamicTable",
    "FullTable",
    "HashTable",
    "MultiHashTable",
    "OptEmbedTable",
    "UnifiedTable",
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
