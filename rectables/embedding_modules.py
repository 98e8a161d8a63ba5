"""The two collections a model uses, with torchrec's names and call shapes.

``EmbeddingBagCollection(KeyedJaggedTensor) -> KeyedTensor`` (pooled, sum or mean) and
``EmbeddingCollection(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` (one row per id),
both over the plan and fused storage of :class:`rectables.collection._Collection`.

Shapes: B batch, F features, N ids, D dim.
"""
from __future__ import annotations

import torch

from rectables.collection import _Collection
from rectables.lanes import combine_lanes, first_rows, starts


class EmbeddingBagCollection(_Collection):
    """Pooled lookup: ``forward(KeyedJaggedTensor [F keys, B bags]) -> KeyedTensor [B, sum D]``."""

    pooled = True

    def __init__(self, tables, optimizer=None, device=None, is_weighted: bool = False) -> None:
        super().__init__(tables, optimizer, device, is_weighted)
        tables = list(self.tables)  # (built from configs, if configs were given)
        self._mean = any(t.pooling == "mean" for t in tables)
        self._is_mean = torch.tensor([t.pooling == "mean" for t in tables for _ in t.feature_names])
        self._dims_t = torch.tensor(self.dims)
        # the storages' outputs hold the features group by group; put back in feature order
        order = [f for fs in self._group_features.values() for f in fs]
        self._interleaved = order != sorted(order)
        self._source = [(g, j) for f in range(len(self.dims)) for g, fs in self._group_features.items()
                        for j, h in enumerate(fs) if h == f]

    def _traceable_forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        from rectables.traceable import lookup

        outs = [out for out, _ in lookup(self, features)]
        return KeyedTensor(keys=self.output_names, length_per_key=self.dims, values=torch.cat(outs, dim=1))

    def embedding_bag_configs(self) -> list:
        """torchrec's ``EmbeddingBagConfig`` of every table (what torchrec's models read)."""
        return self._configs()

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return self._traceable_forward(features)
        if features.values().device.type == "meta" or not self.tables:  # shapes only (as torchrec on meta)
            out = torch.empty(features.stride(), sum(self.dims), device=features.values().device)
        elif torch.compiler.is_compiling():  # one opaque op: no graph break (rectables/compiled.py)
            from rectables.compiled import pooled_lookup

            out = pooled_lookup(self, features)
        else:
            out = self._pooled(features)
        return KeyedTensor(keys=self.output_names, length_per_key=self.dims, values=out)

    def _pooled(self, features) -> torch.Tensor:
        """The eager lookup: [B, sum D], fused update in backward."""
        kjt, outs, counts, rows_as_bags = self._lookup(features)
        B = kjt.stride()
        parts = []
        for g, out in outs.items():
            combined = combine_lanes(out, self._group_combines[g], self._lane_major[g])
            if g == "rows" and not rows_as_bags:
                combined = self._pool_per_id(combined, kjt, counts, B)
            elif g == "rows" and self._transforms:  # bags of at most one id: each bag is its id
                combined = self._transform_bags(combined, B)
            parts.append(combined)
        if self._interleaved:  # one split per group (one copy in backward), one cat
            blocks = {g: p.split([self.dims[f] for f in self._group_features[g]], dim=1) for g, p in zip(outs, parts)}
            parts = [blocks[g][j] for g, j in self._source]
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self._mean:
            out = out * self._mean_scale(kjt.lengths(), B)
        return out

    def _pool_per_id(self, rows: torch.Tensor, kjt, counts: list[int], B: int) -> torch.Tensor:
        """Per-id rows [B', sum W] of the per-id features -> (transformed, weighted) sums per
        bag [B, sum D]."""
        feats, lengths, start = self._group_features["rows"], kjt.lengths(), starts(counts)
        pooled = []
        for f, block in zip(feats, rows.split([self._widths[f] for f in feats], dim=1)):
            bag = torch.repeat_interleave(torch.arange(B), lengths[f * B : (f + 1) * B], output_size=counts[f])
            block = self._transform(f, first_rows(block, counts[f]), bag, B)
            if self._is_weighted:
                block = block * kjt.weights()[start[f] : start[f] + counts[f]].unsqueeze(1)
            pooled.append(block.new_zeros(B, block.shape[1]).index_add_(0, bag, block))
        return torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]

    def _mean_scale(self, lengths: torch.Tensor, B: int) -> torch.Tensor:
        """[B, sum D]: 1/max(L, 1) on columns of mean-pooled features, 1 elsewhere."""
        inv = 1.0 / lengths.view(-1, B).t().clamp(min=1).float()  # [B, F]
        per_feature = torch.where(self._is_mean, inv, torch.ones_like(inv))
        return per_feature.repeat_interleave(self._dims_t, dim=1)


class EmbeddingCollection(_Collection):
    """Unpooled lookup: ``forward(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` of [N_f, D].

    As in torchrec's EmbeddingCollection, all features share one embedding dim.
    """

    pooled = False
    _rows_name = "embeddings"

    def __init__(self, tables, optimizer=None, device=None, need_indices: bool = False) -> None:
        super().__init__(tables, optimizer, device)
        if len(set(self.dims)) > 1:
            raise ValueError("EmbeddingCollection needs one embedding_dim for all tables")
        self._need_indices = bool(need_indices)

    def _traceable_forward(self, features):
        from torchrec.sparse.jagged_tensor import JaggedTensor

        from rectables.traceable import lookup

        return {name: JaggedTensor(values=out, lengths=jt.lengths())
                for name, (out, jt) in zip(self.output_names, lookup(self, features))}

    def embedding_configs(self) -> list:
        """torchrec's ``EmbeddingConfig`` of every table."""
        return self._configs()

    def embedding_dim(self) -> int:
        return self.dims[0]

    def need_indices(self) -> bool:
        """True if each output JaggedTensor carries the ids as its ``weights()`` (torchrec's option)."""
        return self._need_indices

    def embedding_names_by_table(self) -> list[list[str]]:
        it = iter(self.output_names)
        return [[next(it) for _ in t.feature_names] for t in self.tables]

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import JaggedTensor

        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return self._traceable_forward(features)
        if features.values().device.type == "meta":  # shapes only, as torchrec on meta
            return {name: JaggedTensor(values=torch.empty(features[key].values().numel(), self.dims[0], device="meta"),
                                       lengths=features[key].lengths())
                    for name, key in zip(self.output_names, self.feature_names)}
        kjt, outs, counts, _ = self._lookup(features)
        B, lengths, out = kjt.stride(), kjt.lengths(), outs["rows"]
        rows = combine_lanes(out, self._group_combines["rows"], self._lane_major["rows"])
        blocks = rows.split(self._widths, dim=1)
        ids = kjt.values().split(counts) if self._need_indices else [None] * len(counts)
        result = {}
        for f, (name, block) in enumerate(zip(self.output_names, blocks)):
            seg, block = lengths[f * B : (f + 1) * B], first_rows(block, counts[f])
            if self._transforms:
                block = self._transform(f, block, torch.repeat_interleave(torch.arange(B), seg, output_size=counts[f]), B)
            result[name] = JaggedTensor(values=block, lengths=seg, weights=ids[f])
        return result
