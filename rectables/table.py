"""The table contract: a remap of ids onto rows of plain physical tables + a combine.

A :class:`Table` owns no weights.  It says which physical tables it needs
(``physical_shapes``), which physical table each of the K_f lanes of feature f reads
(``feature_lanes``), how ids become rows (``remap``), and how the lanes become one
vector per id (``combine``: ``"concat"``, ``"sum"`` or ``"mult"``).  Linear combines
let the fused storage pool; ``"mult"`` needs per-id rows, then a sum per bag.  A method
may also change each id's vector after the combine (``transform``: masks, padding); its
features are then read one row per id too.

Shapes: F features served by the table, B batch, N ids of those features (N_f of
feature f), K_f lanes of feature f, D output dim, M rows of a physical table.
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
from torch import nn

POOLINGS = ("sum", "mean")


def check_range(table: "Table", values: torch.Tensor, counts: list[int], n: int) -> None:
    """Raise ValueError naming the feature if an id [N] lies outside [0, n)."""
    if not values.numel():
        return
    lo, hi = torch.aminmax(values)
    if lo >= 0 and hi < n:
        return
    for name, ids in zip(table.feature_names, values.split(counts)):
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.numel():
            raise ValueError(
                f"feature {name!r} (table {table.name!r}): id {int(bad[0])} is outside [0, {n}); "
                f"{bad.numel()} such ids in this batch"
            )


class Table(nn.Module, abc.ABC):
    """Base of every method.  Subclasses set ``method`` and implement the remap.

    State a method needs to resume (seeds, salts, maps, counters) lives in buffers.
    """

    method: ClassVar[str] = ""
    #: argument filled by torchrec's ``num_embeddings`` when built from a config
    size_arg: ClassVar[str] = ""
    #: True if ids are raw 64-bit values (hashed); False if they must be in [0, n)
    raw_ids: ClassVar[bool] = True
    #: True if ``remap`` only checks ids lie in [0, rows of physical table 0) and returns them (K = 1)
    passthrough: ClassVar[bool] = False
    #: why the method takes no byte budget ("" if it does): runs refuse one other than 1
    no_budget: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        pooling: str = "sum",
    ) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"table {name!r}: embedding_dim must be > 0, got {embedding_dim}")
        if not feature_names:
            raise ValueError(f"table {name!r}: needs at least one feature name")
        if pooling not in POOLINGS:
            raise ValueError(f"table {name!r}: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = name
        self.embedding_dim = int(embedding_dim)
        self.feature_names = list(feature_names)
        self.pooling = pooling
        self.combine = "concat"
        #: storage precision of the physical rows (torch.float32 or torch.float16)
        self.dtype = torch.float32
        #: if set, called on each physical table [M_k, D_k] instead of the method's own init
        #: (torchrec's ``init_fn``; rectables applies it to every physical table)
        self.init_fn = None
        #: if True, the collection first draws N(0, 1) numbers for the table, as torchrec's
        #: nn.EmbeddingBag does before its init_fn, so a seed gives torchrec's exact rows
        self.torchrec_draws = False
        #: the torchrec config the table was built from, if any
        self.config = None
        self._reset = None  # set by the collection that stores the rows: (k, rows) -> None
        #: learning rates of the table's own dense parameters (e.g. thresholds), by
        #: parameter name; the others train at the dense optimizer's rate
        self.param_lrs: dict[str, float] = {}

    # ---- what a method declares -----------------------------------------------------
    @abc.abstractmethod
    def physical_shapes(self) -> list[tuple[int, int]]:
        """(M, dim) of each physical table this table needs."""

    def feature_lanes(self, f: int) -> list[int]:
        """Physical table read by each of the K_f lanes of the table's f-th feature."""
        return [0]

    def feature_dims(self) -> list[int]:
        """Output dim of each feature (D unless a method says otherwise)."""
        return [self.embedding_dim] * len(self.feature_names)

    @abc.abstractmethod
    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Ids [N] of the F features (``counts[f]`` ids each, in order) -> rows [K_f, N_f] per feature."""

    @classmethod
    def remap_many(cls, tables: list["Table"], values: list[torch.Tensor],
                   counts: list[list[int]]) -> list[list[torch.Tensor]]:
        """:meth:`remap` of several tables of this class in one call (the collection's
        tables of one class, in order): ``values[t]`` the ids [N_t] of table t's features,
        ``counts[t]`` its ids per feature -> table t's rows [K_f, N_f] per feature.  Each
        table alone unless a method does better (one native call that spreads the tables
        over threads); the rows must be those of one table at a time."""
        return [t.remap(v, c) for t, v, c in zip(tables, values, counts)]

    def transform(self, f: int, vectors: torch.Tensor, bags: torch.Tensor, batch: int) -> torch.Tensor:
        """Each id's vector after the lookup: ``vectors`` [N_f, W_f] (the f-th feature's
        combined lanes) -> [N_f, feature_dims()[f]]; ``bags`` [N_f] the sample each id
        belongs to, in [0, ``batch``).  A method that overrides it (a mask, a padding) is
        looked up one row per id (bags holding one id each are read as they are), so it may
        be non-linear; it must map an all-zero row to zeros (an empty bag reads one)."""
        return vectors

    @classmethod
    def transform_many(cls, items: list[tuple["Table", int]], vectors: torch.Tensor, widths: list[int],
                       bags: torch.Tensor, batch: int) -> torch.Tensor:
        """:meth:`transform` of several features at once, (table, feature) ``items`` of
        tables of this class whose ids share ``bags`` [N] (bags of one id): ``vectors`` [N,
        sum of ``widths``] -> [N, sum D].  Each feature alone unless a method does better
        (one op over all its features instead of one per feature)."""
        blocks = vectors.split(widths, dim=1)
        return torch.cat([t.transform(f, b, bags, batch) for (t, f), b in zip(items, blocks)], dim=1)

    @property
    def transforms(self) -> bool:
        """True if the method overrides :meth:`transform`."""
        return type(self).transform is not Table.transform

    @staticmethod
    def per_feature(rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Rows [K, N] of all features -> views [K, N_f] per feature."""
        return [rows] if len(counts) == 1 else list(rows.split(counts, dim=1))

    @classmethod
    def for_budget(
        cls, name: str, embedding_dim: int, feature_names: list[str], num_ids: int, fraction: float, seed: int = 0
    ) -> "Table":
        """A table for ``num_ids`` ids whose weights are about ``fraction`` of ``full``'s."""
        raise TypeError(f"method {cls.method!r} does not size itself for a budget")

    @classmethod
    def for_budget_all(
        cls, embedding_dim: int, feature_names: list[str], num_ids: list[int], fraction: float, seed: int = 0
    ) -> list["Table"]:
        """Tables for several features at ``fraction`` of ``full``'s bytes (one per feature by default)."""
        return [cls.for_budget(f"t_{f}", embedding_dim, [f], n, fraction, seed=seed + i)
                for i, (f, n) in enumerate(zip(feature_names, num_ids))]

    def init_bound(self, k: int) -> float:
        """Physical table k starts U(-bound, bound); torchrec's default sqrt(1/M)."""
        return math.sqrt(1.0 / self.physical_shapes()[k][0])

    def init_weight_(self, k: int, weight: torch.Tensor) -> None:
        """Fill physical table k (``weight`` [M_k, D_k], a view into the fused storage)."""
        weight.uniform_(-self.init_bound(k), self.init_bound(k))

    def init_rows_(self, k: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Fill ``out`` [R, D_k] with fresh values for rows [R] of physical table k, as the
        table's init would (``init_fn`` if set)."""
        if self.init_fn is not None:
            self.init_fn(out)
        else:
            out.uniform_(-self.init_bound(k), self.init_bound(k))

    # ---- what a method may ask of its collection ---------------------------------------
    def reset_rows(self, k: int, rows: torch.Tensor, seed: int | None = None) -> None:
        """Re-initialise rows [R] of physical table k and zero their optimizer state, before
        the next lookup reads them (a dynamic table giving an evicted row to a new id, a
        pruned row coming back).  The fresh values are drawn as :meth:`init_rows_` draws
        them, from the global generator, or with ``seed`` from a generator seeded with it
        (leaving the global one as it was), so a resumed run draws the same values.
        Works once the table is in a collection."""
        if self._reset is None:
            raise RuntimeError(f"table {self.name!r} is in no collection: it has no rows to reset")
        self._reset(k, rows, seed)

    def settings(self) -> dict:
        """The method's own constructor arguments (sizes, counts, policies) as the table
        holds them: what a comparison reports next to each row."""
        import inspect

        skip = {"self", "name", "embedding_dim", "feature_names", "pooling", "seed"}
        out = {}
        for p in inspect.signature(type(self).__init__).parameters:
            v = getattr(self, p, None)
            if p not in skip and isinstance(v, (int, float, str, bool, list, tuple)):
                out[p] = list(v) if isinstance(v, tuple) else v
        return out

    # ---- hooks the training loop calls -----------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        return None

    def on_step_end(self, step: int) -> None:
        return None

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, dim={self.embedding_dim}, features={self.feature_names}, "
            f"pooling={self.pooling!r}, physical={self.physical_shapes()}"
        )
