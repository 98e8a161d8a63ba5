"""``unified``: Unified Embedding, feature multiplexing (Coleman et al., "Unified
Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems", NeurIPS 2023).

T shared physical tables of ``buckets_per_table`` rows and ``dim_per_table`` = c columns
serve every feature of the table.  Feature f declares k_f chunks; chunk j hashes the raw
id with a salt made of (f's index, j) into [0, buckets) and reads table (counter mod T),
the counter running over the chunks of all features in order.  The k_f rows are
concatenated, so feature f's output dim is k_f * c.  T = 1 is single-table multiplexing.
"""
from __future__ import annotations

import math

import torch

from rectables.methods.hashed import _Hashed
from rectables.registry import register


@register
class UnifiedTable(_Hashed):
    """Feature multiplexing into T shared [buckets_per_table, c] tables.

    ``num_chunks``: one k for all features, or a list with k_f per feature.
    ``dim_per_table``: c; by default ``embedding_dim // k`` (one k for all features).
    ``mix=False`` uses id mod buckets: with one feature, one chunk and buckets >= ids
    this is exactly ``full``.
    """

    method = "unified"
    size_arg = "buckets_per_table"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        buckets_per_table: int,
        num_tables: int = 1,
        num_chunks: int | list[int] = 1,
        dim_per_table: int | None = None,
        seed: int = 0,
        mix: bool = True,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        chunks = [num_chunks] * len(feature_names) if isinstance(num_chunks, int) else list(num_chunks)
        if len(chunks) != len(feature_names) or min(chunks) < 1:
            raise ValueError(f"table {name!r}: num_chunks needs one k >= 1 per feature, got {num_chunks}")
        if dim_per_table is None:
            if len(set(chunks)) > 1 or embedding_dim % chunks[0]:
                raise ValueError(f"table {name!r}: give dim_per_table, or one k dividing embedding_dim")
            dim_per_table = embedding_dim // chunks[0]
        if buckets_per_table <= 0 or num_tables <= 0:
            raise ValueError(f"table {name!r}: buckets_per_table and num_tables must be > 0")
        self.buckets_per_table, self.num_tables, self.num_chunks = int(buckets_per_table), int(num_tables), chunks
        self.dim_per_table, self.mix = int(dim_per_table), mix
        starts = [sum(chunks[:f]) for f in range(len(chunks))]
        self._lanes = [[(s + j) % self.num_tables for j in range(k)] for s, k in zip(starts, chunks)]
        self._init_keys(seed, max(chunks))  # keys [F, max k]: salt (f, j)

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        return cls.for_budget_all(embedding_dim, feature_names, [num_ids] * len(feature_names), fraction, seed, name)[0]

    @classmethod
    def for_budget_all(cls, embedding_dim, feature_names, num_ids, fraction, seed=0, name="unified"):
        """One shared table for all features: k = 2 chunks of c = D/2 (k = 1 if D/2 is not
        a multiple of 4), T = 1, and buckets so that T * buckets * c = fraction * sum(n) * D."""
        k = 2 if (embedding_dim // 2) % 4 == 0 and embedding_dim % 2 == 0 else 1
        c = embedding_dim // k
        buckets = max(16, math.ceil(fraction * sum(num_ids) * embedding_dim / c))
        return [cls(name, embedding_dim, list(feature_names), buckets, num_tables=1, num_chunks=k, seed=seed)]

    def physical_shapes(self) -> list[tuple[int, int]]:
        return [(self.buckets_per_table, self.dim_per_table)] * self.num_tables

    def feature_lanes(self, f: int) -> list[int]:
        return self._lanes[f]

    def feature_dims(self) -> list[int]:
        return [k * self.dim_per_table for k in self.num_chunks]

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        rows = self._buckets(values, counts, max(self.num_chunks), self.buckets_per_table)  # [max k, N]
        return [r[:k] for r, k in zip(self.per_feature(rows, counts), self.num_chunks)]


def unified_for_bytes(
    budget_bytes: int, embedding_dim: int, feature_names: list[str], num_tables: int = 1,
    num_chunks: int = 2, bytes_per_value: int = 4, seed: int = 0,
) -> UnifiedTable:
    """The largest ``unified`` table for all features whose weights fit in ``budget_bytes``."""
    c = embedding_dim // num_chunks
    buckets = budget_bytes // (num_tables * c * bytes_per_value)
    if buckets < 1:
        raise ValueError(f"{budget_bytes} bytes cannot hold {num_tables} tables of one row of dim {c}")
    return UnifiedTable("unified", embedding_dim, feature_names, buckets, num_tables, num_chunks, seed=seed)
