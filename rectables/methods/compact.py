"""``compact``: kept rows only, each feature at its own dim, and an id remap: the table
OptEmbed exports (Lyu et al., CIKM 2022), a plain method like any other.

Feature f holds ``rows[f]`` kept rows of ``dims[f]`` values plus one **zero row**;
``remap`` [F, n] (int32) sends each id in [0, n) to its kept row or to the zero row (a
pruned id).  A row of zeros reads as zeros and takes no gradient, so the zero row stays
zero if the table is trained further.  With ``pad`` every feature reads D values (its
dims[f], then zeros), for models that need equal dims (DLRM, DeepFM); without, d_f.

``for_budget`` keeps every id at the dim that fits the budget (a narrower plain table,
zero-padded).  Shapes: F features, N ids, D dim, M_f = rows[f] + 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

from rectables.registry import register
from rectables.table import Table, check_range


def zero_rows_frozen(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` [N, W] with rows of all zeros cut from the graph (they read zeros and
    take no gradient): how pruned ids share one zero row that training never moves."""
    return vectors * (vectors.abs().sum(1, keepdim=True) != 0).to(vectors.dtype)


@register
class CompactTable(Table):
    """Kept rows per feature at per-feature dims, remapped from ids in [0, num_ids)."""

    method = "compact"
    size_arg = "num_ids"
    raw_ids = False

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_ids: int,
        rows: list[int] | None = None,
        dims: list[int] | None = None,
        pad: bool = True,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        F = len(feature_names)
        self.num_ids, self.pad = int(num_ids), bool(pad)
        self.rows = [int(r) for r in rows] if rows is not None else [self.num_ids] * F
        self.dims = [int(d) for d in dims] if dims is not None else [embedding_dim] * F
        if self.num_ids <= 0 or len(self.rows) != F or len(self.dims) != F:
            raise ValueError(f"table {name!r}: need num_ids > 0 and one rows and dims entry per feature; "
                             f"got {num_ids}, {rows}, {dims}")
        if any(not 0 <= r <= self.num_ids for r in self.rows) or any(not 1 <= d <= embedding_dim for d in self.dims):
            raise ValueError(f"table {name!r}: rows must lie in [0, {self.num_ids}] and dims in [1, {embedding_dim}]; "
                             f"got {self.rows}, {self.dims}")
        first = torch.arange(self.num_ids, dtype=torch.int32)  # the first rows[f] ids kept, until set_remap
        self.register_buffer("id_rows", torch.stack([torch.where(first < r, first, r) for r in self.rows]))

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        dim = max(1, min(embedding_dim, round(embedding_dim * fraction)))
        return cls(name, embedding_dim, feature_names, num_ids, dims=[dim] * len(feature_names))

    def physical_shapes(self) -> list[tuple[int, int]]:
        return [(r + 1, d) for r, d in zip(self.rows, self.dims)]

    def feature_lanes(self, f: int) -> list[int]:
        return [f]

    def feature_dims(self) -> list[int]:
        return [self.embedding_dim] * len(self.dims) if self.pad else list(self.dims)

    def init_weight_(self, k: int, weight: torch.Tensor) -> None:
        super().init_weight_(k, weight)
        weight[self.rows[k]].zero_()

    @torch.no_grad()
    def set_remap(self, kept: list[torch.Tensor]) -> None:
        """Feature f's kept ids ``kept[f]`` [rows[f]] (ascending) read rows 0, 1, ...; the
        others the zero row."""
        for f, k in enumerate(kept):
            if len(k) != self.rows[f]:
                raise ValueError(f"table {self.name!r}: feature {self.feature_names[f]!r} keeps {self.rows[f]} rows, "
                                 f"got {len(k)} ids")
            self.id_rows[f].fill_(self.rows[f])
            self.id_rows[f, k] = torch.arange(len(k), dtype=torch.int32)

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        check_range(self, values, counts, self.num_ids)
        if len(counts) == 1:
            return [self.id_rows[0][values].long().unsqueeze(0)]
        f = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts), output_size=values.numel())
        return self.per_feature(self.id_rows.view(-1)[f * self.num_ids + values].long().unsqueeze(0), counts)

    def transform(self, f: int, vectors: torch.Tensor, bags: torch.Tensor, batch: int) -> torch.Tensor:
        out = zero_rows_frozen(vectors)
        return F_.pad(out, (0, self.embedding_dim - self.dims[f])) if self.pad else out

    @classmethod
    def transform_many(cls, items, vectors, widths, bags, batch):
        """Features of one dim d and one padded dim D at once, as [N, F, d]."""
        D, pad = items[0][0].embedding_dim, items[0][0].pad
        if len(set(widths)) > 1 or any(t.embedding_dim != D or t.pad != pad for t, _ in items):
            return super().transform_many(items, vectors, widths, bags, batch)
        v = zero_rows_frozen(vectors.view(-1, widths[0])).view(vectors.shape[0], len(items), widths[0])
        return (F_.pad(v, (0, D - widths[0])) if pad else v).reshape(vectors.shape[0], -1)
