"""``full``: the plain table, one row per id in [0, num_ids) (the baseline)."""
from __future__ import annotations

import torch

from rectables.registry import register
from rectables.table import Table, check_range


@register
class FullTable(Table):
    """Plain embedding table [num_ids, D]; id x reads row x.

    Ids outside [0, num_ids) raise ``ValueError`` naming the feature.
    """

    method = "full"
    size_arg = "num_ids"
    raw_ids = False
    passthrough = True
    no_budget = "is the uncompressed baseline"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_ids: int,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        if num_ids <= 0:
            raise ValueError(f"table {name!r}: num_ids must be > 0, got {num_ids}")
        self.num_ids = int(num_ids)

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        return cls(name, embedding_dim, feature_names, num_ids)  # the baseline: always full

    def physical_shapes(self) -> list[tuple[int, int]]:
        return [(self.num_ids, self.embedding_dim)]

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        check_range(self, values, counts, self.num_ids)
        return self.per_feature(values.unsqueeze(0), counts)
