"""Registry of table methods: ``list_tables()`` and ``create_table(name, ...)``."""
from __future__ import annotations

from typing import TypeVar

from rectables.table import Table

_TABLES: dict[str, type[Table]] = {}
T = TypeVar("T", bound=type[Table])


def register(cls: T) -> T:
    """Class decorator: make ``cls`` available as ``create_table(cls.method, ...)``."""
    if not cls.method or cls.method in _TABLES:
        raise ValueError(f"method name {cls.method!r} is empty or taken")
    _TABLES[cls.method] = cls
    return cls


def _load() -> None:
    import rectables.methods  # noqa: F401  (registers the built-in methods)


def list_tables() -> list[str]:
    """Names of every registered method, in registration order."""
    _load()
    return list(_TABLES)


def table_class(name: str) -> type[Table]:
    _load()
    if name not in _TABLES:
        raise ValueError(f"unknown table method {name!r}; registered: {list(_TABLES)}")
    return _TABLES[name]


def create_table(method: str, /, **kwargs) -> Table:
    """Build a table of ``method``; kwargs are that method's typed arguments."""
    return table_class(method)(**kwargs)

