"""``hash`` (the hashing trick) and ``multihash`` (k hashes per id).

Hashing trick: Weinberger et al., "Feature Hashing for Large Scale Multitask Learning",
ICML 2009.  Multiple hashes per id: Svenstrup et al., "Hash Embeddings for Efficient
Word Representations", NeurIPS 2017 (sum of k rows); Zhang et al., "Model Size
Reduction Using Frequency Based Double Hashing for Recommender Systems", RecSys 2020
(concatenation of k chunks).
"""
from __future__ import annotations

import math

import torch

from rectables import hashing
from rectables.presets import rows_for
from rectables.registry import register
from rectables.table import Table


class _Hashed(Table):
    """Shared machinery: one int64 key per (feature, hash), derived from ``seed``."""

    size_arg = "num_buckets"

    def _init_keys(self, seed: int, num_hashes: int) -> None:
        keys = [[hashing.salt_key(seed, f, j) for j in range(num_hashes)] for f in range(len(self.feature_names))]
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("keys", torch.tensor(keys, dtype=torch.int64))  # [F, K]

    def _buckets(self, values: torch.Tensor, counts: list[int], k: int, num_buckets: int) -> torch.Tensor:
        """Ids [N] of the F features -> rows [k, N]: hash j of feature f salted by keys[f, j],
        all k hashes in one call (``mix=False``: id mod num_buckets, k times)."""
        if not self.mix:
            return (values % num_buckets).expand(k, -1)
        keys = self.keys[:, :k].t()  # [k, F]
        if len(counts) == 1:
            keys = keys[:, :1]
        else:
            keys = keys.repeat_interleave(torch.tensor(counts), dim=1, output_size=values.numel())
        return hashing.bucket(values.expand(k, -1), keys, num_buckets)


@register
class HashTable(_Hashed):
    """Hashing trick: id x of feature f reads row bucket(x, key_f, M) of an [M, D] table.

    ``shared=True``: all F features read one table; ``False``: one table per feature.
    ``mix=False`` uses x mod M (no mixing): with M >= ids this is exactly ``full``.
    """

    method = "hash"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_buckets: int,
        seed: int = 0,
        shared: bool = True,
        mix: bool = True,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        if num_buckets <= 0:
            raise ValueError(f"table {name!r}: num_buckets must be > 0, got {num_buckets}")
        self.num_buckets = int(num_buckets)
        self.shared = shared
        self.mix = mix
        self._init_keys(seed, 1)

    def physical_shapes(self) -> list[tuple[int, int]]:
        n = 1 if self.shared else len(self.feature_names)
        return [(self.num_buckets, self.embedding_dim)] * n

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        return cls(name, embedding_dim, feature_names, rows_for(num_ids, fraction), seed=seed)

    def feature_lanes(self, f: int) -> list[int]:
        return [0 if self.shared else f]

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        return self.per_feature(self._buckets(values, counts, 1, self.num_buckets), counts)


@register
class MultiHashTable(_Hashed):
    """k seeded hashes of each id into one shared [M, d] table.

    ``combine="sum"``: d = D and the k rows are summed.  ``combine="concat"``:
    d = D / k and row j fills chunk j of the output.  ``mix=False`` with one hash and
    M >= ids is exactly ``full``.
    """

    method = "multihash"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_buckets: int,
        num_hashes: int = 2,
        combine: str = "sum",
        seed: int = 0,
        mix: bool = True,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        if num_buckets <= 0 or num_hashes <= 0:
            raise ValueError(f"table {name!r}: num_buckets and num_hashes must be > 0")
        if combine not in ("sum", "concat"):
            raise ValueError(f"table {name!r}: combine must be 'sum' or 'concat', got {combine!r}")
        if combine == "concat" and embedding_dim % num_hashes:
            raise ValueError(f"table {name!r}: embedding_dim {embedding_dim} not divisible by num_hashes {num_hashes}")
        self.num_buckets = int(num_buckets)
        self.num_hashes = int(num_hashes)
        self.combine = combine
        self.mix = mix
        self._init_keys(seed, num_hashes)

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        """Two hashes summed into a table of ``fraction`` of the rows."""
        return cls(name, embedding_dim, feature_names, rows_for(num_ids, fraction), seed=seed)

    def physical_shapes(self) -> list[tuple[int, int]]:
        d = self.embedding_dim // self.num_hashes if self.combine == "concat" else self.embedding_dim
        return [(self.num_buckets, d)]

    def feature_lanes(self, f: int) -> list[int]:
        return [0] * self.num_hashes

    def init_bound(self, k: int) -> float:
        """A sum of k rows starts with the spread of one row: each row's bound / sqrt(k)
        (with one row's spread per row, the sum of two was sqrt(2) wider, and DeepFM's
        pairwise term over 26 fields, quadratic in it, started at 2.5x hash's)."""
        scale = 1 / math.sqrt(self.num_hashes) if self.combine == "sum" else 1.0
        return scale * super().init_bound(k)

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        return self.per_feature(self._buckets(values, counts, self.num_hashes, self.num_buckets), counts)
