"""Collections with torchrec's call shapes, over one fused storage.

``EmbeddingBagCollection(KeyedJaggedTensor) -> KeyedTensor`` (pooled, sum or mean) and
``EmbeddingCollection(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` (one row per id),
so code written for torchrec's EBC / EC switches by changing one constructor.

Each feature's ids are remapped to K_f lanes; every lane is one TBE feature, ordered
feature by feature (so the pooled lanes of a feature sit side by side and ``concat``
costs nothing).  Per-id rows (sequence output, and ``mult`` tables of a pooled
collection, which sum products per bag) come from a second storage in which every id
is a bag of its own; each lane there has B' = max ids per lane bags, padded empty.

Shapes: B batch, F features, N ids, K lanes, D dim, M rows.

Example::

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"], values=torch.tensor([3, 7, 7, 1]),
        lengths=torch.tensor([1, 1, 2, 0]))        # B = 2: user=[3],[7]; item=[7,1],[]
    ebc = EmbeddingBagCollection([create_table("full", name="t", embedding_dim=8,
                                  feature_names=["user", "item"], num_ids=10)])
    ebc(kjt).values().shape                        # [2, 16]
"""
from __future__ import annotations

import torch
from torch import nn

from rectables.optim import SparseOptimizer
from rectables.registry import create_table, table_class
from rectables.storage import FusedStorage
from rectables.table import Table


class _Collection(nn.Module):
    """Plan shared by the pooled and sequence collections."""

    pooled = True

    def __init__(
        self,
        tables: list[Table],
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in tables]
        feats = [f for t in tables for f in t.feature_names]
        if not tables or len(set(names)) != len(names) or len(set(feats)) != len(feats):
            raise ValueError(f"need >= 1 table, unique table names and features; got {names}, {feats}")
        self.tables = nn.ModuleList(tables)
        self.feature_names = feats
        self.dims = [d for t in tables for d in t.feature_dims()]
        # group "bags": pooled by the TBE; group "rows": one row per id (sequences, mult)
        self.groups = [("rows" if not self.pooled or t.combine == "mult" else "bags") for t in tables]
        shapes: dict[str, list] = {"bags": [], "rows": []}
        feature_lanes: dict[str, list] = {"bags": [], "rows": []}  # per feature: global tables of its lanes
        self._base: list[int] = []
        self._lane_dims: list[list[list[int]]] = []  # [table][feature] -> dims of its lanes
        for t, g in zip(tables, self.groups):
            base = len(shapes[g])
            self._base.append(base)
            shapes[g] += t.physical_shapes()
            per_f = [t.feature_lanes(f) for f in range(len(t.feature_names))]
            feature_lanes[g] += [[base + k for k in ks] for ks in per_f]
            self._lane_dims.append([[shapes[g][base + k][1] for k in ks] for ks in per_f])
        lanes = {g: [k for f in fl for k in f] for g, fl in feature_lanes.items()}
        opt = optimizer or SparseOptimizer()
        self.storages = nn.ModuleDict(
            {g: FusedStorage(shapes[g], lanes[g], opt, device=device) for g in shapes if shapes[g]}
        )
        for t, g, base in zip(tables, self.groups, self._base):
            for k in range(len(t.physical_shapes())):
                self.storages[g].init_uniform_(base + k, t.init_bound(k))
        self._all_passthrough = self.pooled and all(t.passthrough for t in tables)
        self._one_lane = all(len(d) == 1 for dims in self._lane_dims for d in dims)
        self._first = [0]  # index of each table's first feature
        for t in tables:
            self._first.append(self._first[-1] + len(t.feature_names))
        self._limits = torch.tensor([t.physical_shapes()[0][0] for t in tables])

    def table_storage(self, i: int) -> tuple[FusedStorage, int]:
        """(storage, index of its first physical table) of the i-th table."""
        return self.storages[self.groups[i]], self._base[i]

    @property
    def storage(self) -> FusedStorage:
        """The storage, when the collection has one group only."""
        if len(self.storages) != 1:
            raise AttributeError("this collection has two storages; use table_storage(i)")
        return next(iter(self.storages.values()))

    @classmethod
    def from_configs(
        cls,
        configs: list,
        methods: dict[str, str | tuple[str, dict]] | None = None,
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
    ):
        """Build from torchrec ``EmbeddingBagConfig`` / ``EmbeddingConfig`` objects.

        ``methods`` maps a table name to a method, or to ``(method, options)``; tables
        not named are ``full``.  torchrec's ``num_embeddings`` fills the method's size
        argument (``num_ids``, ``num_buckets``) unless the options give it.
        """
        methods = methods or {}
        tables = []
        for c in configs:
            spec = methods.get(c.name, "full")
            name, options = (spec, {}) if isinstance(spec, str) else spec
            options = dict(options)
            size_arg = table_class(name).size_arg
            if size_arg:
                options.setdefault(size_arg, c.num_embeddings)
            pooling = getattr(getattr(c, "pooling", None), "name", "SUM").lower()
            tables.append(
                create_table(
                    name, name=c.name, embedding_dim=c.embedding_dim,
                    feature_names=list(c.feature_names), pooling=pooling, **options,
                )
            )
        return cls(tables, optimizer, device)

    # ---- lookup --------------------------------------------------------------------
    def _align(self, kjt):
        keys = kjt.keys()
        if keys == self.feature_names:
            return kjt
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise ValueError(f"KeyedJaggedTensor lacks feature(s) {missing}; it has {keys}")
        return kjt.permute([keys.index(f) for f in self.feature_names])

    def _lookup(self, kjt):
        """Remap every table and run the fused lookups.

        Returns (kjt, {group: output}, ids per feature).
        """
        kjt = self._align(kjt)
        if kjt.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported")
        B = kjt.stride()
        values, lengths, offsets = kjt.values(), kjt.lengths(), kjt.offsets()
        if values.dtype != torch.int64:
            values, offsets = values.long(), offsets.long()
        bounds = offsets[::B].tolist() if B else [0] * (len(self.feature_names) + 1)
        counts = [bounds[i + 1] - bounds[i] for i in range(len(self.feature_names))]
        if self._all_passthrough:
            self._check_ids(values, bounds)
            return kjt, {"bags": self.storage(values, offsets)}, counts
        parts: dict[str, list] = {g: [] for g in self.storages}
        lens: dict[str, list] = {g: [] for g in self.storages}
        lane_ids: list[int] = []  # ids per lane of the per-id group
        for t, g, f0 in zip(self.tables, self.groups, self._first):
            nf = len(t.feature_names)
            rows = t.remap(values[bounds[f0] : bounds[f0 + nf]], counts[f0 : f0 + nf])
            for i, r in enumerate(rows):
                parts[g].append(r.reshape(-1))
                if g == "rows":
                    lane_ids += [r.shape[1]] * r.shape[0]
                    continue
                seg = lengths[(f0 + i) * B : (f0 + i + 1) * B]
                lens[g].append(seg if r.shape[0] == 1 else seg.repeat(r.shape[0]))
        out = {}
        for g, storage in self.storages.items():
            indices = torch.cat(parts[g]) if len(parts[g]) > 1 else parts[g][0]
            if g == "rows":
                tbe_offsets = _one_id_per_bag(lane_ids)
            elif self._one_lane and len(self.storages) == 1:  # bags unchanged: reuse the KJT offsets
                tbe_offsets = offsets
            else:
                lens_all = torch.cat(lens[g]) if len(lens[g]) > 1 else lens[g][0]
                tbe_offsets = torch.zeros(lens_all.numel() + 1, dtype=torch.int64)
                torch.cumsum(lens_all, 0, out=tbe_offsets[1:])
            out[g] = storage(indices, tbe_offsets)
        return kjt, out, counts

    def _check_ids(self, values: torch.Tensor, bounds: list[int]) -> None:
        """All tables pass ids through: one fused max per table, one min overall."""
        segs = [values[bounds[self._first[i]] : bounds[self._first[i + 1]]] for i in range(len(self.tables))]
        nonempty = [i for i, x in enumerate(segs) if x.numel()]
        if not nonempty:
            return
        maxes = torch.stack(torch._foreach_max([segs[i] for i in nonempty]))
        if bool(values.min() < 0) or bool((maxes >= self._limits[nonempty]).any()):
            for i in nonempty:  # slow path: let the table name the feature
                t = self.tables[i]
                t.remap(segs[i], [bounds[j + 1] - bounds[j] for j in range(self._first[i], self._first[i + 1])])

    # ---- hooks ---------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        losses = [x for x in (t.extra_loss() for t in self.tables) if x is not None]
        return sum(losses) if losses else None

    def on_step_end(self, step: int) -> None:
        for t in self.tables:
            t.on_step_end(step)


def _one_id_per_bag(lane_ids: list[int]) -> torch.Tensor:
    """TBE offsets [L * B' + 1] giving every id its own bag; lane j has lane_ids[j] ids and
    B' = max(lane_ids) bags, the last ones empty."""
    n = torch.tensor(lane_ids)
    width = max(max(lane_ids, default=0), 1)
    starts = torch.cumsum(n, 0) - n
    offs = starts.unsqueeze(1) + torch.minimum(torch.arange(width).unsqueeze(0), n.unsqueeze(1))
    return torch.cat([offs.reshape(-1), n.sum().reshape(1)])


def _combine_cols(rows: torch.Tensor, dims: list[int], combine: str) -> torch.Tensor:
    """Rows [N, sum d] of one feature, its K lanes side by side -> [N, D]."""
    if len(dims) == 1 or combine == "concat":
        return rows
    lanes = rows.view(rows.shape[0], len(dims), dims[0])
    if combine == "sum":
        return lanes.sum(1)
    out, *rest = lanes.unbind(1)
    for lane in rest:  # plain products: prod()'s backward scans for zeros
        out = out * lane
    return out


def _feature_blocks(out: torch.Tensor, lane_dims: list[list[list[int]]], groups: list[str], group: str) -> list:
    """One split of ``out`` [*, sum of widths] into per-feature blocks (slicing feature by
    feature would give each slice a full-size zero gradient in backward)."""
    widths = [sum(d) for dims, g in zip(lane_dims, groups) if g == group for d in dims]
    return list(out.split(widths, dim=1))


def _first_rows(block: torch.Tensor, n: int) -> torch.Tensor:
    return block if n == block.shape[0] else block[:n]


class EmbeddingBagCollection(_Collection):
    """Pooled lookup: ``forward(KeyedJaggedTensor [F keys, B bags]) -> KeyedTensor [B, sum D]``."""

    pooled = True

    def __init__(self, tables, optimizer=None, device=None) -> None:
        super().__init__(tables, optimizer, device)
        self._mean = any(t.pooling == "mean" for t in tables)
        self._is_mean = torch.tensor([t.pooling == "mean" for t in tables for _ in t.feature_names])
        self._dims_t = torch.tensor(self.dims)
        # the TBE output is already the answer unless some feature sums lanes or is per-id
        self._plain_output = "rows" not in self.storages and not any(
            len(d) > 1 and t.combine == "sum" for t, dims in zip(tables, self._lane_dims) for d in dims
        )

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kjt, outs, counts = self._lookup(features)
        B = kjt.stride()
        out = outs.get("bags")
        if not self._plain_output:
            out = self._assemble(outs, kjt.lengths(), counts, B)
        if self._mean:
            out = out * self._mean_scale(kjt.lengths(), B)
        return KeyedTensor(keys=self.feature_names, length_per_key=self.dims, values=out)

    def _assemble(self, outs: dict, lengths: torch.Tensor, counts: list[int], B: int) -> torch.Tensor:
        blocks = {g: iter(_feature_blocks(o, self._lane_dims, self.groups, g)) for g, o in outs.items()}
        pieces, f = [], 0
        for t, g, dims in zip(self.tables, self.groups, self._lane_dims):
            for d in dims:
                block = next(blocks[g])
                if g == "bags":
                    if len(d) > 1 and t.combine == "sum":
                        block = block.reshape(B, len(d), -1).sum(1)
                else:  # one row per id: combine each id's lanes, then sum per bag
                    n = counts[f]
                    per_id = _combine_cols(_first_rows(block, n), d, t.combine)
                    bag = torch.repeat_interleave(torch.arange(B), lengths[f * B : (f + 1) * B], output_size=n)
                    block = per_id.new_zeros(B, per_id.shape[1]).index_add_(0, bag, per_id)
                pieces.append(block)
                f += 1
        return torch.cat(pieces, dim=1)

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

    def __init__(self, tables, optimizer=None, device=None) -> None:
        if len({d for t in tables for d in t.feature_dims()}) > 1:
            raise ValueError("EmbeddingCollection needs one embedding_dim for all tables")
        super().__init__(tables, optimizer, device)

    def forward(self, features) -> dict:
        from torchrec.sparse.jagged_tensor import JaggedTensor

        kjt, outs, counts = self._lookup(features)
        B, lengths, out = kjt.stride(), kjt.lengths(), outs["rows"]
        blocks = iter(_feature_blocks(out, self._lane_dims, self.groups, "rows"))
        result, f = {}, 0
        for t, dims in zip(self.tables, self._lane_dims):
            for name, d in zip(t.feature_names, dims):
                values = _combine_cols(_first_rows(next(blocks), counts[f]), d, t.combine)
                result[name] = JaggedTensor(values=values, lengths=lengths[f * B : (f + 1) * B])
                f += 1
        return result
